"""Every kernel addresses a sample in 64 bits: samples that start past 2**31 elements are read and written
right, forward and backward.

ViT-H/14 at 448 px and batch 256 is 154 M image elements (within int32), but a strided view, or a batch of
~3600 such images, puts a sample past 2**31 elements, where an int32 ``n * stride`` wraps. Here the samples
lie 2**30 + 64 elements apart in a sparse file (only the pages touched are allocated), so sample 2 starts past
2**31 while every stride still fits an int32 kernel argument. A wrapped offset reads far outside the tensor
(in the interpreter: a crash), so each op runs in its own process and reports its errors against the
reference on contiguous copies; outputs are poisoned (NaN) before each call.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

FAR = 2**30 + 64  # elements between samples: an int32 stride, sample 2 past 2**31


def far_apart(values: torch.Tensor, path: Path) -> torch.Tensor:
    """``values`` (N, ...) copied into a view whose samples lie FAR elements apart in a sparse file."""
    n = (values.shape[0] - 1) * FAR + values[0].numel()
    with open(path, "wb") as f:
        f.truncate(n * values.element_size())
    storage = torch.from_file(str(path), shared=True, size=n, dtype=values.dtype)
    view = storage.as_strided(values.shape, (FAR, *values[0].contiguous().stride()))
    view.copy_(values)
    return view


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def check_patch_embed_gather(tmp: Path) -> dict:
    from mae_fast.kernels import patch_embed_gather
    from mae_fast.kernels.patch_embed_gather import patch_embed_gather_reference

    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 3, 56, 56, generator=g)  # patch 14: 4 x 4 patches, the padded-row path
    imgs = far_apart(base, tmp / "imgs.bin").requires_grad_(True)
    ids = torch.argsort(torch.rand(3, 16, generator=g), 1)[:, :5].contiguous()
    w0, b, pos = torch.randn(40, 588, generator=g) * 0.05, torch.randn(40, generator=g), torch.randn(16, 40, generator=g)
    gout = torch.randn(3, 5, 40, generator=g)
    ref_imgs, ref_w = base.clone().requires_grad_(True), w0.clone().requires_grad_(True)
    ref = patch_embed_gather_reference(ref_imgs, ids, ref_w, b, pos, 14)
    ref.backward(gout)
    errors = {}
    for impl in ("fused", "gemm"):
        w = w0.clone().requires_grad_(True)
        imgs.grad = None
        out = patch_embed_gather(imgs, ids, w, b, pos, 14, backend="triton", impl=impl)
        out.backward(gout)
        errors[impl] = [rel(out, ref), rel(w.grad, ref_w.grad), rel(imgs.grad, ref_imgs.grad)]
    return errors


def check_masked_loss(tmp: Path) -> dict:
    from mae_fast.kernels import masked_loss
    from mae_fast.kernels.masked_loss import masked_loss_reference

    g = torch.Generator().manual_seed(1)
    base_imgs = torch.randn(3, 3, 32, 32, generator=g)
    imgs = far_apart(base_imgs, tmp / "imgs.bin")
    mask = (torch.rand(3, 16, generator=g) < 0.75).float()
    mask[:, 0] = 1
    ids = torch.argsort(torch.rand(3, 16, generator=g), 1)[:, 4:].contiguous()
    errors = {}
    for name, rows, idx in (("all patches", 16, None), ("masked only", 12, ids)):
        base_pred = torch.randn(3, rows, 192, generator=g)
        pred = far_apart(base_pred, tmp / f"pred{rows}.bin").requires_grad_(True)
        ref_pred = base_pred.clone().requires_grad_(True)
        loss = masked_loss(pred, imgs, mask, 8, True, ids_masked=idx, backend="triton")
        loss.backward()
        ref = masked_loss_reference(ref_pred, base_imgs, mask, 8, True, ids_masked=idx)
        ref.backward()
        errors[name] = [rel(loss, ref), rel(pred.grad, ref_pred.grad)]
    return errors


def check_unshuffle_mask_tokens(tmp: Path) -> dict:
    from mae_fast.kernels import unshuffle_mask_tokens
    from mae_fast.kernels.unshuffle import _backward_kernels, unshuffle_mask_tokens_reference

    g = torch.Generator().manual_seed(2)
    N, L, K, Dd = 3, 16, 4, 24
    base_x = torch.randn(N, 1 + K, Dd, generator=g)
    x = far_apart(base_x, tmp / "x.bin")
    mt, pos = torch.randn(1, 1, Dd, generator=g), torch.randn(1, 1 + L, Dd, generator=g)
    ids_restore = torch.argsort(torch.argsort(torch.rand(N, L, generator=g), 1), 1)
    out = unshuffle_mask_tokens(x, mt, ids_restore, pos, backend="triton")
    ref_x, ref_mt = base_x.clone().requires_grad_(True), mt.clone().requires_grad_(True)
    ref = unshuffle_mask_tokens_reference(ref_x, ref_mt, ids_restore, pos)
    base_g = torch.randn(N, 1 + L, Dd, generator=g)
    ref.backward(base_g)
    grad_x, part = _backward_kernels(far_apart(base_g, tmp / "g.bin"), ids_restore, 1 + K, torch.float32)
    return {"forward and backward": [rel(out, ref), rel(grad_x, ref_x.grad), rel(part.sum(0), ref_mt.grad.reshape(-1))]}


@pytest.mark.slow
@pytest.mark.parametrize("op", ["patch_embed_gather", "masked_loss", "unshuffle_mask_tokens"])
def test_samples_past_2_to_the_31_elements(op, tmp_path):
    code = (f"import json, sys; from pathlib import Path; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"import test_kernel_offsets as t; print(json.dumps(t.check_{op}(Path({str(tmp_path)!r}))))")
    env = {**os.environ, "TRITON_INTERPRET": "1", "MAE_FAST_KERNELS_POISON": "1", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, f"{op} with samples past 2**31 elements: exit {run.returncode}\n{run.stderr[-2000:]}"
    errors = json.loads(run.stdout.strip().splitlines()[-1])
    for case, errs in errors.items():
        assert all(e < 1e-5 for e in errs), (op, case, errs)
    used = sum(f.stat().st_blocks * 512 for f in tmp_path.iterdir())
    assert used < 2**26, f"the sparse files took {used} bytes on disk"  # pages touched only, not 8 GiB
