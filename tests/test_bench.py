"""mae-bench on CPU, the official-path variant, attention backend choice, torch.compile without breaks."""
import json

import pytest
import torch
import torch._dynamo

from conftest import random_images, random_noise
from mae_fast import create_model, mae_vit_tiny_patch8
from mae_fast.attention import ATTENTION_BACKENDS, pick_attention_backend
from mae_fast.bench.official_mae import official_model
from mae_fast.bench.throughput import PEAK_TFLOPS, main as bench_main


def test_official_variant_computes_the_same():
    torch.manual_seed(0)
    ours = create_model("mae_vit_tiny_patch8", norm_pix_loss=True)
    torch.manual_seed(0)
    off = official_model("mae_vit_tiny_patch8", norm_pix_loss=True)
    assert off.blocks[0].attn.attn_backend == "math"
    imgs, noise = random_images(2, 64), random_noise(2, 64)
    a, b = ours(imgs, noise=noise), off(imgs, noise=noise)
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a[1], b[1], rtol=1e-4, atol=1e-5)


def test_auto_attention_is_sdpa_on_cpu(caplog):
    assert pick_attention_backend(torch.device("cpu"), torch.float32, [32, 64]) == "sdpa"
    m = mae_vit_tiny_patch8(attn_backend="auto")
    assert {blk.attn.attn_backend for blk in [*m.blocks, *m.decoder_blocks]} == {"sdpa"}
    assert set(ATTENTION_BACKENDS) >= {"sdpa", "math", "xformers"}


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
    m(imgs, noise=noise)[0].backward()
    for n, p in m.named_parameters():
        if n in ref:
            torch.testing.assert_close(p.grad, ref[n], rtol=1e-5, atol=1e-7, msg=n)


def test_mae_bench_cpu_runs_and_writes_json(tmp_path, capsys):
    out = tmp_path / "b.json"
    rc = bench_main(["--device", "cpu", "--model", "mae_vit_tiny_patch8", "--img-size", "32", "--batch-size", "4",
                     "--steps", "2", "--warmup", "1", "--variants", "fused,torch,official,hf", "--data", "demo",
                     "--json", str(out), "--plot", str(tmp_path / "b.png")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "img/s" in text and "vs official" in text
    rec = json.loads(out.read_text())[0]
    assert {"device", "date", "commit", "command", "results"} <= set(rec)
    rows = {r["variant"]: r for r in rec["results"]}
    for v in ("fused", "torch", "official"):
        assert rows[v]["images_per_s"] > 0 and rows[v]["step_ms_median"] > 0, rows[v]
    assert rows["official"]["vs_official"] == 1.0 and rows["official"]["precision"] == "fp16"
    assert rows["fused"]["mfu"] is None  # no peak for a CPU
    assert "images_per_s" in rows["hf"] or "error" in rows["hf"]
    assert rows["fused+data"]["images_per_s"] > 0  # the real loader feeding the fused step
    assert (tmp_path / "b.png").stat().st_size > 5000


def test_peak_table_prefers_specific_names():
    names = [k for k, _ in PEAK_TFLOPS]
    assert names.index("H100 PCIe") < names.index("H100")


def test_records_carry_device_date_commit_command(tmp_path):
    from mae_fast.bench.records import junit_summary, record_header, write_result

    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite><testcase classname="a" name="t1"/><testcase classname="a" name="t2">'
                   '<failure/></testcase><testcase classname="a" name="t3"><skipped/></testcase></testsuite></testsuites>')
    summary = junit_summary(str(xml))
    assert (summary["passed"], summary["failed"], summary["skipped"], summary["failures"]) == (1, 1, 1, ["a::t2"])
    rec = {**record_header("unit", torch.device("cpu"), "cmd --x"), **summary}
    path = write_result("unit", rec, folder=tmp_path)
    data = json.loads(path.read_text())
    assert path.name.startswith("unit-cpu") and data["command"] == "cmd --x"
    assert {"device", "date", "commit", "torch"} <= set(data) and len(data["commit"]) >= 7
