"""python -m mae_fast.bench.probe_study: a tiny run (one seed, one pretraining epoch at 16 px) writes a record
whose gaps are the probes' own summaries; bad options are refused in one line."""
import json

import pytest

from mae_fast.bench import probe_study


@pytest.mark.slow
def test_tiny_study_records_each_probe_per_seed(tmp_path, capsys):
    out = tmp_path / "study"
    assert probe_study.main(["--out", str(out), "--seeds", "0", "--img-size", "16", "--epochs", "1",
                             "--per-class", "5", "--lars-epochs", "1"]) == 0
    printed = capsys.readouterr().out
    record = json.loads(next(out.glob("probe_study-*.json")).read_text())
    assert record["benchmark"] == "probe_study" and record["device"].startswith("cpu")
    (row,) = record["seeds"]
    for name in ("logistic_all_labels", "logistic_5_per_class", "lars"):
        summary = json.loads((out / "probes" / f"{name}-seed0-pretrained" / "summary.json").read_text())
        initial = json.loads((out / "probes" / f"{name}-seed0-initial" / "summary.json").read_text())
        assert row[name]["gap"] == pytest.approx(summary["acc1"] - initial["acc1"])
        assert record["summary"][name]["min"] == record["summary"][name]["max"] == row[name]["gap"]
        assert f"seed 0 {name:>24}" in printed
    assert row["logistic_all_labels"]["pool"] == "avg" and row["lars"]["pool"] == "cls"
    assert row["logistic_5_per_class"]["train_images"] == 50
    # a second study in the same folder reuses the pretraining and rewrites the probes
    mtime = (out / "pretrain-16px" / "mae-seed0-ep1" / "summary.json").stat().st_mtime
    assert probe_study.main(["--out", str(out), "--seeds", "0", "--img-size", "16", "--epochs", "1",
                             "--per-class", "0"]) == 0
    assert (out / "pretrain-16px" / "mae-seed0-ep1" / "summary.json").stat().st_mtime == mtime


@pytest.mark.parametrize("flag,value,message", [("--img-size", "36", "--img-size 36: must be a positive multiple of 8"),
                                                ("--epochs", "0", "--epochs 0: must be >= 1"),
                                                ("--seeds", "a", "--seeds: invalid")])
def test_bad_options(flag, value, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        probe_study.main(["--out", str(tmp_path), flag, value])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
