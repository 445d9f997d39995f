"""mae-bench on CPU: the official-equivalent variant, what every row records, fallback labels, records
that never put CPU figures in bench/results/, torch.compile of the model without graph breaks."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
import torch._dynamo

from conftest import random_images, random_noise
from mae_fast import create_model, mae_vit_tiny_patch8
from mae_fast.attention import AttentionSite, pick_attention_backend
from mae_fast.bench import records, throughput
from mae_fast.bench.official_mae import official_forward, official_model
from mae_fast.bench.throughput import PEAK_TFLOPS, add_ratios, kernels_in_use, main as bench_main


def test_official_variant_computes_the_official_way():
    torch.manual_seed(0)
    ours = create_model("mae_vit_tiny_patch8", norm_pix_loss=True)
    torch.manual_seed(0)
    off = official_model("mae_vit_tiny_patch8", norm_pix_loss=True)
    assert off.kernel_backend == "torch"
    assert {blk.attn.attn_backend for blk in [*off.blocks, *off.decoder_blocks]} == {"math"}
    imgs, noise = random_images(2, 64), random_noise(2, 64)
    a, b, ref = ours(imgs, noise=noise), off(imgs, noise=noise), official_forward(off, imgs, 0.75, noise)
    for x, y, z in zip(a, b, ref):
        assert torch.equal(y, z)  # the variant runs the one official reference, nothing of its parent class
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)  # and mae-fast computes the same


def test_official_grad_norm_is_the_total_two_norm():
    from mae_fast.bench.throughput import official_grad_norm

    m = mae_vit_tiny_patch8(norm_pix_loss=True)
    m(random_images(2, 64))[0].backward()
    params = list(m.parameters())
    want = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params if p.grad is not None]))
    torch.testing.assert_close(official_grad_norm(params), want, rtol=1e-5, atol=0)


def test_auto_attention_on_cpu_is_sdpa_per_site():
    site = AttentionSite(batch=4, tokens=17, heads=3, head_dim=32)
    choice = pick_attention_backend(torch.device("cpu"), torch.float32, site)
    assert choice.backend == "sdpa" and not choice.timings_ms
    m = mae_vit_tiny_patch8(attn_backend="auto")
    assert {blk.attn.attn_backend for blk in [*m.blocks, *m.decoder_blocks]} == {"sdpa"}
    picked = m.set_attn_backend("auto", batch=8, mask_ratio=0.75)
    assert picked == {"encoder": "sdpa", "decoder": "sdpa"}
    enc, dec = m.attn_choices["encoder"], m.attn_choices["decoder"]
    assert (enc["tokens"], enc["heads"], enc["head_dim"]) == (1 + 16, 3, 32)  # 1 + visible of 64 patches
    assert (dec["tokens"], dec["heads"], dec["head_dim"]) == (1 + 64, 2, 32)  # 1 + L
    assert m.set_attn_backend("sdpa_flash") == {"encoder": "sdpa_flash", "decoder": "sdpa_flash"}
    assert {blk.attn.attn_backend for blk in [*m.blocks, *m.decoder_blocks]} == {"sdpa_flash"}


@pytest.mark.parametrize("ckpt", [0, 2])
def test_compile_has_no_graph_breaks(ckpt):
    torch._dynamo.reset()
    m = mae_vit_tiny_patch8(norm_pix_loss=True)
    m.set_grad_checkpointing(ckpt)
    explain = torch._dynamo.explain(lambda x: m(x, mask_ratio=0.75)[0])(random_images(2, 64))
    assert explain.graph_break_count == 0, explain.break_reasons
    assert explain.graph_count == 1


def test_grad_checkpointing_same_gradients():
    torch.manual_seed(0)
    m = mae_vit_tiny_patch8(norm_pix_loss=True)
    imgs, noise = random_images(2, 64), random_noise(2, 64)
    m(imgs, noise=noise)[0].backward()
    ref = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    m.set_grad_checkpointing(1)
    assert all(blk.checkpointed for blk in [*m.blocks, *m.decoder_blocks])
    m(imgs, noise=noise)[0].backward()
    for n, p in m.named_parameters():
        if n in ref:
            torch.testing.assert_close(p.grad, ref[n], rtol=1e-5, atol=1e-7, msg=n)
    m.set_grad_checkpointing(2)
    assert [blk.checkpointed for blk in m.blocks] == [True, False, True, False]


def test_bf16_residual_stream():
    """--activation-dtype bf16: the stream between blocks is bf16 (fp32 by default), same loss to bf16 rounding."""
    torch.manual_seed(0)
    m = mae_vit_tiny_patch8(norm_pix_loss=True)
    imgs, noise = random_images(2, 64), random_noise(2, 64)
    seen = []
    m.blocks[1].register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = m(imgs, noise=noise)[0]
        m.set_activation_dtype("bf16")
        got = m(imgs, noise=noise)[0]
    assert seen == [torch.float32, torch.bfloat16]
    assert got.dtype == torch.float32 and torch.isfinite(got)
    torch.testing.assert_close(got, ref, rtol=3e-2, atol=0)
    got.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    with pytest.raises(ValueError, match="unknown activation dtype 'fp8'"):
        m.set_activation_dtype("fp8")


def test_mae_bench_cpu_rows_record_what_ran(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(records.RESULTS_ENV, str(tmp_path / "results"))
    before = set(records.RESULTS_DIR.glob("*")) if records.RESULTS_DIR.exists() else set()
    out = tmp_path / "b.json"
    rc = bench_main(["--device", "cpu", "--model", "mae_vit_tiny_patch8", "--img-size", "32", "--batch-size", "4",
                     "--steps", "2", "--rounds", "2", "--warmup", "1", "--variants",
                     "official,fused,torch,graphs,no_ckpt,hf", "--data", "demo", "--json", str(out),
                     "--plot", str(tmp_path / "b.png")])
    assert rc == 0
    text = capsys.readouterr().out
    table, notes = text.split("\n\n", 1)[0].splitlines(), text.split("\n\n", 1)[1]
    header = next(i for i, line in enumerate(table) if line.startswith("variant"))
    measured = [line for line in table[header + 1:] if ":" not in line]
    kernels_at = table[header].index("kernels")
    assert len(measured) == 5 and all(line[kernels_at:].startswith("torch ") for line in measured)  # columns line up
    assert "graphs: unavailable: needs CUDA" in table
    assert "Timed 2 rounds of 2 steps per variant, variants interleaved" in notes and "~ within noise" in notes
    for v in ("official", "fused", "torch", "graphs", "no_ckpt", "hf"):  # every variant explained under the table
        assert f"  {v}  " in notes.replace("hf       ", "hf  ")
    rec = json.loads(out.read_text())[0]
    assert {"device", "date", "commit", "command", "torch", "triton", "cuda", "results"} <= set(rec)
    assert "size_sweep" not in rec and "Sweep" not in text  # one size: the record and table as before
    assert rec["rounds"] == 2 and rec["steps"] == 2 and rec["interleaved"] is True
    rows = {r["variant"]: r for r in rec["results"]}
    for v in ("official", "fused", "torch"):
        r = rows[v]
        assert r["images_per_s"] > 0 and r["step_ms_median"] > 0 and r["first_step_s"] > 0, r
        assert r["rounds"] == 2 and len(r["images_per_s_rounds"]) == 2 and r["steps_per_round"] == 2
        assert r["step_ms_min"] <= r["step_ms_q1"] <= r["step_ms_median"] <= r["step_ms_q3"] <= r["step_ms_max"]
        if v != "official":
            lo, hi = r["vs_official_range"]
            assert lo <= hi and isinstance(r["within_noise"], bool)
        assert r["kernels"] == "torch" and r["kernels_fell_back"] is False  # a CPU runs the references
        assert r["compile"] == "off" and r["batch_size"] == 4 and r["label"] == v
        assert set(r["attention"]) == {"encoder", "decoder"}
    assert rows["official"]["vs_official"] == 1.0 and rows["official"]["precision"] == "fp16"
    assert "foreach AdamW" in rows["official"]["step"] and "fused AdamW" in rows["fused"]["step"]
    assert rows["official"]["attention"]["encoder"]["backend"] == "math"
    assert rows["fused"]["attention"]["decoder"] == {"backend": "sdpa", "tokens": 17, "heads": 2, "head_dim": 32,
                                                     "batch": 4, "dtype": "bfloat16", "device": "cpu",
                                                     "timings_ms": {}, "rejected": {"*": "no CUDA device: nothing timed"}}
    assert rows["fused"]["precision"] == "bf16" and rows["fused"]["mfu"] is None  # no peak for a CPU
    assert rows["graphs"]["unavailable"] == "needs CUDA"
    assert "does not checkpoint" in rows["no_ckpt"]["unavailable"]
    if importlib.util.find_spec("transformers"):  # Hugging Face's model really ran, with the attention it resolved
        assert rows["hf"]["images_per_s"] > 0 and rows["hf"]["attention"]["encoder"]["backend"] == "sdpa (transformers)"
    else:
        assert rows["hf"]["unavailable"] == "transformers is not installed"
    assert rows["fused+data"]["images_per_s"] > 0  # the real loader feeding the fused step
    assert (tmp_path / "b.png").stat().st_size > 5000
    written = list((tmp_path / "results").glob("mae-bench-*.json"))
    assert len(written) == 1 and json.loads(written[0].read_text())["results"][-1]["variant"] == "fused+data"
    after = set(records.RESULTS_DIR.glob("*")) if records.RESULTS_DIR.exists() else set()
    assert after == before  # a CPU record never lands in bench/results/


def test_fallen_back_row_is_labelled_and_gets_no_ratio(monkeypatch):
    m = mae_vit_tiny_patch8()

    # the model's own check (forced: on a CPU it checks nothing), with a self-test that fails one op
    monkeypatch.setattr(m, "check_kernels", lambda dtype: type(m).check_kernels(m, force=True, dtype=dtype))
    import mae_fast.kernels.selftest as st
    asked = []
    monkeypatch.setattr(st, "selftest", lambda *a: asked.append(a[-1]) or {"masked_loss": "AssertionError: differs",
                                                                           "unshuffle": None})
    m.check_kernels(dtype=torch.float32)  # as the model builder does, in the dtype fp32 computes in
    status = kernels_in_use(m, torch.device("cpu"), "auto")
    assert asked == [torch.float32]  # self-tested in the dtype the run computes in
    assert status["kernels_fell_back"] and status["kernels"] == "torch"
    assert status["kernel_failures"] == {"masked_loss": "AssertionError: differs"}
    rows = [{"variant": "official", "images_per_s": 10.0}, {"variant": "fused", "images_per_s": 30.0, **status},
            {"variant": "eager", "images_per_s": 20.0, "kernels_fell_back": False}, {"variant": "hf", "error": "x"}]
    add_ratios(rows)
    assert rows[1]["label"] == "fused [kernels fell back to torch]" and "vs_official" not in rows[1]
    assert rows[2]["vs_official"] == 2.0 and rows[0]["vs_official"] == 1.0 and "vs_official" not in rows[3]
    rows[0]["kernels_fell_back"] = True  # a baseline that is not what it claims gives no ratios at all
    add_ratios(rows)
    assert not any("vs_official" in r for r in rows)


class FakeClock:
    """A clock that only the fake steps move."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def fake_ready(name: str, clock: FakeClock, ms_per_round: list) -> throughput.Ready:
    """A variant whose steps take the given milliseconds on ``clock``, round after round."""
    durations = iter([ms / 1e3 for rnd in ms_per_round for ms in rnd])

    def step(imgs):
        clock.now += next(durations)
        return torch.ones(())

    return throughput.Ready({"variant": name, "batch_size": 8}, step, torch.zeros(1), None, lambda: None)


def fake_bench(official: list, fused: list) -> dict:
    """The fused row after interleaved rounds on a fake clock (official's step times, fused's)."""
    clock = FakeClock()
    ready = [fake_ready("official", clock, official), fake_ready("fused", clock, fused)]
    for _ in official:
        ready = throughput.time_round(ready, len(official[0]), clock)
    for r in ready:
        throughput.summarize(r, 1e9, None)
    rows = [r.row for r in ready]
    add_ratios(rows)
    return rows[1]


def test_a_difference_within_the_spread_is_within_noise_and_a_clear_one_is_not():
    official = [[10, 14, 8], [12, 9, 13], [11, 10, 12]]
    close = fake_bench(official, [[11, 9, 13], [10, 14, 9], [12, 11, 10]])  # 2% apart, steps spread +-30%
    assert close["within_noise"] is True
    lo, hi = close["vs_official_range"]
    assert lo < 1.0 < hi
    twice = fake_bench(official, [[5, 7, 4], [6, 4.5, 6.5], [5.5, 5, 6]])  # twice as fast in every round
    assert twice["within_noise"] is False and twice["vs_official_range"][0] > 1.5
    assert twice["vs_official"] == pytest.approx(2.0) and twice["rounds"] == 3 and twice["steps_per_round"] == 3
    # every round's ratio above 1.0, but the step times' quartiles overlap: still within noise
    overlap = fake_bench([[10, 10, 30]] * 3, [[20, 20, 5]] * 3)
    assert overlap["vs_official_range"][0] > 1.0 and overlap["within_noise"] is True


def test_device_cuda_without_gpu_is_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    p = subprocess.run([sys.executable, "-m", "mae_fast.bench.throughput", "--device", "cuda", "--model",
                        "mae_vit_tiny_patch8", "--steps", "1", "--warmup", "1"], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines() == ["mae-bench: error: --device cuda was asked for but no CUDA device is "
                                             "visible (use --device auto or cpu)"]


@pytest.mark.parametrize("argv, match", [
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--batch-size", "x"], "positive integer or 'auto'"),
    (["--variants", "fused,nope"], r"unknown variant\(s\) \['nope'\]"),
    (["--activation-dtype", "bf16", "--precision", "fp16"], "needs --precision bf16"),
    (["--img-size", "224,x"], r"--img-size takes sizes in px, one or a comma list"),
    (["--img-size", "0"], "--img-size must be >= 1, got 0"),
])
def test_bad_options_name_the_problem(argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        throughput.parse_args(argv)
    assert e.value.code == 2
    import re
    assert re.search(match, capsys.readouterr().err)


def test_presets_say_what_they_do():
    for name, preset in throughput.PRESETS.items():
        assert preset["what"] and "grad_checkpointing" in preset, name
    assert throughput.PRESETS["vit_h14_448"]["grad_checkpointing"] == 1 and "no_ckpt" in throughput.PRESETS[
        "vit_h14_448"]["what"]


def test_peak_table_prefers_specific_names():
    names = [k for k, _ in PEAK_TFLOPS]
    assert names.index("H100 PCIe") < names.index("H100")


def test_records_carry_environment_and_never_put_cpu_figures_in_results(tmp_path, monkeypatch):
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite><testcase classname="a" name="t1"/><testcase classname="a" name="t2">'
                   '<failure/></testcase><testcase classname="a" name="t3"><skipped/></testcase></testsuite></testsuites>')
    summary = records.junit_summary(str(xml))
    assert (summary["passed"], summary["failed"], summary["skipped"], summary["failures"]) == (1, 1, 1, ["a::t2"])
    rec = {**records.record_header("unit", torch.device("cpu"), "cmd --x"), **summary}
    assert {"device", "date", "commit", "torch", "triton", "cuda", "cudnn", "python"} <= set(rec)
    path = records.write_result("unit", rec, folder=tmp_path, stamp="S")
    data = json.loads(path.read_text())
    assert path.name.startswith("unit-cpu") and path.name.endswith("-S.json")
    assert data["command"] == "cmd --x" and len(data["commit"]) >= 7
    rec["passed"] = 7  # the same stamp rewrites the same file (records written after every row)
    assert records.write_result("unit", rec, folder=tmp_path, stamp="S") == path
    assert json.loads(path.read_text())["passed"] == 7 and not list(tmp_path.glob(".*.tmp"))

    monkeypatch.delenv(records.RESULTS_ENV, raising=False)
    assert records.result_folders(rec) == []  # CPU, no $MAE_RESULTS_DIR: nowhere
    assert records.write_result("unit", rec) is None
    assert records.result_folders(rec, folder=records.RESULTS_DIR) == []  # not even when asked
    monkeypatch.setenv(records.RESULTS_ENV, str(tmp_path / "env"))
    assert records.result_folders(rec) == [tmp_path / "env"]
    gpu = {**rec, "device": "NVIDIA H200"}
    assert records.result_folders(gpu) == [records.RESULTS_DIR, tmp_path / "env"]


def test_nvidia_smi_absent_is_empty(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert records.nvidia_smi() == {}


def test_batch_size_auto_needs_a_gpu_one_line(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    rc = bench_main(["--device", "cpu", "--model", "mae_vit_tiny_patch8", "--batch-size", "auto", "--no-save"])
    assert rc == 2
    assert capsys.readouterr().err.strip() == ("mae-bench: error: --batch-size auto plans for a CUDA device's "
                                               "memory; on a CPU give a number")


def test_compiled_rows_record_their_graphs_and_breaks(tmp_path):
    """A compiled row says how many graphs dynamo built and which graph breaks it hit (none here: one graph
    per block shape, encoder and decoder); a row with breaks is labelled so."""
    out = tmp_path / "b.json"
    rc = bench_main(["--device", "cpu", "--model", "mae_vit_tiny_patch8", "--img-size", "32", "--batch-size", "2",
                     "--steps", "1", "--warmup", "1", "--variants", "official,fused,compile", "--compile", "blocks",
                     "--compile-backend", "aot_eager", "--json", str(out), "--no-save"])
    assert rc == 0
    rows = {r["variant"]: r for r in json.loads(out.read_text())[0]["results"]}
    assert rows["fused"]["compile"] == "blocks" and rows["fused"]["compiled"] == {"graphs": 2, "graph_breaks": {}}
    assert rows["compile"]["compile"] == "model" and rows["compile"]["compiled"]["graph_breaks"] == {}
    assert rows["compile"]["compiled"]["graphs"] >= 1
    assert rows["official"]["compiled"] == {"graphs": 0, "graph_breaks": {}}
    assert torch._dynamo.config.fail_on_recompile_limit_hit  # past the limit a row fails instead of running eager
    broken = [{"variant": "fused", "images_per_s": 1.0, "compiled": {"graphs": 3, "graph_breaks": {"print": 2}}}]
    add_ratios(broken)
    assert broken[0]["label"] == "fused [2 graph breaks]"


def test_bench_kernels_runs_as_a_module_on_cpu_and_records_each_case(tmp_path):
    """python -m mae_fast.bench.bench_kernels (the GPU suite's kernels step): eager rows timed, Triton rows
    skipped with the reason on a CPU, the record in $MAE_RESULTS_DIR; pytest is not needed to run it."""
    env = {**os.environ, records.RESULTS_ENV: str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}
    run_then_check = ("import sys; from mae_fast.bench.bench_kernels import main; rc = main(sys.argv[1:]); "
                      "sys.exit(rc or 3 * ('pytest' in sys.modules))")
    p = subprocess.run([sys.executable, "-c", run_then_check, "--ops", "unshuffle_mask_tokens",
                        "--shapes", "vit_l16_224_b256", "--impls", "eager,triton"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    rec = json.loads(next(tmp_path.glob("kernels-cpu*.json")).read_text())
    assert {"device", "date", "commit", "command", "torch", "copy_bandwidth_GBps", "backend_choices"} <= set(rec)
    assert [(r["pass"], r["impl"]) for r in rec["results"]] == [("fwd", "eager"), ("fwd_bwd", "eager")]
    for r in rec["results"]:
        assert r["op"] == "unshuffle_mask_tokens" and r["batch"] == 2 and r["time_us"] > 0 and r["GBps"] > 0
        assert r["min_bytes"] > 0 and 0 < r["fraction_of_copy_bw"] and "TFLOPs" not in r
    assert [s["impl"] for s in rec["skipped"]] == ["triton", "triton"] and rec["errors"] == []
    assert "needs a CUDA GPU" in rec["skipped"][0]["reason"] and "skipped 2 case(s)" in p.stdout


def sweep(argv, tmp_path):
    """mae-bench on the tiny model (fused variant, 1 step, MFU against a 1 TFLOP/s peak) with ``argv``: its
    records, one per size."""
    out = tmp_path / "sweep.json"
    rc = bench_main(["--device", "cpu", "--model", "mae_vit_tiny_patch8", "--batch-size", "2", "--steps", "1",
                     "--warmup", "1", "--rounds", "1", "--variants", "fused", "--peak-tflops", "1", "--no-save",
                     "--json", str(out), *argv])
    assert rc == 0
    return json.loads(out.read_text())


def test_size_sweep_records_each_size_with_its_flops_and_mfu(tmp_path, capsys):
    """Two sizes: a record at each, the same batch (--grow-batch fixed), FLOPs counted at that size and MFU from them."""
    from mae_fast.flops import count_flops

    recs = sweep(["--img-size", "16,32"], tmp_path)
    assert [r["img_size"] for r in recs] == [16, 32]
    for rec in recs:
        flops = count_flops("mae_vit_tiny_patch8", 0.75, img_size=rec["img_size"], norm_pix_loss=True).total("training")
        assert rec["train_gflops_per_image"] == pytest.approx(flops / 1e9)
        assert rec["size_sweep"] == {"sizes": [16, 32], "grow_batch": "fixed", "base_batch": 2, "batch_multiple": 1}
        (row,) = rec["results"]
        assert rec["batch_size"] == row["batch_size"] == 2
        assert row["mfu"] == pytest.approx(row["images_per_s"] * flops / 1e12) and row["mfu"] > 0
    assert recs[1]["train_gflops_per_image"] > 2 * recs[0]["train_gflops_per_image"]  # 16 patches against 4
    text = capsys.readouterr().out
    assert "mae_vit_tiny_patch8 @ 16 px, batch 2, size 1 of 16/32 px," in text
    sweep_lines = text.split("Sweep (")[1].splitlines()[2:]
    assert [line.split()[1:3] for line in sweep_lines] == [["16", "2"], ["32", "2"]]


def test_grow_batch_tokens_runs_the_scaled_batch_at_smaller_sizes(tmp_path, capsys):
    """--grow-batch tokens, sizes 16 and 32 with patch 8 (4 and 16 patches): batch x4 at 16, as pretraining scales it;
    the sizes given repeated, each compiled on its own."""
    recs = sweep(["--img-size", "32", "--img-size", "16", "--grow-batch", "tokens", "--compile", "blocks",
                  "--compile-backend", "aot_eager"], tmp_path)
    assert [(r["img_size"], r["batch_size"], r["results"][0]["batch_size"]) for r in recs] == [(32, 2, 2), (16, 8, 8)]
    assert [r["size_sweep"]["batch_multiple"] for r in recs] == [1, 4]
    assert all(r["results"][0]["compiled"] == {"graphs": 2, "graph_breaks": {}} for r in recs)
    assert "batch 8 = 4 x 2 (--grow-batch tokens), size 2 of 32/16 px" in capsys.readouterr().out


def test_sweep_plan_scales_as_pretraining_does():
    from mae_fast.resolution import batch_multiple

    plan = throughput.sweep_plan(["mae_vit_huge_patch14"], [224, 336, 448], [32, 64], "tokens")
    assert [(r.img_size, r.batch_size) for r in plan] == [(224, 128), (224, 256), (336, 32), (336, 64), (448, 32),
                                                          (448, 64)]
    assert plan[0].size_sweep["batch_multiple"] == batch_multiple(224, 448, 14) == 4
    fixed = throughput.sweep_plan(["mae_vit_tiny_patch8", "mae_vit_base_patch16"], [32, 64], ["auto"])
    assert [(r.model, r.img_size, r.batch_size) for r in fixed] == [
        ("mae_vit_tiny_patch8", 32, "auto"), ("mae_vit_tiny_patch8", 64, "auto"),
        ("mae_vit_base_patch16", 32, "auto"), ("mae_vit_base_patch16", 64, "auto")]  # auto: planned per size
    assert throughput.sweep_plan(["mae_vit_tiny_patch8"], [32], [4], "tokens") == [
        throughput.Run("mae_vit_tiny_patch8", 32, 4, None)]  # one size: no sweep


def test_img_size_options_and_preset_default():
    parse = throughput.parse_args
    assert parse(["--preset", "vit_h14_448"]).img_sizes == [448]
    assert parse(["--preset", "vit_h14_448", "--img-size", "224"]).img_sizes == [224]
    args = parse(["--img-size", "224,336", "--img-size", "448", "--img-size", "336"])
    assert (args.img_sizes, args.img_size, args.grow_batch) == ([224, 336, 448], 224, "fixed")


@pytest.mark.parametrize("argv, line", [
    (["--model", "mae_vit_base_patch16", "--img-size", "224,230"],
     "--img-size 230 is not a multiple of the patch size 16 of mae_vit_base_patch16"),
    (["--model", "mae_vit_tiny_patch8", "--img-size", "16,32", "--grow-batch", "tokens", "--batch-size", "auto"],
     ("--grow-batch tokens scales a given --batch-size; auto plans each size's batch on its own (use --grow-batch "
      "fixed)")),
])
def test_bad_size_sweep_is_one_line_before_anything_runs(argv, line, capsys):
    assert bench_main(["--device", "cpu", "--no-save", *argv]) == 2
    out, err = capsys.readouterr()
    assert err.splitlines() == [f"mae-bench: error: {line}"] and out == ""

