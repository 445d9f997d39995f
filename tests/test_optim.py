"""The recipe's optimizer pieces: no-decay groups as the official code, per-iteration schedule."""
import math

import pytest

from mae_fast import mae_vit_tiny_patch8
from mae_fast.train.engine.optim import build_adamw, lr_at, param_groups_weight_decay


def test_no_decay_on_norms_and_biases_but_tokens_decayed():
    m = mae_vit_tiny_patch8()
    no_decay, decay = param_groups_weight_decay(m, 0.05)
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05
    names = {id(p): n for n, p in m.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert "blocks.0.norm1.weight" in nd and "blocks.0.attn.qkv.bias" in nd and "patch_embed.proj.bias" in nd
    assert "cls_token" in d and "mask_token" in d and "blocks.0.attn.qkv.weight" in d
    assert "patch_embed.proj.weight" in d
    assert "pos_embed" not in nd | d and "decoder_pos_embed" not in nd | d  # frozen tables
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert sum(p.numel() for g in (no_decay, decay) for p in g["params"]) == trainable
    opt = build_adamw(m, 1e-3, 0.05)
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults.get("fused")


def test_lr_schedule_warmup_then_half_cosine():
    base = 2.4e-3
    assert lr_at(0, base, 40, 800) == 0.0
    assert lr_at(20, base, 40, 800) == pytest.approx(base / 2)
    assert lr_at(40, base, 40, 800) == pytest.approx(base)
    assert lr_at(420, base, 40, 800) == pytest.approx(base / 2)
    assert lr_at(800, base, 40, 800) == pytest.approx(0.0, abs=1e-15)
    e = 123.4
    assert lr_at(e, base, 40, 800, min_lr=1e-6) == pytest.approx(
        1e-6 + (base - 1e-6) * 0.5 * (1 + math.cos(math.pi * (e - 40) / 760)))
