"""Configuration errors are one line (exit 2) naming the option, the value and what is allowed; YAML is
typed, its errors name the file and the offending line, an unknown key gets the closest option; negative
numbers in scientific notation are values; every option has help and one default; --help lists what each
preset sets and --print-config shows the resolved options."""
import dataclasses
import os
import re
import subprocess
import sys

import pytest
import yaml

from mae_fast.train.engine.cli import _field_types, strict_json
from mae_fast.errors import ConfigError
from mae_fast.train.engine.config import PRESETS, PretrainConfig, build_parser, parse_config


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
             "epochs: [5\n": r"line 1: not valid YAML",
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


def preset_lines(help_text: str) -> dict:
    """{preset name: its entry at the end of --help, wrapped lines joined}."""
    entries: dict = {}
    for line in help_text.split("\npresets (")[1].splitlines():
        if re.match(r"^  \S", line):  # "  name  --flag value ..."
            name = line.split()[0]
            entries[name] = line.strip()
        elif re.match(r"^   ", line) and entries:  # its wrapped continuation
            entries[name] += " " + line.strip()
    return entries


@pytest.mark.parametrize("columns", ["300", "60"])
def test_help_lists_the_flags_each_preset_sets(columns, monkeypatch):
    monkeypatch.setenv("COLUMNS", columns)
    text = build_parser().format_help()
    entries = preset_lines(text)
    assert set(entries) == set(PRESETS), text
    for name, values in PRESETS.items():
        words = entries[name].split()
        assert words[0] == name
        for key, value in values.items():
            flag = "--" + key.replace("_", "-")
            if isinstance(value, bool):
                assert (flag if value else "--no-" + flag[2:]) in words, (name, key)
            else:
                assert flag in words and words[words.index(flag) + 1] == str(value), (name, key)
    assert "--no-norm-pix-loss" in entries["demo"] and "--distributed fsdp" in entries["vit_h14_448"]
    if columns == "300":  # one line per preset
        assert sum(line.startswith("  vit_h14_448  --model mae_vit_huge_patch14 --img-size 448 --batch-size 32")
                   for line in text.splitlines()) == 1, text
    for line in text.split("\npresets (")[1].splitlines():  # a flag is never wrapped away from its value
        assert not re.search(r"--(model|img-size|batch-size|epochs|lr|precision|distributed)$", line), line
    assert "\u00a0" not in text


def run_pretrain(argv: list, capsys) -> tuple:
    """``mae-pretrain ARGV`` in this process: (exit status, stdout, stderr)."""
    from mae_fast.train.pretrain import main

    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("argv", [["--preset", "vit_h14_448"], ["--demo"],
                                  ["--preset", "vit_b16_224", "--epochs", "3"]])
def test_print_config_shows_the_resolved_preset_and_runs_nothing(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out_dir = tmp_path / "run"
    code, out, err = run_pretrain([*argv, "--output-dir", str(out_dir), "--print-config"], capsys)
    assert code == 0, err
    assert list(tmp_path.iterdir()) == [], "--print-config created files"
    lines = out.splitlines()
    assert lines[0].startswith("# mae-pretrain"), out
    assert len(lines) == 1 + len(dataclasses.fields(PretrainConfig))  # one key per line
    printed = yaml.safe_load(out)
    expected = parse_config([*argv, "--output-dir", str(out_dir)])
    assert printed == dataclasses.asdict(expected)
    preset = "demo" if argv == ["--demo"] else argv[1]
    assert {k: printed[k] for k in PRESETS[preset] if k != "epochs"} == \
        {k: v for k, v in PRESETS[preset].items() if k != "epochs"}
    if "--epochs" in argv:
        assert printed["epochs"] == 3  # a flag given overrides the preset
    else:
        assert printed["epochs"] == PRESETS[preset]["epochs"]
    again = tmp_path / "printed.yaml"  # what it prints loads back as the same configuration
    again.write_text(out)
    assert dataclasses.asdict(parse_config(["--config", str(again)])) == printed


@pytest.mark.parametrize("text,message", [
    ("batch_sizee: 3\n", "unknown option 'batch_sizee'; did you mean 'batch_size'?"),
    ("batch-sizee: 3\n", "unknown option 'batch-sizee'; did you mean 'batch-size'?"),
    ("epoch: 3\n", "unknown option 'epoch'; did you mean 'epochs'?"),
    ("colour: red\n", "unknown option 'colour'"),
])
def test_unknown_yaml_key_names_the_closest_option(text, message, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 10\n" + text)
    with pytest.raises(ConfigError) as e:
        parse_config(["--config", str(bad)])
    assert str(e.value) == f"--config {bad}: {message}"


@pytest.mark.parametrize("text,line", [
    ("epochs: [5\n", 1),  # PyYAML marks the end of the file, line 2
    ("epochs: 10\nblr: 1e-3\nmodel: [x\n", 3),  # was reported as line 4 of this 3-line file
    ("epochs: 10\nblr: 1e-3\nmodel: [x", 3),
    ("epochs: 10\nmodel: {x\n\n\n", 2),  # trailing blank lines
    ("epochs: 10\nseed: 'x\n", 2),  # unterminated quote
    ("epochs: 10\nseed\nblr: 1e-3\n", 2),  # a key without ':' is noticed at the next line's token
    ("epochs: 10\nseed: 1\n- 2\n", 3),
    ("epochs: 10\n seed: 2\nblr: 1e-3\n", 2),
    ("epochs: 10\n\tseed: 2\n", 2),
    ("epochs: 10\nseed: [1,\n  2\nblr: 1e-3\n", 4),
])
def test_yaml_syntax_error_names_the_offending_line(text, line, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError) as e:
        parse_config(["--config", str(bad)])
    message = str(e.value)
    assert message.startswith(f"--config {bad} line {line}: not valid YAML: "), message
    assert "\n" not in message and line <= len(text.splitlines())


def test_yaml_errors_are_one_line_naming_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 10\nblr: 1e-3\nmodel: [x\n")
    code, out, err = run_pretrain(["--config", str(bad)], capsys)
    assert code == 2 and out == ""
    assert err.splitlines() == [f"mae-pretrain: error: --config {bad} line 3: not valid YAML: expected ',' or ']', "
                                "but got '<stream end>' (while parsing a flow sequence)"]
    bad.write_text("seed: 1\nbatch_sizee: 3\n")
    code, out, err = run_pretrain(["--config", str(bad)], capsys)
    assert code == 2
    assert err.splitlines() == [f"mae-pretrain: error: --config {bad}: unknown option 'batch_sizee'; "
                                "did you mean 'batch_size'?"]
    bad.write_text("epochs: !!int five\n")  # PyYAML raises a ValueError, not a YAMLError
    assert run_pretrain(["--config", str(bad)], capsys)[2].splitlines() == [
        f"mae-pretrain: error: --config {bad}: not valid YAML: invalid literal for int() with base 10: 'five'"]
