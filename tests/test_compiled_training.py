"""Compiled training equals eager training (issue 22): the whole saved state (weights and AdamW moments) of a
``--compile blocks`` / ``--compile model`` run against an eager run after 6 steps, tensor by tensor, in
pretraining (activation checkpointing on and off) and fine-tuning (drop path on, so its random masks count).

One difference is inherent and bounded apart: the key part of each qkv bias. Adding a vector to every key
adds the same number to every logit of a query, which softmax ignores, so the key bias's gradient is zero in
exact arithmetic and its computed value is rounding noise (about 1e-11 here); AdamW divides it by its own
running size, so eager and compiled (different rounding) move it by different lr-sized noise
(docs/semantics.md §10.13). Everything else must agree within 1e-5 of each tensor's largest magnitude."""
from pathlib import Path

import pytest
import torch

from conftest import random_images
from mae_fast import mae_vit_tiny_patch8
from mae_fast.bench.state_diff import key_bias, state_differences, tensors_of
from mae_fast.train import finetune, pretrain

RTOL = 1e-5  # of each tensor's largest magnitude, fp32, 6 AdamW steps (seen: at most 5.4e-6)
KEY_BIAS_SHARE = 0.05  # a key bias moves at most this share of its block's query bias (seen: about 0.01)
STEPS = 6
PRETRAIN = ["--demo", "--img-size", "32", "--batch-size", "4", "--max-steps", str(STEPS), "--log-every", "1",
            "--save-every", str(STEPS), "--num-workers", "0", "--no-progress", "--no-tensorboard", "--no-visualize",
            "--seed", "0"]
FINETUNE = ["--model", "vit_tiny_patch8", "--img-size", "32", "--batch-size", "4", "--num-workers", "0",
            "--precision", "fp32", "--device", "cpu", "--no-progress", "--no-tensorboard", "--log-every", "1",
            "--warmup-epochs", "1", "--max-steps", str(STEPS), "--save-every", str(STEPS), "--seed", "0",
            "--drop-path", "0.5", "--lr", "1e-3"]


def final_state(out: Path) -> dict:
    return torch.load(out / "checkpoints" / f"checkpoint-{STEPS:08d}.pth", map_location="cpu", weights_only=False)


def assert_equal_but_key_biases(eager: dict, compiled: dict, initial: dict) -> None:
    """Every tensor but the key biases within RTOL; each key bias moved in both runs by at most
    KEY_BIAS_SHARE of its query bias's move (it barely trains, in either run)."""
    diffs = state_differences(eager, compiled)
    assert any(key_bias(d.name) for d in diffs)  # the model has qkv biases: the split happened
    off = [d for d in diffs if not key_bias(d.name) and d.relative > RTOL]
    assert not off, "compiled != eager: " + ", ".join(f"{d.name} {d.relative:.2e}" for d in off[:8])
    start = tensors_of({"model": initial})
    for run in (eager, compiled):
        now = tensors_of(run)
        for name in (n for n in start if key_bias(n)):
            q = name.replace("[k]", "[q]")
            moved_k, moved_q = (float((now[n] - start[n]).abs().max()) for n in (name, q))
            assert moved_q > 0 and moved_k <= KEY_BIAS_SHARE * moved_q, (name, moved_k, moved_q)


@pytest.fixture(scope="module")
def eager_pretrain(tmp_path_factory):
    """Eager pretraining runs, activation checkpointing off and on: {ckpt: final state}."""
    runs = {}
    for ckpt in ("0", "1"):
        out = tmp_path_factory.mktemp(f"eager-ckpt{ckpt}")
        assert pretrain.main(PRETRAIN + ["--compile", "off", "--grad-checkpointing", ckpt, "--output-dir", str(out)]) == 0
        runs[ckpt] = final_state(out)
    return runs


def initial_pretrain_weights() -> dict:
    """The weights every demo run starts from (mae-pretrain seeds torch before building the model)."""
    torch.manual_seed(0)
    return mae_vit_tiny_patch8(img_size=32).state_dict()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["blocks", "model"])
@pytest.mark.parametrize("ckpt", ["0", "1"])
def test_compiled_pretraining_equals_eager(tmp_path, eager_pretrain, mode, ckpt):
    torch._dynamo.reset()
    out = tmp_path / mode
    assert pretrain.main(PRETRAIN + ["--compile", mode, "--grad-checkpointing", ckpt, "--output-dir", str(out)]) == 0
    compiled = final_state(out)
    assert compiled["config"]["compile"] == mode
    assert_equal_but_key_biases(eager_pretrain[ckpt], compiled, initial_pretrain_weights())


def test_initial_weights_are_the_runs_start(eager_pretrain):
    """The reference start used above is the demo run's (else the key-bias bound would measure nothing)."""
    start, run = initial_pretrain_weights(), eager_pretrain["0"]["model"]
    moved = {k: float((run[k] - start[k]).abs().max()) for k in start}
    assert moved["pos_embed"] == 0 and 0 < moved["blocks.0.attn.qkv.weight"] < 1e-2


@pytest.fixture(scope="module")
def eager_finetune(tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("eager-ft")
    assert finetune.main(FINETUNE + ["--data", str(tree), "--compile", "off", "--output-dir", str(out)]) == 0
    return final_state(out)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["blocks", "model"])
def test_compiled_finetuning_equals_eager(tmp_path, tree, eager_finetune, mode):
    """Drop path 0.5 inside the compiled blocks: Inductor must draw its masks from torch's generator as eager
    does (fallback_random); with its own generator the moments differ by O(1)."""
    torch._dynamo.reset()
    out = tmp_path / mode
    assert finetune.main(FINETUNE + ["--data", str(tree), "--compile", mode, "--output-dir", str(out)]) == 0
    compiled = final_state(out)
    diffs = [d for d in state_differences(eager_finetune, compiled) if not key_bias(d.name)]
    assert diffs[0].relative <= RTOL, diffs[:5]


def test_key_bias_has_no_effect_and_rounding_gradient():
    """The inherent cause, shown: a random key bias leaves the loss unchanged within rounding, and the key
    bias's gradient is rounding noise, a millionth of the query bias's or less."""
    torch.manual_seed(0)
    model = mae_vit_tiny_patch8(img_size=32, norm_pix_loss=True)
    imgs = random_images(4, 32)
    noise = torch.rand(4, 16, generator=torch.Generator().manual_seed(1))
    loss = model(imgs, noise=noise)[0]
    loss.backward()
    for blk in [*model.blocks, *model.decoder_blocks]:
        g_q, g_k, _ = blk.attn.qkv.bias.grad.chunk(3)
        assert float(g_k.abs().max()) <= 1e-6 * float(g_q.abs().max())
    with torch.no_grad():
        for blk in [*model.blocks, *model.decoder_blocks]:
            blk.attn.qkv.bias.chunk(3)[1].copy_(torch.randn(blk.attn.qkv.bias.numel() // 3))
        shifted = model(imgs, noise=noise)[0]
        for blk in model.blocks:
            blk.attn.qkv.bias.chunk(3)[0].add_(0.1)  # the query bias does matter
        moved = model(imgs, noise=noise)[0]
    torch.testing.assert_close(shifted, loss.detach(), rtol=1e-5, atol=0)
    assert abs(float(moved - loss)) > 1e-4
