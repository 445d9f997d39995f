"""bench/gpu_suite.sh: the dry run executes every step at a tiny size on the CPU (so CI catches rot), writes
its records to $MAE_RESULTS_DIR and never into bench/results/; the GPU plan fits its 540 s."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "bench" / "gpu_suite.sh"
STEPS = ["install", "preflight", "headline", "kernels", "tests", "h448", "l16-more", "profile", "loader"]


def run_suite(*args, env=None, timeout=360):
    """bash bench/gpu_suite.sh ARGS with this interpreter, from another folder (the script finds its root)."""
    return subprocess.run(["bash", str(SUITE), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})}, cwd=ROOT / "tests")


def test_gpu_plan_runs_in_order_of_value_within_540_s():
    text = SUITE.read_text()
    assert re.findall(r"^\s*step ([\w-]+) ", text, re.M) == STEPS
    gpu_limits = [int(x) for x in re.search(r"^  LIM=\(([\d ]+)\)\nfi", text, re.M).group(1).split()]
    kill_after = int(re.search(r"^KILL_AFTER=(\d+)", text, re.M).group(1))
    assert len(gpu_limits) == len(STEPS) and sum(gpu_limits) + kill_after <= 540, gpu_limits


def test_bad_options_are_one_line():
    p = run_suite("--fast", timeout=30)
    assert p.returncode == 2 and p.stderr.strip() == \
        "gpu_suite.sh: error: unknown option '--fast' (give --dry-run or nothing)"


@pytest.mark.slow
def test_dry_run_runs_every_step_and_keeps_cpu_records_out_of_bench_results(tmp_path):
    results = ROOT / "bench" / "results"
    before = set(results.iterdir()) if results.exists() else set()
    p = run_suite("--dry-run", env={"MAE_RESULTS_DIR": str(tmp_path)})
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    table = (next(tmp_path.glob("gpu-suite-*.tsv"))).read_text().splitlines()
    rows = [line.split("\t") for line in table[1:]]
    assert [r[0] for r in rows] == STEPS and all(r[3] == "0" for r in rows), table
    assert next(tmp_path.glob("gpu-suite-*.log")).read_text().count("=== [") == len(STEPS)

    pre = json.loads(next(tmp_path.glob("preflight-cpu*.json")).read_text())
    assert pre["kernels_pass"] is True and set(pre["kernel_selftest"]["vit_tiny_p8"]) == {
        "patch_embed_gather", "unshuffle_mask_tokens", "masked_loss"}
    benches = [json.loads(f.read_text()) for f in sorted(tmp_path.glob("mae-bench-*.json"))]
    variants = [[r["variant"] for r in b["results"]] for b in benches]
    assert variants == [["official", "fused", "hf", "compile"], ["official", "fused", "no_ckpt"],
                        ["official", "eager", "torch", "graphs", "bf16act"]]
    assert [b["rounds"] for b in benches] == [2, 1, 2]  # ViT-L interleaved; ViT-H @ 448 one model at a time
    head = {r["variant"]: r for r in benches[0]["results"]}
    assert head["compile"]["compile"] == "model" and head["compile"]["images_per_s"] > 0
    assert all("images_per_s" in head[v] for v in ("official", "fused")), head
    h448 = {r["variant"]: r for r in benches[1]["results"]}
    assert h448["fused"]["grad_checkpointing"] == 1 and h448["no_ckpt"]["grad_checkpointing"] == 0
    assert h448["official"]["grad_checkpointing"] == 0  # the official code cannot checkpoint
    assert {r["variant"]: r for r in benches[2]["results"]}["graphs"]["unavailable"] == "needs CUDA"
    assert json.loads(next(tmp_path.glob("gpu-tests-cpu*.json")).read_text())["failed"] == 0
    kernels = json.loads(next(tmp_path.glob("kernels-cpu*.json")).read_text())
    assert {r["impl"] for r in kernels["results"]} == {"eager"} and len(kernels["results"]) == 12, kernels
    assert not kernels["errors"] and kernels["command"].endswith("-m mae_fast.bench.bench_kernels --impls "
                                                                 "eager,triton,triton_fused,triton_gemm")
    after = set(results.iterdir()) if results.exists() else set()
    assert after == before
