"""patch_embed_gather: Triton (CPU interpreter without a GPU, the GPU launch's tiles) against the
PyTorch reference, and the reference against the official conv-then-gather."""
import os

if not (os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl")):
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported


import pytest
import torch

from mae_fast.kernels import backend_choices, patch_embed_gather, patch_embed_gather_reference
from mae_fast.kernels._utils import masking_reference, patchify_reference
from kernel_helpers import DEVICE, close, compile_for_h100

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("MAE_FAST_KERNELS_POISON", "1")  # outputs start as NaN: unwritten elements fail


def _inputs(N, p, grid, C, D, ratio, dtype, pos_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    L = grid * grid
    imgs = torch.randn(N, C, grid * p, grid * p, generator=g).to(DEVICE, dtype)
    ids_keep = masking_reference(torch.rand(N, L, generator=g), ratio).ids_keep.to(DEVICE)  # a view, as the model's
    weight = (torch.randn(D, C * p * p, generator=g) * 0.05).to(DEVICE, dtype)
    bias = torch.randn(D, generator=g).to(DEVICE, dtype)
    pos = torch.randn(L, D, generator=g).to(DEVICE, pos_dtype)
    return imgs, ids_keep, weight, bias, pos


CASES = [
    # N, p, grid, C, D, ratio, dtype, pos dtype
    (2, 16, 5, 3, 1024, 0.75, torch.float32, torch.float32),    # ViT-L/16: P 768, D 1024
    (1, 14, 6, 3, 1280, 0.75, torch.bfloat16, torch.float32),   # ViT-H/14: P 588 (rows padded), D 1280, batch 1
    (2, 14, 7, 3, 80, 0.5, torch.float32, torch.float32),       # P 588, width not a multiple of BLOCK_N
    (1, 16, 14, 3, 96, 0.5, torch.float16, torch.float16),      # L 196
    (3, 4, 5, 3, 40, 0.6, torch.bfloat16, torch.bfloat16),      # P 48: p a power of two, P not a multiple of BLOCK_K
    (1, 7, 3, 1, 24, 0.5, torch.float32, torch.float32),        # one channel, p 7
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"N{c[0]}-p{c[1]}-C{c[3]}-L{c[2]**2}-D{c[4]}-r{c[5]}-{c[6]}")
def test_forward_backward_matches_reference(case):
    N, p, grid, C, D, ratio, dtype, pos_dtype = case
    seed = 1000 + CASES.index(case)
    imgs, ids_keep, weight, bias, pos = _inputs(N, p, grid, C, D, ratio, dtype, pos_dtype, seed)
    leaves = [t.requires_grad_() for t in (imgs, weight, bias, pos)]

    ref = patch_embed_gather_reference(imgs, ids_keep, weight, bias, pos, p)
    assert ref.dtype == dtype  # the GEMM dtype, not the position table's
    for impl in ("fused", "gemm"):
        out = patch_embed_gather(imgs, ids_keep, weight, bias, pos, p, backend="triton", impl=impl)
        assert out.dtype == dtype, impl
        close(out, ref, TOL[dtype], f"forward ({impl})")

    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, out.dtype)
    grads = torch.autograd.grad(out, leaves, grad_out)
    grads_ref = torch.autograd.grad(ref, leaves, grad_out)
    for name, a, b, leaf in zip(("imgs", "weight", "bias", "pos"), grads, grads_ref, leaves):
        assert a.dtype == leaf.dtype, name
        close(a, b, TOL[dtype], f"grad {name}")

    # the image gradient is exactly zero at masked patches
    kept = torch.zeros(N, grid * grid, dtype=torch.bool, device=DEVICE)
    kept.scatter_(1, ids_keep, True)
    assert (patchify_reference(grads[0], p)[~kept] == 0).all()


@pytest.mark.parametrize("p,C,dtype", [(14, 3, torch.float64), (16, 3, torch.float32), (7, 1, torch.float64)])
def test_reference_is_conv_then_gather(p, C, dtype):
    """The reference, with the conv weight viewed in its own (c, py, px) order, is the official
    embed-all-patches conv, + positions, then the gather of the kept rows."""
    torch.manual_seed(7)
    conv = torch.nn.Conv2d(C, 48, p, p).to(dtype)
    grid, N = 4, 2
    imgs = torch.randn(N, C, grid * p, grid * p, dtype=dtype)
    ids_keep = torch.argsort(torch.rand(N, grid * grid), dim=1)[:, :5]
    pos = torch.randn(grid * grid, 48, dtype=dtype)
    full = conv(imgs).flatten(2).transpose(1, 2) + pos
    expect = torch.gather(full, 1, ids_keep[..., None].expand(-1, -1, 48))
    got = patch_embed_gather_reference(imgs, ids_keep, conv.weight.reshape(48, -1), conv.bias, pos, p)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, expect, rtol=tol, atol=tol)


def test_partial_requires_grad_and_autocast():
    """Only weight/bias need grad (pretraining: pos frozen, images data); bf16 autocast like F.linear,
    output in bf16 (the float32 position table does not promote it)."""
    p = 16
    imgs, ids_keep, weight, bias, pos = _inputs(2, p, 7, 3, 64, 0.75, torch.float32, torch.float32, 77)
    weight.requires_grad_()
    bias.requires_grad_()
    dev = imgs.device.type
    with torch.autocast(dev, dtype=torch.bfloat16):
        out = patch_embed_gather(imgs, ids_keep, weight, bias, pos, p, backend="triton")
        ref = patch_embed_gather(imgs, ids_keep, weight, bias, pos, p, backend="torch")
    assert out.dtype == ref.dtype == torch.bfloat16
    close(out, ref, TOL[torch.bfloat16], "autocast forward")
    gw, gb = torch.autograd.grad(out.float().sum(), (weight, bias))
    rw, rb = torch.autograd.grad(ref.float().sum(), (weight, bias))
    assert gw.dtype == weight.dtype
    close(gw, rw, TOL[torch.bfloat16], "autocast grad weight")
    close(gb, rb, TOL[torch.bfloat16], "autocast grad bias")


def test_backend_dispatch_and_errors():
    imgs, ids_keep, weight, bias, pos = _inputs(1, 16, 7, 3, 32, 0.75, torch.float32, torch.float32, 5)
    a = patch_embed_gather(imgs, ids_keep, weight, bias, pos, 16, backend="torch")
    b = patch_embed_gather(imgs, ids_keep, weight, bias, pos, 16)  # auto
    assert torch.equal(a, patch_embed_gather_reference(imgs, ids_keep, weight, bias, pos, 16))
    close(b, a, 1e-4, "auto")  # CPU: the reference itself; CUDA: the Triton kernel
    with pytest.raises(ValueError, match="backend"):
        patch_embed_gather(imgs, ids_keep, weight, bias, pos, 16, backend="cuda")
    with pytest.raises(ValueError, match="impl must be one of"):
        patch_embed_gather(imgs, ids_keep, weight, bias, pos, 16, backend="triton", impl="cublas")
    with pytest.raises(ValueError, match=r"weight \(32, 588\) \(want \(D, 768\)\)"):
        patch_embed_gather(imgs, ids_keep, weight[:, :588], bias, pos, 16, backend="triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU behaviour of the timed choice")
def test_auto_impl_is_not_timed_on_cpu():
    """On CPU (interpreter) "auto" runs the fused kernel and records no timed choice."""
    imgs, ids_keep, weight, bias, pos = _inputs(1, 16, 5, 3, 48, 0.75, torch.float32, torch.float32, 8)
    auto = patch_embed_gather(imgs, ids_keep, weight, bias, pos, 16, backend="triton", impl="auto")
    fused = patch_embed_gather(imgs, ids_keep, weight, bias, pos, 16, backend="triton", impl="fused")
    assert torch.equal(auto, fused)
    assert "patch_embed_gather" not in backend_choices()


def test_timed_choice_is_cached_logged_and_visible(monkeypatch, caplog):
    """On CUDA the forward is timed once per shape key: the fastest candidate runs, later calls reuse
    the cached choice without timing, the choice is logged and listed by backend_choices()."""
    import logging

    import mae_fast.kernels._utils as ku

    timed = []
    monkeypatch.setattr(ku, "_CHOICES", {})
    monkeypatch.setattr(ku, "_median_ms", lambda fn: timed.append(fn) or {0: 2.0, 1: 0.5}[len(timed) - 1])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    cands = {"fused": lambda: torch.zeros(1), "gemm": lambda: torch.ones(1)}
    with caplog.at_level(logging.INFO, logger="mae_fast.kernels"):
        first = ku.choose_by_timing("patch_embed_gather", "N2 K4", cands, torch.device("cuda"))
        again = ku.choose_by_timing("patch_embed_gather", "N2 K4", cands, torch.device("cuda"))
    assert torch.equal(first, torch.ones(1)) and torch.equal(again, torch.ones(1)) and len(timed) == 2
    assert backend_choices() == {"patch_embed_gather": {"N2 K4": "gemm"}}
    assert "patch_embed_gather N2 K4: using gemm (fused 2.000 ms, gemm 0.500 ms)" in caplog.text
    # on CPU nothing is timed and nothing cached: the first candidate runs
    assert torch.equal(ku.choose_by_timing("patch_embed_gather", "N1", cands, torch.device("cpu")), torch.zeros(1))
    assert len(timed) == 2 and "N1" not in backend_choices()["patch_embed_gather"]


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
    close(loss, loss_ref, 1e-5, "compiled loss")
    close(gw, gw_ref, 1e-5, "compiled grad")


def test_kernels_compile_for_h100():
    """The GPU launches (fp16 wgmma and fp32 IEEE tl.dot; gather; image-gradient scatter) compile for
    sm_90 as the launch code builds them at ViT-H/14 (bf16 is covered by test_kernel_resources)."""
    proc = compile_for_h100("""
        pe = importlib.import_module("mae_fast.kernels.patch_embed_gather")
        meta = dict(device="meta")
        for wdt in (torch.float16, torch.float32):
            imgs = torch.empty(2, 3, 224, 224, **meta)
            ids = torch.empty(2, 256, dtype=torch.int64, **meta)[:, :64]
            w, b = torch.empty(1280, 588, dtype=wdt, **meta), torch.empty(1280, dtype=wdt, **meta)
            pos = torch.empty(1, 257, 1280, **meta)[0, 1:]
            with recording_launches(execute=False) as rec:
                pe._forward_fused(imgs, ids, w, b, pos, 14)
                pe._forward_gemm(imgs, ids, w, b, pos, 14)
                pe._scatter_grad(torch.empty(128, 588, dtype=wdt, **meta), ids, imgs, 14)
            assert [lc.name for lc in rec] == ["_pe_fwd_kernel", "_pe_gather_kernel", "_pe_scatter_kernel"], rec
            for lc in rec:
                k = compile_launch(lc)
                assert lc.name != "_pe_fwd_kernel" or wdt == torch.float32 or "wgmma" in k.asm["ptx"]
    """)
    assert proc.returncode == 0, proc.stderr[-4000:]
