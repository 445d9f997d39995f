"""unshuffle_mask_tokens: Triton (CPU interpreter without a GPU) against the PyTorch reference."""
import os

if not (os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl")):
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported


import pytest
import torch

from mae_fast.kernels import unshuffle_mask_tokens, unshuffle_mask_tokens_reference
from kernel_helpers import compile_for_h100

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# one ulp of the narrow type: the interpreter truncates float32 -> bfloat16 (the GPU rounds to nearest)
ULP = {F32: 1e-6, BF16: 2.0**-7, F16: 2.0**-10}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("MAE_FAST_KERNELS_POISON", "1")  # outputs start as NaN: unwritten elements fail


def _close(a, b, rel, what):
    assert a.shape == b.shape and a.dtype == b.dtype, what
    assert torch.isfinite(a).all(), f"{what}: non-finite values (unwritten output?)"
    err = (a.double() - b.double()).abs()
    bound = rel * b.double().abs() + 1e-6
    assert (err <= bound).all(), f"{what}: max error {err.max().item():.3g}"


def _inputs(N, L, ratio, Dd, x_dt, mt_dt, pos_dt, seed):
    g = torch.Generator().manual_seed(seed)
    K = int(L * (1 - ratio))
    x = torch.randn(N, 1 + K, Dd, generator=g).to(DEVICE, x_dt)
    mask_token = torch.randn(1, 1, Dd, generator=g).to(DEVICE, mt_dt)
    ids_shuffle = torch.argsort(torch.rand(N, L, generator=g), dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1).to(DEVICE)
    pos = torch.randn(1, 1 + L, Dd, generator=g).to(DEVICE, pos_dt)
    return x, mask_token, ids_restore, pos


CASES = [
    # N, L, ratio, Dd, x dtype, mask_token dtype, pos dtype, pos needs grad
    (2, 49, 0.75, 96, F32, F32, F32, True),
    (1, 196, 0.5, 80, BF16, F32, F32, False),    # autocast: bf16 tokens, fp32 params -> fp32
    (1, 256, 0.9, 72, F16, F16, F16, True),
    (1, 1024, 0.75, 64, BF16, BF16, F32, False),
    (2, 196, 0.75, 512, BF16, BF16, BF16, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"N{c[0]}-L{c[1]}-r{c[2]}-D{c[3]}-{c[4]}-{c[5]}-{c[6]}")
def test_forward_backward_matches_reference(case):
    N, L, ratio, Dd, x_dt, mt_dt, pos_dt, pos_grad = case
    seed = 2000 + CASES.index(case)
    x, mt, ids_restore, pos = _inputs(N, L, ratio, Dd, x_dt, mt_dt, pos_dt, seed)
    leaves = [x.requires_grad_(), mt.requires_grad_()] + ([pos.requires_grad_()] if pos_grad else [])

    out = unshuffle_mask_tokens(x, mt, ids_restore, pos, backend="triton")
    ref = unshuffle_mask_tokens_reference(x, mt, ids_restore, pos)
    assert out.dtype == ref.dtype
    _close(out, ref, ULP[out.dtype], "forward")

    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, out.dtype)
    grads = torch.autograd.grad(out, leaves, grad_out)
    grads_ref = torch.autograd.grad(ref, leaves, grad_out)
    _close(grads[0], grads_ref[0], ULP[x_dt], "grad x")  # a permutation: exact up to the final rounding
    # mask token: float32 sum over the masked rows, checked against the exact (float64) sum; the
    # reference rounds each row's grad to a bf16 mask token's dtype before summing, so it is less exact
    K = x.shape[1] - 1
    exact = grad_out[:, 1:][ids_restore >= K].double().sum(0).reshape(mt.shape)
    _close(grads[1].double(), exact, ULP[mt_dt], "grad mask_token")
    if pos_grad:
        _close(grads[2].float(), grads_ref[2].float(), 1e-5 + ULP[pos_dt], "grad pos")

    # deterministic: the same inputs give the same bits
    again = torch.autograd.grad(unshuffle_mask_tokens(x, mt, ids_restore, pos, backend="triton"), leaves, grad_out)
    for a, b in zip(grads, again):
        assert torch.equal(a, b)


def test_backend_dispatch():
    x, mt, ids_restore, pos = _inputs(2, 49, 0.75, 32, F32, F32, F32, 3)
    ref = unshuffle_mask_tokens_reference(x, mt, ids_restore, pos)
    assert torch.equal(unshuffle_mask_tokens(x, mt, ids_restore, pos, backend="torch"), ref)
    _close(unshuffle_mask_tokens(x, mt, ids_restore, pos), ref, 1e-6, "auto")
    with pytest.raises(ValueError, match="backend"):
        unshuffle_mask_tokens(x, mt, ids_restore, pos, backend="gpu")


def test_torch_compile_no_graph_breaks():
    x, mt, ids_restore, pos = _inputs(2, 49, 0.75, 40, F32, F32, F32, 4)
    x.requires_grad_()
    mt.requires_grad_()

    def f(x, mt, ids_restore):
        return unshuffle_mask_tokens(x * 2, mt, ids_restore, pos, backend="triton").square().sum()

    explain = torch._dynamo.explain(f)(x, mt, ids_restore)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    loss = torch.compile(f, backend="aot_eager", fullgraph=True)(x, mt, ids_restore)
    grads = torch.autograd.grad(loss, (x, mt))
    loss_ref = f(x, mt, ids_restore)
    grads_ref = torch.autograd.grad(loss_ref, (x, mt))
    _close(loss, loss_ref, 1e-6, "compiled loss")
    for a, b in zip(grads, grads_ref):
        _close(a, b, 1e-6, "compiled grad")


def test_kernels_compile_for_h100():
    """The GPU path compiles for sm_90 (bf16 tokens, fp32 mask token / pos / output)."""
    proc = compile_for_h100("""
        m = importlib.import_module("mae_fast.kernels.unshuffle")
        compile_for_gpu(m._unshuffle_fwd_kernel, dict(x_ptr="*bf16", mt_ptr="*fp32", ids_ptr="*i64",
                        pos_ptr="*fp32", out_ptr="*fp32"), dict(BLOCK_R=8, BLOCK_D=256))
        compile_for_gpu(m._unshuffle_bwd_kernel, dict(g_ptr="*fp32", ids_ptr="*i64", gx_ptr="*bf16",
                        part_ptr="*fp32"), dict(BLOCK_R=8, BLOCK_D=256))
    """)
    assert proc.returncode == 0, proc.stderr[-4000:]

