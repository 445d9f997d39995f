"""masked_loss: Triton (CPU interpreter without a GPU) against the PyTorch reference and the model."""
import os

if not (os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl")):
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported


import pytest
import torch

from mae_fast import mae_vit_tiny_patch8
from mae_fast.kernels import masked_loss, masked_loss_reference
from mae_fast.kernels._utils import masking_reference
from kernel_helpers import DEVICE, compile_for_h100

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("MAE_FAST_KERNELS_POISON", "1")  # outputs start as NaN: unwritten elements fail


def _inputs(N, p, grid, ratio, dtype, seed, C=3):
    g = torch.Generator().manual_seed(seed)
    L = grid * grid
    K = int(L * (1 - ratio))
    imgs = torch.randn(N, C, grid * p, grid * p, generator=g).to(DEVICE)
    masking = masking_reference(torch.rand(N, L, generator=g), ratio)
    mask = masking.mask.to(DEVICE)
    pred = torch.randn(N, L, p * p * C, generator=g).to(DEVICE, dtype)
    return pred, imgs, mask, masking.ids_shuffle[:, K:].to(DEVICE)


CASES = [
    # N, p, grid, ratio, pred dtype, norm_pix_loss, masked-only predictions, channels
    (2, 16, 5, 0.75, F32, True, False, 3),     # ViT-B/L/16: P 768 = 512 + 256
    (1, 16, 7, 0.5, BF16, True, True, 3),      # batch 1
    (1, 16, 6, 0.9, F16, False, False, 3),
    (1, 14, 6, 0.75, BF16, True, True, 3),     # ViT-H/14: P 588 = 512 + 76 of 128
    (2, 14, 5, 0.75, F32, True, False, 3),
    (2, 14, 4, 0.75, F32, False, True, 3),
    (3, 8, 3, 0.6, BF16, True, False, 3),      # P 192 = 128 + 64, odd batch
    (1, 8, 5, 0.75, F32, True, False, 1),      # P 64: a power of two, no tail part
]
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"N{c[0]}-p{c[1]}-C{c[7]}-L{c[2]**2}-r{c[3]}-{c[4]}-norm{c[5]}-sub{c[6]}")
def test_forward_backward_matches_reference(case):
    N, p, grid, ratio, dtype, norm, sub, C = case
    seed = 3000 + CASES.index(case)
    pred, imgs, mask, ids_masked = _inputs(N, p, grid, ratio, dtype, seed, C)
    if sub:
        pred = torch.gather(pred, 1, ids_masked.unsqueeze(-1).expand(-1, -1, pred.shape[-1]))
    else:
        ids_masked = None
    pred.requires_grad_()
    grad_loss = torch.tensor(1.0 + seed % 7 / 10, device=DEVICE)

    loss = masked_loss(pred, imgs, mask, p, norm, ids_masked, backend="triton")
    ref = masked_loss_reference(pred, imgs, mask, p, norm, ids_masked)
    assert loss.dtype == ref.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)

    (grad,) = torch.autograd.grad(loss, pred, grad_loss)
    (grad_ref,) = torch.autograd.grad(ref, pred, grad_loss)
    assert grad.dtype == pred.dtype and torch.isfinite(grad).all()
    tol = {F32: 1e-5, BF16: 2.0**-7, F16: 2.0**-10}[dtype]
    torch.testing.assert_close(grad.float(), grad_ref.float(), rtol=tol, atol=tol * grad_ref.abs().max().item())
    if not sub:  # visible patches get exactly zero gradient
        assert (grad[mask == 0] == 0).all()


def test_masked_only_equals_full():
    p = 16
    pred, imgs, mask, ids_masked = _inputs(2, p, 7, 0.75, F32, 41)
    full = masked_loss(pred, imgs, mask, p, True, backend="triton")
    sub_pred = torch.gather(pred, 1, ids_masked.unsqueeze(-1).expand(-1, -1, pred.shape[-1]))
    sub = masked_loss(sub_pred, imgs, mask, p, True, ids_masked, backend="triton")
    torch.testing.assert_close(full, sub, rtol=1e-6, atol=0)



def test_strided_pred_view():
    """The model passes decoder_pred(x)[:, 1:, :], a non-contiguous view: strides are honoured."""
    p = 16
    pred, imgs, mask, _ = _inputs(2, p, 7, 0.75, BF16, 45)
    full = torch.cat([torch.randn_like(pred[:, :1]), pred], dim=1).requires_grad_()
    view = full[:, 1:, :]
    loss = masked_loss(view, imgs, mask, p, True, backend="triton")
    ref = masked_loss_reference(view, imgs, mask, p, True)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(loss, full)
    (grad_ref,) = torch.autograd.grad(ref, full)
    assert (grad[:, 0] == 0).all()
    torch.testing.assert_close(grad.float(), grad_ref.float(), rtol=2.0**-7, atol=2.0**-7 * grad_ref.abs().max().item())

@pytest.mark.parametrize("norm", [True, False])
def test_reference_is_the_model_loss(norm):
    model = mae_vit_tiny_patch8(norm_pix_loss=norm)
    pred, imgs, mask, _ = _inputs(2, 8, 8, 0.75, F32, 50 + norm)
    expected = model.to(DEVICE).forward_loss(imgs, pred, mask)
    torch.testing.assert_close(masked_loss_reference(pred, imgs, mask, 8, norm), expected, rtol=0, atol=0)
    torch.testing.assert_close(masked_loss(pred, imgs, mask, 8, norm, backend="triton"), expected, rtol=1e-5, atol=0)


def test_backend_dispatch_and_errors():
    pred, imgs, mask, _ = _inputs(1, 16, 7, 0.75, F32, 60)
    ref = masked_loss_reference(pred, imgs, mask, 16, True)
    assert torch.equal(masked_loss(pred, imgs, mask, 16, True, backend="torch"), ref)
    torch.testing.assert_close(masked_loss(pred, imgs, mask, 16, True), ref)
    with pytest.raises(ValueError, match="backend"):
        masked_loss(pred, imgs, mask, 16, True, backend="nope")
    with pytest.raises(ValueError, match="shapes"):
        masked_loss(pred[:, :10], imgs, mask, 16, True, backend="triton")


def test_torch_compile_no_graph_breaks():
    p = 16
    pred, imgs, mask, ids_masked = _inputs(1, p, 7, 0.75, F32, 70)
    pred.requires_grad_()

    def f(pred, imgs, mask):
        return masked_loss(pred * 1.5, imgs, mask, p, True, backend="triton")

    explain = torch._dynamo.explain(f)(pred, imgs, mask)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    loss = torch.compile(f, backend="aot_eager", fullgraph=True)(pred, imgs, mask)
    (grad,) = torch.autograd.grad(loss, pred)
    loss_ref = f(pred, imgs, mask)
    (grad_ref,) = torch.autograd.grad(loss_ref, pred)
    torch.testing.assert_close(loss, loss_ref)
    torch.testing.assert_close(grad, grad_ref)


def test_lanes_busy_at_headline_patch_sizes():
    """A patch row is a power-of-two main part plus a power-of-two tail: at P = 588 (ViT-H/14) over
    90% of the lanes hold a pixel (BLOCK_P = 1024 left 43% idle), at P = 768 all of them."""
    from mae_fast.kernels.masked_loss import loss_config

    for P, busy in ((588, 0.9), (768, 1.0), (192, 1.0), (64, 1.0)):
        cfg = loss_config(P)
        assert cfg["BLOCK_A"] + cfg["BLOCK_B"] >= P and (cfg["BLOCK_B"] == 0) == (cfg["BLOCK_A"] == P)
        assert P / (cfg["BLOCK_A"] + cfg["BLOCK_B"]) >= busy, (P, cfg)


def test_kernels_compile_for_h100():
    """The GPU launches compile for sm_90: bf16 / fp16 predictions, norm-pix on/off, full and
    masked-only rows, as the launch code builds them (the training case is in test_kernel_resources)."""
    proc = compile_for_h100("""
        ml = importlib.import_module("mae_fast.kernels.masked_loss")
        meta = dict(device="meta")
        imgs, mask = torch.empty(2, 3, 224, 224, **meta), torch.empty(2, 256, **meta)
        ids = torch.empty(2, 256, dtype=torch.int64, **meta)[:, 64:]
        grad_loss = torch.empty((), **meta)
        for dt, norm, sub in ((torch.float16, True, True), (torch.bfloat16, False, False), (torch.float32, True, True)):
            pred = torch.empty(2, 1 + (192 if sub else 256), 588, dtype=dt, **meta)[:, 1:]
            with recording_launches(execute=False) as rec:
                ml._forward(pred, imgs, mask, ids if sub else None, 14, norm)
                ml._backward_kernel(grad_loss, pred, imgs, mask, ids if sub else None, 14, norm)
            assert [lc.name for lc in rec] == ["_loss_fwd_kernel", "_loss_bwd_kernel"]
            for lc in rec:
                compile_launch(lc)
        # P = 256, a power of two: no tail part
        pred = torch.empty(2, 65, 256, dtype=torch.bfloat16, **meta)[:, 1:]
        imgs1, mask1 = torch.empty(2, 1, 128, 128, **meta), torch.empty(2, 64, **meta)
        with recording_launches(execute=False) as rec:
            ml._forward(pred, imgs1, mask1, None, 16, True)
            ml._backward_kernel(grad_loss, pred, imgs1, mask1, None, 16, True)
        assert [lc.args["BLOCK_B"] for lc in rec] == [0, 0]
        for lc in rec:
            compile_launch(lc)
    """)
    assert proc.returncode == 0, proc.stderr[-4000:]
