"""bench/kernel_resources.py: the sm_90 builds of every kernel at the headline shapes spill nothing, and
the launches it builds on meta tensors are the launches a real training step makes."""
import json
import os
import subprocess
import sys
from collections import Counter

if not (os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl")):
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

import pytest
import torch

from conftest import random_images, random_noise
from mae_fast import mae_vit_tiny_patch8
from mae_fast.bench.kernel_resources import SHAPES, model_launches
from mae_fast.kernels._utils import arg_specialization, launch_signature, recording_launches

H100_SHARED_BYTES = 227 * 1024  # the most dynamic shared memory one sm_90 program may use


def _run_script(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "mae_fast.bench.kernel_resources", *args], env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # builds every kernel for sm_90 at the ViT-B/L/H shapes
def test_no_spills_at_headline_shapes():
    """Every kernel of a training step (and the image-gradient scatter), bf16, as launched at ViT-B/16,
    L/16, H/14 at 224 px and H/14 at 448 px: no register spills, within the register file and the
    shared memory of one sm_90 program."""
    pytest.importorskip("triton")
    proc = _run_script("--json")
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(proc.stdout)
    kernels = {"_pe_fwd_kernel", "_pe_gather_kernel", "_pe_scatter_kernel", "_unshuffle_fwd_kernel",
               "_unshuffle_bwd_kernel", "_loss_fwd_kernel", "_loss_bwd_kernel"}
    assert {(r["shape"], r["kernel"]) for r in rows} == {(s, k) for s in SHAPES for k in kernels}
    for r in rows:
        where = f"{r['kernel']} at {r['shape']} ({r['tiles']})"
        assert r["spill_store_bytes"] == 0 and r["spill_load_bytes"] == 0, f"{where} spills: {r}"
        assert 0 < r["registers"] <= 255, where
        assert r["shared_bytes"] <= H100_SHARED_BYTES, where
    assert proc.stderr == ""


@pytest.mark.slow  # builds every kernel for sm_90 in each dtype
@pytest.mark.parametrize("dtype", ["fp16", "fp32", "fp64"])
def test_every_compute_dtype_builds_without_spills(dtype):
    """A run without bf16 autocast builds other kernels (fp32 / fp64: other patch-embedding tiles and sums):
    each builds for sm_90, without spills (fp64 did not build at all before its float64 accumulator)."""
    pytest.importorskip("triton")
    proc = _run_script("--json", "--dtype", dtype, "--shapes", "vit_h14_224", "--batch", "8")
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(proc.stdout)
    assert len(rows) == 7 and {r["dtype"] for r in rows} == {dict(fp16="float16", fp32="float32", fp64="float64")[dtype]}
    for r in rows:
        assert r["spill_store_bytes"] == 0 and r["spill_load_bytes"] == 0, r
        assert r["shared_bytes"] <= H100_SHARED_BYTES, r
    assert proc.stderr == ""


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="checks the refusal under the interpreter")
def test_refuses_the_interpreter(capsys):
    from mae_fast.bench.kernel_resources import main

    with pytest.raises(SystemExit) as exc:
        main(["--shapes", "vit_b16_224"])
    assert exc.value.code == 2 and "TRITON_INTERPRET=1 is set" in capsys.readouterr().err


def _key(lc):
    return lc.name, tuple(sorted((k, repr(v)) for k, v in launch_signature(lc).items())), lc.grid


def test_launches_are_those_of_a_training_step():
    """A tiny MAE's forward + backward under bf16 autocast with the Triton kernels records exactly the
    launches (kernels, grids, argument types, divisibility, constexprs) that ``model_launches`` builds
    on meta tensors for its config: the script measures what training runs. Patch 7 (P = 147) makes
    the layouts tell: the model's ``pred[:, 1:]`` view is not 16-byte aligned, rows need padding."""
    torch.manual_seed(0)
    model = mae_vit_tiny_patch8(img_size=56, patch_size=7, norm_pix_loss=True, depth=1, decoder_depth=1)
    model.set_kernel_backend("triton")
    N = 2
    imgs = random_images(N, model.config.img_size, seed=3)
    noise = random_noise(N, model.config.num_patches, seed=4)
    with recording_launches(execute=True) as rec:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _, _ = model(imgs, mask_ratio=0.75, noise=noise)
        loss.backward()
    built = [lc for _, in_training, lc in model_launches(model.config, N, 0.75) if in_training]
    assert Counter(map(_key, rec)) == Counter(map(_key, built))
    assert {lc.name for lc in rec} == {"_pe_fwd_kernel", "_pe_gather_kernel", "_unshuffle_fwd_kernel",
                                       "_unshuffle_bwd_kernel", "_loss_fwd_kernel", "_loss_bwd_kernel"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compares with the runtime's build on a GPU")
def test_report_is_the_runtime_build_on_cuda():
    """On a GPU: a ViT-H/14 448-px training step (batch 32, bf16 autocast; depth does not change the
    kernels) launches kernels whose runtime builds have the registers and local memory (spills) that
    the ahead-of-time report gives for the same launches."""
    from mae_fast import mae_vit_huge_patch14
    from mae_fast.bench.kernel_resources import fresh_build, measure

    model = mae_vit_huge_patch14(img_size=448, norm_pix_loss=True, depth=1, decoder_depth=1).cuda()
    model.set_kernel_backend("triton")
    imgs = random_images(32, 448, seed=5).cuda()
    with recording_launches(execute=True) as rec:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _, _ = model(imgs, mask_ratio=0.75)
        loss.backward()
    assert {lc.name for lc in rec} >= {"_pe_fwd_kernel", "_loss_fwd_kernel", "_unshuffle_bwd_kernel"}
    with fresh_build():
        for lc in rec:
            aot = measure(lc, torch.cuda.get_device_capability()[0] * 10 + torch.cuda.get_device_capability()[1])
            lc.compiled._init_handles()
            assert lc.compiled.n_regs == aot["registers"], (lc.name, lc.compiled.n_regs, aot)
            assert lc.compiled.n_spills * 4 == aot["stack_bytes"], (lc.name, lc.compiled.n_spills, aot)


def test_specialization_rule_is_tritons():
    """``arg_specialization`` agrees with the Triton runtime's own rule on this Triton version."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend
    except ImportError:
        pytest.skip("this Triton has no native_specialize_impl to compare with")
    x = torch.empty(8, 588, dtype=torch.bfloat16)
    values = [x, x[1:], x[:, 8:], torch.empty(3, dtype=torch.int64)[1:], torch.empty(4, dtype=torch.float32),
              torch.empty(2, dtype=torch.float16), torch.empty(2, dtype=torch.int32),
              1, 16, 17, 0, -16, 588, 768, 2**31, 2**40 + 16, None, 2.5, True, False]
    for v in values:
        ours = arg_specialization(v)
        theirs = native_specialize_impl(BaseBackend, v, False, True, True)
        assert ours == tuple(theirs), (v if not isinstance(v, torch.Tensor) else (v.dtype, v.data_ptr() % 16), ours, theirs)
