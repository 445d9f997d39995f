"""End to end: the model with kernel_backend="triton" (CPU interpreter) equals "torch"."""
import os

import pytest
import torch

from conftest import random_images, random_noise
from mae_fast import mae_vit_tiny_patch8

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="Triton kernels need a GPU or TRITON_INTERPRET=1")


@pytest.mark.parametrize("norm_pix,ratio", [(True, 0.75), (False, 0.5)])
def test_triton_backend_equals_torch(norm_pix, ratio):
    torch.manual_seed(0)
    m = mae_vit_tiny_patch8(img_size=32, norm_pix_loss=norm_pix, depth=2, decoder_depth=1).to(DEVICE)
    imgs, noise = random_images(2, 32, seed=41).to(DEVICE), random_noise(2, 16, seed=42).to(DEVICE)
    results = {}
    for backend in ("torch", "triton"):
        m.zero_grad(set_to_none=True)
        m.set_kernel_backend(backend)
        loss, pred, mask = m(imgs, mask_ratio=ratio, noise=noise)
        loss.backward()
        results[backend] = (loss.detach(), pred.detach(), mask,
                            {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad})
    (l0, p0, m0, g0), (l1, p1, m1, g1) = results["torch"], results["triton"]
    assert torch.equal(m0, m1)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p1, p0, rtol=1e-4, atol=1e-5)
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("patch", [8, 7])
def test_triton_backend_equals_torch_under_bf16_autocast(patch):
    """As training runs it: bf16 autocast (bf16 GEMMs, bf16 patch-embed output, fp32 positions);
    patch 7 takes the padded-row path of the patch embedding and a loss row with a tail part."""
    torch.manual_seed(1)
    m = mae_vit_tiny_patch8(img_size=4 * patch, patch_size=patch, norm_pix_loss=True, depth=2,
                            decoder_depth=1).to(DEVICE)
    imgs, noise = random_images(2, 4 * patch, seed=43).to(DEVICE), random_noise(2, 16, seed=44).to(DEVICE)
    results = {}
    for backend in ("torch", "triton"):
        m.zero_grad(set_to_none=True)
        m.set_kernel_backend(backend)
        with torch.autocast(imgs.device.type, dtype=torch.bfloat16):
            loss, pred, _ = m(imgs, mask_ratio=0.75, noise=noise)
        loss.backward()
        results[backend] = (loss.detach(), pred.detach().float(),
                            {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad})
    (l0, p0, g0), (l1, p1, g1) = results["torch"], results["triton"]
    assert torch.isfinite(l1) and torch.isfinite(p1).all()
    torch.testing.assert_close(l1, l0, rtol=1e-3, atol=1e-5)
    assert ((p1 - p0).norm() / p0.norm()).item() < 1e-2  # bf16 roundings in different places
    for n in g0:
        err = ((g1[n].double() - g0[n].double()).norm() / g0[n].double().norm().clamp_min(1e-12)).item()
        assert err < 3e-2, (n, err)


def test_kernel_backend_switch_validates():
    m = mae_vit_tiny_patch8()
    assert m.kernel_backend == "auto"
    with pytest.raises(ValueError, match="unknown kernel_backend 'cuda'"):
        m.set_kernel_backend("cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_selftest_passes_under_the_interpreter(dtype):
    from mae_fast.kernels.selftest import _run_checks

    assert _run_checks(torch.device(DEVICE), 14, 40, 24, dtype) == {
        "patch_embed_gather": None, "unshuffle_mask_tokens": None, "masked_loss": None}


def test_selftest_checks_the_dtype_the_run_computes_in(monkeypatch):
    """An op whose fp32 kernel fails is still used by a bf16 run, and a fp32 run falls back (each dtype is
    another compiled kernel; the fused patch embedding has other tiles in fp32)."""
    import mae_fast.kernels.selftest as st

    def fails_in_fp32(device, g, p, D, Dd, dtype):
        if dtype == torch.float32:
            raise AssertionError("output 0 differs from the reference")
    monkeypatch.setitem(st.CHECKS, "masked_loss", fails_in_fp32)
    monkeypatch.setattr(st, "_RESULTS", {})
    m = mae_vit_tiny_patch8()
    assert m.check_kernels(force=True, dtype=torch.bfloat16) == "auto" and m.kernel_failures == {}
    assert m.check_kernels(force=True, dtype=torch.float32) == "torch"
    assert m.kernel_failures == {"masked_loss": "AssertionError: output 0 differs from the reference"}


def test_failing_kernel_falls_back_to_torch_with_a_warning(monkeypatch, caplog):
    import mae_fast.kernels.selftest as st

    def broken(device, g, p, D, Dd, dtype):
        raise RuntimeError("out of resource: shared memory")
    monkeypatch.setitem(st.CHECKS, "unshuffle_mask_tokens", broken)
    monkeypatch.setattr(st, "_RESULTS", {})
    m = mae_vit_tiny_patch8()
    assert m.check_kernels() == "auto"  # CPU: nothing to check, the references run anyway
    assert m.check_kernels(force=True) == "torch"
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "unshuffle_mask_tokens: RuntimeError: out of resource: shared memory" in msg
    assert "patch_embed_gather:" not in msg
