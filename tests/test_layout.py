"""docs/semantics.md §1-§2: patch layout and the sin-cos position tables."""
import math

import numpy as np
import pytest
import torch

from conftest import random_images
from mae_fast import mae_vit_tiny_patch8
from mae_fast.pos_embed import get_2d_sincos_pos_embed, resize_pos_embed


def test_patchify_layout_row_major_and_channel_fastest(tiny):
    imgs = random_images(2, 64)
    x = tiny.patchify(imgs)
    p, g = 8, 8
    assert x.shape == (2, g * g, p * p * 3)
    for n, row, col, py, px, c in [(0, 0, 0, 0, 0, 0), (1, 3, 5, 7, 2, 1), (0, 7, 7, 7, 7, 2), (1, 2, 6, 0, 3, 2)]:
        idx = row * g + col
        pos = (py * p + px) * 3 + c
        assert x[n, idx, pos] == imgs[n, c, row * p + py, col * p + px]


def test_unpatchify_is_exact_inverse(tiny):
    imgs = random_images(3, 64, seed=5)
    assert torch.equal(tiny.unpatchify(tiny.patchify(imgs)), imgs)
    patches = torch.randn(2, 64, 192)
    assert torch.equal(tiny.patchify(tiny.unpatchify(patches)), patches)


@pytest.mark.parametrize("dim,grid", [(64, 4), (96, 7), (512, 14)])
def test_sincos_matches_direct_formula(dim, grid):
    table = get_2d_sincos_pos_embed(dim, grid, cls_token=True)
    assert table.shape == (grid * grid + 1, dim) and table.dtype == np.float64
    assert np.all(table[0] == 0)
    quarter = dim // 4
    rng = np.random.default_rng(0)
    for _ in range(20):
        row, col, k = rng.integers(grid), rng.integers(grid), rng.integers(quarter)
        w = 1.0 / 10000 ** (k / quarter)
        v = table[1 + row * grid + col]
        assert v[k] == pytest.approx(math.sin(col * w), abs=1e-12)             # first half: column
        assert v[quarter + k] == pytest.approx(math.cos(col * w), abs=1e-12)
        assert v[2 * quarter + k] == pytest.approx(math.sin(row * w), abs=1e-12)  # second half: row
        assert v[3 * quarter + k] == pytest.approx(math.cos(row * w), abs=1e-12)


def test_model_tables_are_fixed_float32_copies():
    torch.manual_seed(0)
    m = mae_vit_tiny_patch8()
    enc = torch.from_numpy(get_2d_sincos_pos_embed(96, 8, cls_token=True)).float()
    dec = torch.from_numpy(get_2d_sincos_pos_embed(64, 8, cls_token=True)).float()
    assert m.pos_embed.dtype == torch.float32 and not m.pos_embed.requires_grad
    assert not m.decoder_pos_embed.requires_grad
    assert torch.equal(m.pos_embed[0], enc) and torch.equal(m.decoder_pos_embed[0], dec)


def test_resize_pos_embed_keeps_cls_and_matches_bicubic():
    pos = torch.randn(1, 1 + 14 * 14, 32)
    out = resize_pos_embed(pos, 20)
    assert out.shape == (1, 1 + 400, 32)
    assert torch.equal(out[:, 0], pos[:, 0])
    grid = pos[:, 1:].reshape(1, 14, 14, 32).permute(0, 3, 1, 2)
    expect = torch.nn.functional.interpolate(grid, size=(20, 20), mode="bicubic", align_corners=False)
    torch.testing.assert_close(out[:, 1:], expect.permute(0, 2, 3, 1).reshape(1, 400, 32))
    assert resize_pos_embed(pos, 14) is pos


def test_resize_pos_embed_rejects_non_square():
    with pytest.raises(ValueError, match="not a square grid"):
        resize_pos_embed(torch.randn(1, 1 + 15, 8), 4)
