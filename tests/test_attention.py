"""Attention backends agree with the plain reference, forward and backward, at MAE's head sizes
(64: ViT-B/L encoder, 80: ViT-H/14 encoder, 32: the 512-wide 16-head decoder)."""
import pytest
import torch

from mae_fast.attention import ATTENTION_BACKENDS, math_attention, xformers_available

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _backends(device):
    names = ["sdpa", "math"]
    if device == "cuda" and xformers_available():
        names.append("xformers")
    return names


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("head_dim", [32, 64, 80])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backends_match_reference(device, head_dim, dtype):
    g = torch.Generator().manual_seed(head_dim)
    qkv32 = torch.randn(2, 50, 3, 4, head_dim, generator=g).to(device)
    ref_in = qkv32.double().requires_grad_(True)
    ref = math_attention(ref_in)
    grad_out = torch.randn(ref.shape, generator=g).to(device)
    ref.backward(grad_out.double())
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
    for name in _backends(device):
        x = qkv32.to(dtype).clone().requires_grad_(True)
        out = ATTENTION_BACKENDS[name](x)
        assert out.shape == (2, 50, 4, head_dim) and out.dtype == dtype
        out.backward(grad_out.to(dtype))
        torch.testing.assert_close(out.double(), ref.detach(), **tol, msg=f"{name} forward")
        torch.testing.assert_close(x.grad.double(), ref_in.grad, **tol, msg=f"{name} backward")
