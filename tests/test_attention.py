"""Attention backends agree with the plain reference, forward and backward, at MAE's head sizes
(64: ViT-B/L encoder, 80: ViT-H/14 encoder, 32: the 512-wide 16-head decoder); a forced SDPA kernel
is that kernel or an error; ``auto`` on CUDA times the candidates at a site's real shape."""
import logging

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import mae_fast.attention as attention
from mae_fast import mae_vit_tiny_patch8
from mae_fast.attention import ATTENTION_BACKENDS, BACKEND_NAMES, AttentionChoice, AttentionSite, describe_choice, \
    get_attention, math_attention, pick_attention_backend, xformers_available

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
#: SDPA kernels with CPU implementations (flash has one; cuDNN and memory-efficient are CUDA-only)
CPU_BACKENDS = ("sdpa", "sdpa_flash", "math")


def _backends(device):
    if device == "cpu":
        return list(CPU_BACKENDS)
    return [n for n in ATTENTION_BACKENDS if n != "xformers" or xformers_available()]


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
    ran = []
    for name in _backends(device):
        x = qkv32.to(dtype).clone().requires_grad_(True)
        try:
            out = ATTENTION_BACKENDS[name](x)
        except RuntimeError as e:  # a forced CUDA SDPA kernel without this dtype / shape (flash: no float32)
            if device == "cuda" and name.startswith("sdpa_") and "kernel" in str(e).lower():
                continue
            raise
        ran.append(name)
        assert out.shape == (2, 50, 4, head_dim) and out.dtype == dtype
        out.backward(grad_out.to(dtype))
        torch.testing.assert_close(out.double(), ref.detach(), **tol, msg=f"{name} forward")
        torch.testing.assert_close(x.grad.double(), ref_in.grad, **tol, msg=f"{name} backward")
    assert {"sdpa", "math"} <= set(ran) and (device == "cuda" or set(ran) == set(CPU_BACKENDS))


def test_math_is_the_official_formula():
    """timm's (the official code's) order: scores scaled after q k^T, softmax, then @ v."""
    qkv = torch.randn(2, 7, 3, 2, 16, dtype=torch.float64)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    want = (((q @ k.transpose(-2, -1)) * 16 ** -0.5).softmax(-1) @ v).transpose(1, 2)
    assert torch.equal(math_attention(qkv), want)


def test_forced_sdpa_kernel_errors_instead_of_falling_back():
    """sdpa_efficient / sdpa_cudnn have no CPU kernel: forcing one must fail, not silently run another."""
    x = torch.randn(1, 9, 3, 2, 16)
    for name in ("sdpa_efficient", "sdpa_cudnn"):
        with pytest.raises(RuntimeError):
            ATTENTION_BACKENDS[name](x)


def test_every_backend_is_selectable_by_name():
    assert BACKEND_NAMES == ("auto", "sdpa", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "math", "xformers")
    m = mae_vit_tiny_patch8()
    for name in BACKEND_NAMES[1:]:
        assert get_attention(name) is ATTENTION_BACKENDS[name]
        m.set_attn_backend(name)
        assert {blk.attn.attn_backend for blk in [*m.blocks, *m.decoder_blocks]} == {name}
        assert m.attn_choices["encoder"]["forced"] is True
    with pytest.raises(ValueError, match=r"unknown attn_backend 'flash'; choose one of \['auto', 'sdpa'"):
        m.set_attn_backend("flash")


def test_forced_sdpa_traces_without_graph_break():
    torch._dynamo.reset()
    counters.clear()
    fn = torch.compile(ATTENTION_BACKENDS["sdpa_flash"], backend="aot_eager")
    x = torch.randn(2, 9, 3, 2, 16, requires_grad=True)
    fn(x).sum().backward()
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", ["sdpa_efficient", "sdpa_cudnn"])
def test_forced_sdpa_stays_forced_when_compiled(name):
    """Compiled, a forced kernel is still the only one allowed: one without a CPU kernel fails as in eager, so a
    compiled benchmark row never silently measures another kernel than its record names."""
    torch._dynamo.reset()
    fn = torch.compile(ATTENTION_BACKENDS[name], backend="aot_eager")
    with pytest.raises(RuntimeError, match="No viable backend|No available kernel"):
        fn(torch.randn(1, 9, 3, 2, 16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="auto times backends on a CUDA device only")
def test_auto_times_candidates_at_the_site_shape_and_rejects_a_wrong_kernel(monkeypatch):
    attention._AUTO_CHOICE.clear()
    wrong = lambda qkv: attention.sdpa_attention(qkv) * 1.5  # noqa: E731 - fast and wrong
    monkeypatch.setitem(ATTENTION_BACKENDS, "sdpa_flash", wrong)
    site = AttentionSite(batch=8, tokens=50, heads=16, head_dim=64)
    choice = pick_attention_backend(torch.device("cuda"), torch.bfloat16, site)
    assert "relative error" in choice.rejected["sdpa_flash"]
    assert choice.backend in choice.timings_ms and choice.backend != "sdpa_flash"
    assert set(choice.timings_ms) | set(choice.rejected) >= {"sdpa_cudnn", "sdpa_efficient"}
    assert all(t > 0 for t in choice.timings_ms.values())
    assert pick_attention_backend(torch.device("cuda"), torch.bfloat16, site) is choice  # cached per shape
    attention._AUTO_CHOICE.clear()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="auto times backends on a CUDA device only")
def test_auto_picks_per_site_on_cuda():
    m = mae_vit_tiny_patch8().cuda()
    picked = m.set_attn_backend("auto", dtype=torch.bfloat16, batch=16)
    assert set(picked) == {"encoder", "decoder"}
    for site, blocks in (("encoder", m.blocks), ("decoder", m.decoder_blocks)):
        assert {blk.attn.attn_backend for blk in blocks} == {picked[site]}
        assert m.attn_choices[site]["timings_ms"], m.attn_choices[site]


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_the_model_builder_times_auto_attention_as_the_run_computes(monkeypatch, precision, dtype):
    """The one model builder (mae-pretrain, mae-bench, mae-profile and the memory planner build through it) asks
    ``auto`` for the dtype attention really runs in (fp32 without autocast: flash attention, the usual bf16
    winner, cannot run there), at the spec's batch and mask ratio."""
    from mae_fast.model_spec import ModelSpec, build_model
    from mae_fast.models_mae import MaskedAutoencoderViT

    asked = []
    real = MaskedAutoencoderViT.set_attn_backend

    def recording(self, attn_backend, dtype=None, batch=64, mask_ratio=0.75):
        asked.append((attn_backend, dtype, batch, mask_ratio))
        return real(self, attn_backend, dtype=dtype, batch=batch, mask_ratio=mask_ratio)

    monkeypatch.setattr(MaskedAutoencoderViT, "set_attn_backend", recording)
    spec = ModelSpec("mae_vit_tiny_patch8", 32, precision=precision, attn_backend="auto", batch_size=6, mask_ratio=0.5)
    model = build_model(spec, torch.device("cpu"))
    assert asked == [("auto", dtype, 6, 0.5)]
    assert set(model.attn_choices) == {"encoder", "decoder"}


def _auto_lines(caplog, monkeypatch, site_name="encoder") -> list:
    """The lines ``auto`` logs for a fresh CPU choice (nothing cached) at a small site."""
    monkeypatch.setattr(attention, "_AUTO_CHOICE", {})
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mae_fast.attention"):
        pick_attention_backend(torch.device("cpu"), torch.bfloat16, AttentionSite(4, 17, 2, 32), site_name=site_name)
    return [r.getMessage() for r in caplog.records if r.name == "mae_fast.attention"]


def test_auto_logs_its_cpu_choice_once_in_words(caplog, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert _auto_lines(caplog, monkeypatch) == [
        "attention (auto) for the encoder, batch 4 x 17 tokens x 2 heads x 32 dims, bf16 on cpu: sdpa "
        "(no CUDA device, nothing timed)"]
    with caplog.at_level(logging.INFO, logger="mae_fast.attention"):  # cached: not logged again
        pick_attention_backend(torch.device("cpu"), torch.bfloat16, AttentionSite(4, 17, 2, 32), site_name="encoder")
    assert len([r for r in caplog.records if r.name == "mae_fast.attention"]) == 1


def test_auto_logs_on_the_main_process_only(caplog, monkeypatch):
    """Under torchrun only rank 0 logs: from the process group once it exists, else from torchrun's RANK."""
    monkeypatch.setenv("RANK", "1")
    assert _auto_lines(caplog, monkeypatch) == []
    monkeypatch.setenv("RANK", "0")
    assert len(_auto_lines(caplog, monkeypatch)) == 1
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    for rank, lines in ((2, 0), (0, 1)):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None, r=rank: r)
        assert len(_auto_lines(caplog, monkeypatch)) == lines


def test_a_cuda_choice_in_words_names_timings_and_rejections():
    site = AttentionSite(batch=8, tokens=50, heads=16, head_dim=64)
    choice = AttentionChoice("sdpa_flash", site, "bfloat16", "cuda:0",
                             timings_ms={"sdpa_flash": 0.1234, "sdpa_cudnn": 0.2},
                             rejected={"sdpa_efficient": "relative error 0.5 vs math > 0.02"})
    assert describe_choice(choice, "decoder") == (
        "attention (auto) for the decoder, batch 8 x 50 tokens x 16 heads x 64 dims, bf16 on cuda:0: sdpa_flash "
        "(forward + backward timed: sdpa_flash 0.123 ms, sdpa_cudnn 0.200 ms; not usable: sdpa_efficient "
        "(relative error 0.5 vs math > 0.02))")
    none_ran = AttentionChoice("sdpa", site, "float32", "cuda:0", rejected={"sdpa_flash": "RuntimeError: no kernel"})
    assert describe_choice(none_ran) == (
        "attention (auto), batch 8 x 50 tokens x 16 heads x 64 dims, fp32 on cuda:0: sdpa (no candidate ran, plain "
        "sdpa; not usable: sdpa_flash (RuntimeError: no kernel))")
