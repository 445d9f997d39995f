"""Configuration errors are one line (exit 2) naming the option, the value and what is allowed; YAML is
typed; negative numbers in scientific notation are values; every option has help and one default."""
import dataclasses
import os
import subprocess
import sys

import pytest

from mae_fast.train.engine.cli import _field_types, strict_json
from mae_fast.errors import ConfigError
from mae_fast.train.engine.config import PretrainConfig, build_parser, parse_config


def test_negative_scientific_number_is_a_value_not_an_option():
    with pytest.raises(ConfigError, match=r"^--blr -0.00015: must be > 0$"):
        parse_config(["--blr", "-1.5e-4"])
    assert parse_config(["--blr", "1.5E-4"]).blr == pytest.approx(1.5e-4)


@pytest.mark.parametrize("flag,value,allowed", [
    ("--weight-decay", "-1", ">= 0"), ("--max-steps", "-3", ">= 0"), ("--warmup-epochs", "-1", ">= 0"),
    ("--epochs", "0", ">= 1"), ("--batch-size", "0", ">= 1"), ("--accum-iter", "0", ">= 1"),
    ("--num-workers", "-1", ">= 0"), ("--mask-ratio", "1", "< 1"), ("--mask-ratio", "0", "> 0"),
    ("--lr", "-1e-3", "> 0"), ("--min-lr", "-1", ">= 0"), ("--img-size", "0", ">= 1"),
    ("--keep-checkpoints", "-1", ">= 0"), ("--save-every", "0", ">= 1"), ("--log-every", "0", ">= 1"),
])
def test_out_of_range_values_are_refused(flag, value, allowed):
    with pytest.raises(ConfigError) as e:
        parse_config([flag, value])
    assert str(e.value).startswith(flag + " ") and allowed in str(e.value)


def test_every_numeric_option_has_a_range():
    types = _field_types(PretrainConfig)
    for f in dataclasses.fields(PretrainConfig):
        kind, _ = types[f.name]
        if kind in (int, float):
            meta = f.metadata
            assert any(meta.get(k) is not None for k in ("min", "above")), f.name


def test_yaml_types_scientific_notation_and_errors(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("blr: 1e-3\nweight-decay: 5.0e-2\nepochs: 10\nnorm_pix_loss: false\n")
    cfg = parse_config(["--config", str(good)])
    assert (cfg.blr, cfg.weight_decay, cfg.epochs, cfg.norm_pix_loss) == (1e-3, 0.05, 10, False)
    cases = {"epochs: five\n": r"--epochs: expected an integer, got 'five'",
             "blr: fast\n": r"--blr: expected a number, got 'fast'",
             "norm_pix_loss: 3\n": r"--norm-pix-loss: expected true or false",
             "model: 3\n": r"--model: expected a string",
             "weight-decay: -1e-2\n": r"--weight-decay -0.01: must be >= 0",
             "colour: red\n": r"unknown option 'colour'",
             "epochs: [5\n": r"line 2: not valid YAML",
             "- 1\n- 2\n": r"expected a mapping"}
    for i, (text, message) in enumerate(cases.items()):
        bad = tmp_path / f"bad{i}.yaml"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=message):
            parse_config(["--config", str(bad)])
    with pytest.raises(ConfigError, match="no such file"):
        parse_config(["--config", str(tmp_path / "missing.yaml")])


def test_bad_value_exits_2_with_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "mae_fast.train.pretrain", "--weight-decay", "-1", "--output-dir",
                        str(out)], capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines == ["mae-pretrain: error: --weight-decay -1.0: must be >= 0"], r.stderr
    assert not out.exists()


def test_help_has_text_and_one_default_per_option():
    parser = build_parser()
    for action in parser._actions:
        if action.dest in ("help",):
            continue
        assert action.help and action.help.strip(), action.dest
        assert action.help.count("default") <= 1, (action.dest, action.help)


def test_strict_json_writes_null_for_nan():
    assert strict_json({"a": float("nan"), "b": [float("inf"), 1.0]}, indent=None) == '{"a": null, "b": [null, 1.0]}'


def test_auto_batch_and_checkpointing_parse_and_plan(tmp_path):
    import torch

    from mae_fast.train.pretrain import plan_memory

    cfg = parse_config(["--batch-size", "auto", "--grad-checkpointing", "auto", "--model", "mae_vit_tiny_patch8",
                        "--img-size", "32", "--precision", "fp32", "--memory-budget", "0.02"])
    assert (cfg.batch_size, cfg.grad_checkpointing) == ("auto", "auto")
    y = tmp_path / "auto.yaml"
    y.write_text("batch-size: auto\n")
    assert parse_config(["--config", str(y)]).batch_size == "auto"
    with pytest.raises(ConfigError, match="expected an integer, got 'auto'"):
        parse_config(["--epochs", "auto"])
    plan = plan_memory(cfg, torch.device("cpu"))
    assert isinstance(cfg.batch_size, int) and cfg.batch_size >= 1 and cfg.grad_checkpointing in (0, 1, 2, 4)
    assert (cfg.batch_size, cfg.grad_checkpointing) == (plan.batch_size, plan.grad_checkpointing)
    assert plan.predicted_bytes <= 0.9 * 0.02 * 2**30
