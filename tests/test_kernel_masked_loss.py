"""masked_loss: Triton (CPU interpreter without a GPU) against the PyTorch reference and the model."""
import os

if not (os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl")):
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported


import pytest
import torch

from mae_fast import mae_vit_tiny_patch8
from mae_fast.kernels import masked_loss, masked_loss_reference
from kernel_helpers import compile_for_h100

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("MAE_FAST_KERNELS_POISON", "1")  # outputs start as NaN: unwritten elements fail


def _inputs(N, p, grid, ratio, dtype, seed, C=3):
    g = torch.Generator().manual_seed(seed)
    L = grid * grid
    K = int(L * (1 - ratio))
    imgs = torch.randn(N, C, grid * p, grid * p, generator=g).to(DEVICE)
    ids_shuffle = torch.argsort(torch.rand(N, L, generator=g), dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = (ids_restore >= K).float().to(DEVICE)
    pred = torch.randn(N, L, p * p * C, generator=g).to(DEVICE, dtype)
    return pred, imgs, mask, ids_shuffle[:, K:].to(DEVICE)


CASES = [
    # N, p, grid, ratio, pred dtype, norm_pix_loss, masked-only predictions
    (2, 16, 7, 0.75, F32, True, False),     # L 49, P 768
    (1, 16, 14, 0.5, BF16, True, True),     # L 196
    (1, 16, 16, 0.9, F16, False, False),    # L 256
    (1, 14, 32, 0.75, BF16, True, True),    # L 1024, P 588
    (1, 14, 32, 0.75, F32, True, False),
    (2, 14, 14, 0.75, F32, False, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"N{c[0]}-p{c[1]}-L{c[2]**2}-r{c[3]}-{c[4]}-norm{c[5]}-sub{c[6]}")
def test_forward_backward_matches_reference(case):
    N, p, grid, ratio, dtype, norm, sub = case
    seed = 3000 + CASES.index(case)
    pred, imgs, mask, ids_masked = _inputs(N, p, grid, ratio, dtype, seed)
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


def test_kernels_compile_for_h100():
    """The GPU path compiles for sm_90: bf16 predictions, norm-pix on/off, full and masked-only rows."""
    proc = compile_for_h100("""
        m = importlib.import_module("mae_fast.kernels.masked_loss")
        for norm, ids in ((True, False), (True, True), (False, False)):
            c = dict(PS=14, C=3, NORM=norm, HAS_IDS=ids, BLOCK_R=4, BLOCK_P=1024)
            compile_for_gpu(m._loss_fwd_kernel, dict(pred_ptr="*bf16", img_ptr="*fp32", mask_ptr="*fp32",
                            ids_ptr="*i64", part_ptr="*fp32"), c, dict(num_warps=4))
            compile_for_gpu(m._loss_bwd_kernel, dict(pred_ptr="*bf16", img_ptr="*fp32", mask_ptr="*fp32",
                            ids_ptr="*i64", scale_ptr="*fp32", grad_ptr="*bf16"), c, dict(num_warps=4))
    """)
    assert proc.returncode == 0, proc.stderr[-4000:]

