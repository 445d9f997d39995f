"""patch_embed_gather: Triton (CPU interpreter without a GPU) against the PyTorch reference."""
import os

if not (os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl")):
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported


import pytest
import torch

from mae_fast.kernels import patch_embed_gather, patch_embed_gather_reference
from mae_fast.kernels._utils import patchify_reference
from kernel_helpers import compile_for_h100

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("MAE_FAST_KERNELS_POISON", "1")  # outputs start as NaN: unwritten elements fail


def _close(a: torch.Tensor, b: torch.Tensor, tol: float, what: str) -> None:
    assert a.shape == b.shape, what
    assert torch.isfinite(a).all(), f"{what}: non-finite values (unwritten output?)"
    err = (a.double() - b.double()).abs().max().item()
    scale = b.double().abs().max().item()
    assert err <= tol * scale + 1e-6, f"{what}: max error {err:.3g} vs scale {scale:.3g}"


def _inputs(N, p, grid, C, D, ratio, dtype, pos_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    L = grid * grid
    K = int(L * (1 - ratio))
    imgs = torch.randn(N, C, grid * p, grid * p, generator=g).to(DEVICE, dtype)
    ids_keep = torch.argsort(torch.rand(N, L, generator=g), dim=1)[:, :K].to(DEVICE)
    weight = (torch.randn(D, p * p * C, generator=g) * 0.05).to(DEVICE, dtype)
    bias = torch.randn(D, generator=g).to(DEVICE, dtype)
    pos = torch.randn(L, D, generator=g).to(DEVICE, pos_dtype)
    return imgs, ids_keep, weight, bias, pos


CASES = [
    # N, p, grid, C, D, ratio, dtype, pos dtype
    (2, 16, 7, 3, 80, 0.75, torch.float32, torch.float32),      # L 49, P 768
    (1, 16, 14, 3, 96, 0.5, torch.bfloat16, torch.float32),     # L 196
    (1, 16, 16, 3, 72, 0.9, torch.float16, torch.float16),      # L 256
    (1, 14, 32, 3, 80, 0.75, torch.bfloat16, torch.bfloat16),   # L 1024, P 588
    (2, 14, 7, 3, 48, 0.5, torch.float32, torch.float32),       # P 588
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"N{c[0]}-p{c[1]}-L{c[2]**2}-D{c[4]}-r{c[5]}-{c[6]}")
def test_forward_backward_matches_reference(case):
    N, p, grid, C, D, ratio, dtype, pos_dtype = case
    seed = 1000 + CASES.index(case)
    imgs, ids_keep, weight, bias, pos = _inputs(N, p, grid, C, D, ratio, dtype, pos_dtype, seed)
    leaves = [t.requires_grad_() for t in (imgs, weight, bias, pos)]

    out = patch_embed_gather(imgs, ids_keep, weight, bias, pos, p, backend="triton")
    ref = patch_embed_gather_reference(imgs, ids_keep, weight, bias, pos, p)
    assert out.dtype == ref.dtype == torch.promote_types(dtype, pos_dtype)
    _close(out, ref, TOL[dtype], "forward")

    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, out.dtype)
    grads = torch.autograd.grad(out, leaves, grad_out)
    grads_ref = torch.autograd.grad(ref, leaves, grad_out)
    for name, a, b, leaf in zip(("imgs", "weight", "bias", "pos"), grads, grads_ref, leaves):
        assert a.dtype == leaf.dtype, name
        _close(a, b, TOL[dtype], f"grad {name}")

    # the image gradient is exactly zero at masked patches
    kept = torch.zeros(N, grid * grid, dtype=torch.bool, device=DEVICE)
    kept.scatter_(1, ids_keep, True)
    assert (patchify_reference(grads[0], p)[~kept] == 0).all()


def test_partial_requires_grad_and_autocast():
    """Only weight/bias need grad (pretraining: pos frozen, images data); bf16 autocast like F.linear."""
    p = 16
    imgs, ids_keep, weight, bias, pos = _inputs(2, p, 7, 3, 64, 0.75, torch.float32, torch.float32, 77)
    weight.requires_grad_()
    bias.requires_grad_()
    dev = imgs.device.type
    with torch.autocast(dev, dtype=torch.bfloat16):
        out = patch_embed_gather(imgs, ids_keep, weight, bias, pos, p, backend="triton")
        ref = patch_embed_gather(imgs, ids_keep, weight, bias, pos, p, backend="torch")
    assert out.dtype == ref.dtype == torch.float32
    _close(out, ref, TOL[torch.bfloat16], "autocast forward")
    gw, gb = torch.autograd.grad(out.sum(), (weight, bias))
    rw, rb = torch.autograd.grad(ref.sum(), (weight, bias))
    assert gw.dtype == weight.dtype
    _close(gw, rw, TOL[torch.bfloat16], "autocast grad weight")
    _close(gb, rb, TOL[torch.bfloat16], "autocast grad bias")


def test_backend_dispatch():
    imgs, ids_keep, weight, bias, pos = _inputs(1, 16, 7, 3, 32, 0.75, torch.float32, torch.float32, 5)
    a = patch_embed_gather(imgs, ids_keep, weight, bias, pos, 16, backend="torch")
    b = patch_embed_gather(imgs, ids_keep, weight, bias, pos, 16)  # auto
    assert torch.equal(a, patch_embed_gather_reference(imgs, ids_keep, weight, bias, pos, 16))
    _close(b, a, 1e-4, "auto")  # CPU: the reference itself; CUDA: the Triton kernel
    with pytest.raises(ValueError, match="backend"):
        patch_embed_gather(imgs, ids_keep, weight, bias, pos, 16, backend="cuda")


def test_torch_compile_no_graph_breaks():
    p = 16
    imgs, ids_keep, weight, bias, pos = _inputs(1, p, 7, 3, 48, 0.75, torch.float32, torch.float32, 9)
    weight.requires_grad_()

    def f(imgs, ids_keep, weight):
        return patch_embed_gather(imgs, ids_keep, weight, bias, pos, p, backend="triton").square().sum()

    explain = torch._dynamo.explain(f)(imgs, ids_keep, weight)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    loss = compiled(imgs, ids_keep, weight)
    (gw,) = torch.autograd.grad(loss, weight)
    loss_ref = f(imgs, ids_keep, weight)
    (gw_ref,) = torch.autograd.grad(loss_ref, weight)
    _close(loss, loss_ref, 1e-5, "compiled loss")
    _close(gw, gw_ref, 1e-5, "compiled grad")


def test_kernels_compile_for_h100():
    """The GPU path (bf16 / fp16 wgmma and fp32 IEEE tl.dot, gather, scatter) compiles for sm_90."""
    proc = compile_for_h100("""
        m = importlib.import_module("mae_fast.kernels.patch_embed_gather")
        for wdt, f32 in (("bf16", False), ("fp16", False), ("fp32", True)):
            types = dict(img_ptr="*fp32", ids_ptr="*i64", w_ptr="*" + wdt, b_ptr="*" + wdt,
                         pos_ptr="*fp32", out_ptr="*fp32")
            k = compile_for_gpu(m._pe_fwd_kernel, types, dict(PS=16, C=3, BLOCK_M=64, BLOCK_N=128,
                                BLOCK_K=64, DOT_F32=f32), dict(num_warps=4, num_stages=3))
            assert f32 or "wgmma" in k.asm["ptx"]
        compile_for_gpu(m._pe_gather_kernel, dict(img_ptr="*fp32", ids_ptr="*i64", out_ptr="*bf16"),
                        dict(PS=14, C=3, BLOCK_M=16, BLOCK_P=1024))
        compile_for_gpu(m._pe_scatter_kernel, dict(gp_ptr="*bf16", slot_ptr="*i32", gimg_ptr="*fp32"),
                        dict(PS=14, C=3, BLOCK_M=16, BLOCK_P=1024))
    """)
    assert proc.returncode == 0, proc.stderr[-4000:]

