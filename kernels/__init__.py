"""Triton ops for MAE (issue 3), each with a plain-PyTorch reference beside it.

Every public op takes ``backend="auto" | "triton" | "torch"``: "auto" runs Triton on CUDA tensors and
the reference elsewhere; "triton" on CPU tensors needs ``TRITON_INTERPRET=1`` (tests). Each kernel's
tiles come from one function (``pe_fwd_config``, ``pe_move_config``, ``loss_config``,
``unshuffle_config``) that the GPU launch and the interpreter tests share; every launch goes through
``_utils.launch``, so it can be recorded and built for sm_90 without a GPU
(``python -m mae_fast.bench.kernel_resources``). ``backend_choices()`` lists the implementation each op
chose by timing on the GPU (patch embedding: fused kernel or Triton gather + cuBLAS).

The ops are registered with ``torch.library.custom_op`` + ``register_fake`` + ``register_autograd``
(namespace ``mae_fast::``), so torch.compile traces them without graph breaks. ``triton_op`` +
``wrap_triton`` was not used: under the interpreter ``wrap_triton`` is a pass-through, so its
fake-tensor / functionalization tracing launches the kernel on fake tensors and fails; custom_op keeps
one registration that is tested on CPU and used unchanged on the GPU (Inductor calls it as an opaque op).
"""
import sys

if __name__ != "mae_fast.kernels":
    # Found as a top-level ``kernels`` because the repository root is on sys.path (a script or pip's setup.py
    # run from here). The name belongs to another distribution (Hugging Face's ``kernels``, which transformers
    # imports and whose egg_info entry point pip loads): load that one in our place when it is installed, else
    # be mae_fast.kernels itself, never a second copy that would register the ``mae_fast::`` ops again.
    import importlib
    import importlib.machinery
    import importlib.util
    import os

    _root = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    _elsewhere = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != _root]
    _spec = importlib.machinery.PathFinder.find_spec(__name__, _elsewhere)
    if _spec is not None and _spec.loader is not None:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules[__name__] = _module
        _spec.loader.exec_module(_module)
    else:
        sys.modules[__name__] = importlib.import_module("mae_fast.kernels")
else:
    from ._utils import KERNEL_BACKENDS, backend_choices, restore_backend_choices
    from .masked_loss import masked_loss, masked_loss_reference
    from .patch_embed_gather import patch_embed_gather, patch_embed_gather_reference
    from .unshuffle import unshuffle_mask_tokens, unshuffle_mask_tokens_reference

__all__ = [
    "KERNEL_BACKENDS",
    "backend_choices",
    "masked_loss",
    "masked_loss_reference",
    "patch_embed_gather",
    "patch_embed_gather_reference",
    "restore_backend_choices",
    "unshuffle_mask_tokens",
    "unshuffle_mask_tokens_reference",
]
