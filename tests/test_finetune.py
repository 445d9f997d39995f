"""mae-finetune and mae-linprobe on CPU: a few steps through the CLIs, learning on a tiny set, layer-wise
lr decay, clear errors, exact resume, --eval. Loading an encoder into the classifier (pos_embed resizing,
official/encoder-only checkpoints): tests/test_classifier.py."""
import csv
import json
import logging
from pathlib import Path

import pytest
import torch

from mae_fast import mae_vit_tiny_patch8
from mae_fast.train import finetune, linprobe
from mae_fast.train.evaluation.classifier import create_classifier
from mae_fast.train.finetune import param_groups_lrd

from conftest import DEMO

COMMON = ["--model", "vit_tiny_patch8", "--img-size", "32", "--batch-size", "4", "--num-workers", "0",
          "--precision", "fp32", "--device", "cpu", "--no-progress", "--no-tensorboard", "--log-every", "1",
          "--warmup-epochs", "1"]


def rows(path: Path) -> list:
    return list(csv.DictReader(open(path)))


def final_weights(out: Path) -> dict:
    last = sorted((out / "checkpoints").glob("checkpoint-*.pth"))[-1]
    return torch.load(last, map_location="cpu", weights_only=False)["model"]


def test_finetune_and_linprobe_cli(tree, mae_ckpt, tmp_path, capsys, caplog):
    ft = tmp_path / "ft"
    with caplog.at_level(logging.INFO, logger="mae_fast.train"):
        assert finetune.main(COMMON + ["--data", str(tree), "--finetune", str(mae_ckpt), "--epochs", "1",
                                       "--output-dir", str(ft)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 4 and summary["task"] == "finetune" and 0 <= summary["acc1"] <= 100
    assert len(rows(ft / "log.csv")) == 4 and len(rows(ft / "eval.csv")) == 1
    # 3 classes: top-5 is always 100%, so it is left out of the summary, eval.csv and the log line
    assert "acc5" not in summary and list(rows(ft / "eval.csv")[0]) == ["step", "epoch", "acc1", "loss"]
    evals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch 1 (step 4): top-1 ")]
    assert len(evals) == 1 and "top-5" not in evals[0] and evals[0].endswith("on 19 images (best top-1 "
                                                                               f"{summary['best_acc1']:.2f}%)")
    # --eval on the fine-tuned checkpoint reports accuracy only, the same as after training
    assert finetune.main(COMMON + ["--data", str(tree), "--eval", "--resume", summary["last_checkpoint"],
                                   "--output-dir", str(tmp_path / "eval")]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(metrics) == {"acc1", "loss", "images"} and metrics["images"] == 19  # 3 classes: no top-5
    assert metrics["acc1"] == pytest.approx(summary["acc1"])

    lp = tmp_path / "lp"
    assert linprobe.main(COMMON + ["--data", str(tree), "--finetune", str(mae_ckpt), "--epochs", "1",
                                   "--loader", "pil", "--output-dir", str(lp)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["task"] == "linprobe" and summary["steps"] == 4
    w = final_weights(lp)
    enc = torch.load(mae_ckpt, weights_only=False)["model"]
    assert torch.equal(w["blocks.0.attn.qkv.weight"], enc["blocks.0.attn.qkv.weight"])  # frozen
    assert torch.equal(w["norm.weight"], enc["norm.weight"]) and "head.0.running_mean" in w


@pytest.mark.slow
def test_loss_falls_on_tiny_set(easy_tree, tmp_path):
    out = tmp_path / "overfit"
    args = COMMON + ["--data", str(easy_tree), "--epochs", "10", "--lr", "2e-3", "--layer-decay", "1", "--mixup", "0",
                     "--cutmix", "0", "--smoothing", "0", "--aa", "none", "--reprob", "0", "--drop-path", "0",
                     "--weight-decay", "0", "--save-every", "1000", "--output-dir", str(out)]
    assert finetune.main(args) == 0
    losses = [float(r["loss"]) for r in rows(out / "log.csv")]
    assert len(losses) == 40
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < 0.75 * first, (first, last)


@pytest.mark.slow
def test_linprobe_loss_falls(easy_tree, mae_ckpt, tmp_path):
    out = tmp_path / "lp"
    assert linprobe.main(COMMON + ["--data", str(easy_tree), "--finetune", str(mae_ckpt), "--epochs", "10",
                                   "--lr", "0.5", "--loader", "pil", "--save-every", "1000",
                                   "--output-dir", str(out)]) == 0
    losses = [float(r["loss"]) for r in rows(out / "log.csv")]
    assert sum(losses[-8:]) / 8 < 0.9 * sum(losses[:8]) / 8


def test_layer_decay_scales():
    model = create_classifier("vit_tiny_patch8", 3, 32)
    decay, depth = 0.75, len(model.blocks)
    groups = param_groups_lrd(model, weight_decay=0.05, layer_decay=decay)
    where = {id(p): g for g in groups for p in g["params"]}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    for name, p in model.named_parameters():
        g = where[id(p)]
        if name.startswith(("cls_token", "pos_embed", "patch_embed")):
            lid = 0
        elif name.startswith("blocks."):
            lid = int(name.split(".")[1]) + 1
        else:
            lid = depth + 1
        assert g["lr_scale"] == pytest.approx(decay ** (depth + 1 - lid)), name
        no_wd = p.ndim == 1 or name in ("pos_embed", "cls_token")
        assert g["weight_decay"] == (0.0 if no_wd else 0.05), name
    assert where[id(model.head.weight)]["lr_scale"] == 1.0
    assert where[id(model.patch_embed.proj.weight)]["lr_scale"] == pytest.approx(decay ** 5)


def test_other_size_checkpoint_is_one_error_line(tree, tmp_path, capsys):
    other = tmp_path / "other.pth"  # load_pretrained's own message: tests/test_classifier.py
    torch.save({"model": mae_vit_tiny_patch8(embed_dim=64, num_heads=2).state_dict()}, other)
    for cli in (finetune, linprobe):
        assert cli.main(COMMON + ["--data", str(tree), "--finetune", str(other), "--epochs", "1",
                                  "--output-dir", str(tmp_path / cli.__name__)]) == 1
        err = capsys.readouterr().err
        assert "key 'cls_token'" in err and "(1, 1, 64)" in err and "(1, 1, 96)" in err, err


def test_folder_without_class_subfolders(tmp_path, capsys):
    flat = tmp_path / "flat"
    flat.mkdir()
    for src in sorted(DEMO.glob("*.jpg"))[:4]:
        (flat / src.name).write_bytes(src.read_bytes())
    for cli in (finetune, linprobe):
        assert cli.main(COMMON + ["--data", str(flat), "--output-dir", str(tmp_path / "o")]) == 1
        assert "has no class sub-folders" in capsys.readouterr().err


@pytest.mark.parametrize("cli", [finetune, linprobe], ids=["finetune", "linprobe"])
def test_resume_is_exact(cli, tree, mae_ckpt, tmp_path):
    args = COMMON + ["--data", str(tree), "--finetune", str(mae_ckpt), "--epochs", "2", "--save-every", "100"]
    if cli is linprobe:
        args += ["--loader", "pil"]
    assert cli.main(args + ["--output-dir", str(tmp_path / "ref")]) == 0
    out = tmp_path / "stopped"
    assert cli.main(args + ["--output-dir", str(out), "--max-steps", "3"]) == 0  # stops mid-epoch 0
    assert cli.main(args + ["--output-dir", str(out), "--resume", "auto"]) == 0
    assert json.loads((out / "summary.json").read_text())["steps_this_run"] == 5  # resumed at step 3 of 8
    a, b = final_weights(tmp_path / "ref"), final_weights(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert rows(tmp_path / "ref" / "eval.csv")[-1]["acc1"] == rows(out / "eval.csv")[-1]["acc1"]


def test_augmentation_does_not_depend_on_workers(tree):
    from mae_fast.train.data.labelled import build_labelled_loader, scan_labelled, train_transform

    images = scan_labelled(str(tree))
    state = torch.get_rng_state()
    batches = [[x for x, _ in build_labelled_loader(images, train_transform(32), 4, num_workers=w)] for w in (0, 2)]
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left as it was
    assert len(batches[0]) == 4 and all(torch.equal(a, b) for a, b in zip(*batches))


def test_eval_takes_the_model_from_the_checkpoint(tree, mae_ckpt, tmp_path, capsys):
    out = tmp_path / "ft"
    assert finetune.main(COMMON + ["--data", str(tree), "--finetune", str(mae_ckpt), "--epochs", "1",
                                   "--global-pool", "token", "--output-dir", str(out)]) == 0
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (out / "loss.png").is_file() and (out / "accuracy.png").is_file()
    ckpt = trained["last_checkpoint"]
    plain = ["--data", str(tree), "--eval", "--resume", ckpt, "--device", "cpu", "--num-workers", "0",
             "--batch-size", "4", "--precision", "fp32"]  # no --model, --img-size, --global-pool, --nb-classes
    assert finetune.main(plain) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["acc1"] == pytest.approx(trained["acc1"])
    assert finetune.main(plain + ["--model", "vit_base_patch16"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"mae-finetune: error: --model vit_base_patch16 contradicts the checkpoint's vit_tiny_patch8 ({ckpt})"
    assert finetune.main(plain + ["--img-size", "64"]) == 2
    assert "--img-size 64 contradicts the checkpoint's 32" in capsys.readouterr().err
    assert linprobe.main(plain) == 2
    assert "is a finetune checkpoint: evaluate it with mae-finetune --eval" in capsys.readouterr().err


def test_run_folders(tree, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = COMMON + ["--data", str(tree), "--max-steps", "1", "--epochs", "1"]
    for expected in ("runs/finetune", "runs/finetune-2"):  # a fresh run never writes into an earlier one
        assert finetune.main(args) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["run_dir"] == expected
    assert finetune.main(args + ["--output-dir", "runs/finetune"]) == 2
    assert "--output-dir runs/finetune already holds a run" in capsys.readouterr().err
    assert finetune.main(args + ["--output-dir", "runs/finetune", "--overwrite"]) == 0
    assert len(rows(tmp_path / "runs/finetune" / "log.csv")) == 1  # replaced, not appended


def test_missing_data_is_one_line(tmp_path, capsys, caplog):
    for cli, prog in ((finetune, "mae-finetune"), (linprobe, "mae-linprobe")):
        missing = tmp_path / "nowhere"
        assert cli.main(COMMON + ["--data", str(missing)]) == 1
        assert capsys.readouterr().err.strip() == f"{prog}: error: --data {missing}: no such file or folder"
    assert not [r for r in caplog.records if "train/ and val/" in r.getMessage()]
