"""mae-profile on CPU: the phase-split step is the model's own step (same loss and gradients), the phases
add up to the measured step, FLOPs per phase come from mae-flops, the trace names the phases, --memory
tables and plans, and bad input is one line."""
import json

import pytest
import torch

from conftest import random_images, random_noise
from mae_fast import mae_vit_tiny_patch8
from mae_fast.bench import profile as prof
from mae_fast.flops import count_flops

TINY = ["--device", "cpu", "--model", "mae_vit_tiny_patch8", "--img-size", "64"]


@pytest.mark.parametrize("ckpt", [0, 1])
def test_phased_forward_is_the_models_forward(ckpt):
    torch.manual_seed(0)
    a = mae_vit_tiny_patch8(norm_pix_loss=True)
    torch.manual_seed(0)
    b = mae_vit_tiny_patch8(norm_pix_loss=True)
    for m in (a, b):
        m.set_grad_checkpointing(ckpt)
    imgs, noise = random_images(3, 64), random_noise(3, 64)
    marks = []
    loss_a, pred_a, mask_a, latent = prof.phased_forward(a, imgs, 0.75, marks.append, noise)
    loss_b, pred_b, mask_b = b(imgs, mask_ratio=0.75, noise=noise)
    assert marks == list(prof.FORWARD_KEYS)
    assert torch.equal(loss_a, loss_b) and torch.equal(pred_a, pred_b) and torch.equal(mask_a, mask_b)
    assert torch.equal(latent, b.forward_encoder(imgs, 0.75, noise)[0])
    loss_a.backward()
    loss_b.backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert (pa.grad is None) == (pb.grad is None), name
        if pa.grad is not None:
            assert torch.equal(pa.grad, pb.grad), name


def test_phase_flops_are_the_mae_flops_parts():
    report = count_flops("mae_vit_tiny_patch8", img_size=64, norm_pix_loss=True)
    f = prof.phase_flops(report, 4)
    assert f["data"] == f["optimizer"] == 0
    assert sum(f.values()) == pytest.approx(4 * report.total("training"))
    parts = {p.name: p for p in report.parts}
    assert f["encoder"] == 4 * (parts["encoder_linear"].forward + parts["encoder_attention"].forward)
    assert f["backward_encoder"] == 4 * (parts["encoder_linear"].backward + parts["encoder_attention"].backward
                                         + parts["patch_embed"].backward)


def test_cpu_profile_phases_add_up_plot_json_and_trace(tmp_path, capsys):
    out = tmp_path / "p.json"
    rc = prof.main(TINY + ["--batch-size", "4", "--steps", "3", "--warmup", "1", "--precision", "fp32",
                           "--json", str(out), "--plot", str(tmp_path / "p.png"), "--trace", str(tmp_path / "tr")])
    assert rc == 0
    rec = json.loads(out.read_text())
    keys = [r["phase"] for r in rec["phases"]]
    assert keys == [p.key for p in prof.PHASES if p.key != "data"]  # no --data: no data phase
    o = rec["phases_over_step"]  # the phases add up to the step measured around it (on a busy machine a
    assert 0.95 <= o["mean"] <= 1.05 and o["max"] <= 1.0 + 1e-9, o  # preemption may fall between them)
    assert all(r["ms"] > 0 for r in rec["phases"])
    assert rec["memory"]["predicted_bytes"] > 0 and rec["memory"]["measured_bytes"] is None
    enc = next(r for r in rec["phases"] if r["phase"] == "encoder")
    assert enc["gflop"] > 0 and enc["tflops"] == pytest.approx(enc["gflop"] / enc["ms"], rel=1e-6)
    assert (tmp_path / "p.png").stat().st_size > 1000
    [trace] = rec["trace_files"]
    names = {e.get("name") for e in json.loads(open(trace).read())["traceEvents"]}
    for p in prof.PHASES[1:]:
        assert f"mae-profile: {p.label}" in names, p.label
    text = capsys.readouterr().out
    assert "backward: encoder" in text and "phases / step" in text


def test_data_phase_from_the_loader(tmp_path):
    out = tmp_path / "d.json"
    assert prof.main(TINY + ["--batch-size", "4", "--steps", "2", "--warmup", "1", "--precision", "fp32",
                             "--data", "demo", "--json", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["phases"][0]["phase"] == "data" and rec["phases"][0]["ms"] > 0
    assert 0.95 <= rec["phases_over_step"]["mean"] <= 1.05


def test_memory_table_and_plan(capsys, tmp_path):
    assert prof.main(TINY + ["--memory", "--batch-size", "4", "--grad-checkpointing", "0,1",
                             "--memory-budget", "0.01,1", "--markdown"]) == 0
    text = capsys.readouterr().out
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| 4 |")]
    assert len(rows) == 2 and "peak MiB" in text
    off, every = rows
    assert off[1] == "off" and every[1] == "every 1" and float(every[7]) < float(off[7])
    assert off[-1] == every[-1] == "yes |"  # 1 GiB is plenty for the tiny model
    out = tmp_path / "plan.json"
    assert prof.main(TINY + ["--memory", "--batch-size", "auto", "--grad-checkpointing", "0", "--memory-budget",
                             "0.03", "--json", str(out)]) == 0
    plan = json.loads(out.read_text())["plan"]
    assert plan["fits"] and plan["batch_size"] >= 1 and "plan: batch" in capsys.readouterr().out


def test_bad_input_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        prof.main(TINY + ["--batch-size", "0"])
    assert e.value.code == 2 and "--batch-size must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        prof.main(TINY + ["--compile", "model"])  # the phases cannot be timed inside one compiled graph
    assert "invalid choice: 'model'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        prof.main(TINY + ["--memory", "--activation-dtype", "bf16", "--precision", "fp32"])
    assert "--activation-dtype bf16 needs --precision bf16" in capsys.readouterr().err
    assert prof.main(TINY + ["--batch-size", "auto"]) == 1  # no GPU to read the budget from
    err = capsys.readouterr().err.strip()
    assert err.startswith("mae-profile: error:") and "--memory-budget" in err and "\n" not in err


def test_out_of_memory_becomes_one_line_with_the_prediction(monkeypatch, capsys):
    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(prof, "phased_step", oom)
    assert prof.main(TINY + ["--batch-size", "4", "--steps", "1", "--warmup", "0"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("mae-profile: error: out of memory") and "predicted peak" in err and "\n" not in err


def test_memory_table_explains_gradients_at_the_backward_peak(capsys, tmp_path):
    out = tmp_path / "m.json"
    assert prof.main(TINY + ["--memory", "--batch-size", "4,64", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    preds = json.loads(out.read_text())["predictions"]
    assert all(p["peak_phase"] == "backward" and p["breakdown"]["gradients"] == 0 for p in preds)
    [note] = [line for line in text.splitlines() if line.startswith("columns: ")]
    assert "a backward peak with gradients ~0 came as backward started" in note
    opt = ", ".join(f"{p['phase_peaks']['optimizer'] / 2**20:.2f}" for p in preds)
    assert note.endswith(f"the optimizer step's own peak (all gradients and the AdamW state live): {opt} MiB "
                         f"(per row)")
    assert prof.main(TINY + ["--memory", "--batch-size", "4", "--markdown"]) == 0
    lines = capsys.readouterr().out.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("columns: "))
    assert lines[i - 1] == "" and lines[i - 2].startswith("| 4 |")  # a blank line ends the markdown table
