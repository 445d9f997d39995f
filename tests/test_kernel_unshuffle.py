"""unshuffle_mask_tokens: Triton (CPU interpreter without a GPU) against the PyTorch reference."""
import os

if not (os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl")):
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported


import pytest
import torch

from mae_fast.kernels import unshuffle_mask_tokens, unshuffle_mask_tokens_reference
from mae_fast.kernels._utils import masking_reference
from kernel_helpers import DEVICE, compile_for_h100

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


def _sum_close(got, rows, ulp, what):
    """``got`` equals the float64 sum of ``rows`` over dim 0, up to float32 summation error (which scales
    with the sum of magnitudes, not with the possibly tiny sum) and one rounding to ``ulp``."""
    assert torch.isfinite(got).all(), f"{what}: non-finite values (unwritten output?)"
    exact = rows.double().sum(0)
    err = (got.double() - exact).abs()
    bound = ulp * exact.abs() + ULP[F32] * rows.double().abs().sum(0) + 1e-6
    assert (err <= bound).all(), f"{what}: max error {err.max().item():.3g}"


def _inputs(N, L, ratio, Dd, x_dt, mt_dt, pos_dt, seed):
    g = torch.Generator().manual_seed(seed)
    K = int(L * (1 - ratio))
    x = torch.randn(N, 1 + K, Dd, generator=g).to(DEVICE, x_dt)
    mask_token = torch.randn(1, 1, Dd, generator=g).to(DEVICE, mt_dt)
    ids_restore = masking_reference(torch.rand(N, L, generator=g), ratio).ids_restore.to(DEVICE)
    pos = torch.randn(1, 1 + L, Dd, generator=g).to(DEVICE, pos_dt)
    return x, mask_token, ids_restore, pos


CASES = [
    # N, L, ratio, Dd, x dtype, mask_token dtype, pos dtype, pos needs grad
    (2, 49, 0.75, 96, F32, F32, F32, True),
    (1, 196, 0.75, 512, BF16, F32, F32, False),  # ViT decoder at 224 px, batch 1; autocast: bf16 x -> fp32
    (1, 256, 0.9, 72, F16, F16, F16, True),
    (3, 64, 0.75, 40, BF16, BF16, F32, False),
    (2, 49, 0.75, 512, BF16, BF16, BF16, True),
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
    assert grads[1].shape == mt.shape and grads[1].dtype == mt_dt
    _sum_close(grads[1].reshape(-1), grad_out[:, 1:][ids_restore >= K], ULP[mt_dt], "grad mask_token")
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


def test_backward_over_many_row_ranges():
    """R = 3 * 197 rows: each backward program walks 32 rows in 4 tiles (19 partial rows of the
    mask-token gradient, the last range cut short); grad_x is the exact permutation, the mask-token
    gradient the float32 sum."""
    from mae_fast.kernels.unshuffle import _unshuffle_bwd_op, unshuffle_config

    N, L, Dd, K = 3, 196, 24, 49
    g = torch.Generator().manual_seed(5)
    ids_restore = masking_reference(torch.rand(N, L, generator=g), 0.75).ids_restore.to(DEVICE)  # K of L kept
    grad_out = torch.randn(N, 1 + L, Dd, generator=g).to(DEVICE)
    R = N * (1 + L)
    assert unshuffle_config(R, Dd)["ROWS"] == 32
    grad_x, part = _unshuffle_bwd_op(grad_out, ids_restore, 1 + K, torch.float32)
    assert part.shape == (19, Dd)
    rows, kept = grad_out[:, 1:], ids_restore < K
    expect_x = torch.stack([torch.cat([grad_out[n, :1], rows[n][kept[n]][torch.argsort(ids_restore[n][kept[n]])]])
                            for n in range(N)])
    assert torch.equal(grad_x, expect_x)
    _sum_close(part.sum(0), rows[~kept], ULP[F32], "mask-token grad")


def test_partial_buffer_is_small():
    """The mask-token partial sums take at most 256 rows of Dd floats, not a row per 8 output rows
    (which at ViT-L/16 batch 256 was as large as grad_x)."""
    from mae_fast.kernels._utils import recording_launches
    from mae_fast.kernels.unshuffle import MAX_PARTIALS, _backward_kernels

    for N, L, K, Dd in ((256, 196, 49, 512), (32, 1024, 256, 512), (1, 196, 49, 512)):
        grad_out = torch.empty(N, 1 + L, Dd, device="meta")
        with recording_launches(execute=False) as rec:
            grad_x, part = _backward_kernels(grad_out, torch.empty(N, L, dtype=torch.int64, device="meta"),
                                             1 + K, torch.bfloat16)
        assert part.shape[0] <= MAX_PARTIALS and part.shape[1] == Dd
        assert rec[0].grid[0] == part.shape[0]
        if N >= 32:
            assert part.numel() * 4 * 10 < grad_x.numel() * 2


def test_kernels_compile_for_h100():
    """The GPU launches compile for sm_90 (bf16 / fp16 tokens, fp32 and bf16 outputs) as the launch
    code builds them (the training case is in test_kernel_resources)."""
    proc = compile_for_h100("""
        un = importlib.import_module("mae_fast.kernels.unshuffle")
        meta = dict(device="meta")
        ids = torch.empty(4, 196, dtype=torch.int64, **meta)
        for x_dt, p_dt in ((torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16)):
            x = torch.empty(4, 50, 512, dtype=x_dt, **meta)
            mt, pos = torch.empty(1, 1, 512, dtype=p_dt, **meta), torch.empty(1, 197, 512, dtype=p_dt, **meta)
            with recording_launches(execute=False) as rec:
                out = un._forward(x, mt, ids, pos)
                un._backward_kernels(torch.empty_like(out), ids, 50, x_dt)
            assert [lc.name for lc in rec] == ["_unshuffle_fwd_kernel", "_unshuffle_bwd_kernel"]
            for lc in rec:
                compile_launch(lc)
    """)
    assert proc.returncode == 0, proc.stderr[-4000:]
