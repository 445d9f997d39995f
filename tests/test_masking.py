"""docs/semantics.md §3: per-sample random masking."""
import pytest
import torch

from conftest import random_noise


@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.9])
def test_masking_counts_and_inverse(tiny, ratio):
    N, L = 5, 64
    noise = random_noise(N, L)
    ids_keep, mask, ids_restore = tiny.masking_ids(N, ratio, noise)
    keep = int(L * (1 - ratio))
    assert ids_keep.shape == (N, keep)
    assert mask.dtype == torch.float32 and mask.shape == (N, L)
    assert torch.all(mask.sum(1) == L - keep)
    ids_shuffle = torch.argsort(noise, dim=1)
    # ids_restore inverts ids_shuffle
    assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), torch.arange(L).expand(N, L))
    # kept tokens are the smallest noise values, in noise order (not spatial order)
    assert torch.equal(ids_keep, ids_shuffle[:, :keep])
    kept_noise = torch.gather(noise, 1, ids_keep)
    assert torch.all(kept_noise[:, 1:] >= kept_noise[:, :-1])
    # mask 1 = removed, in original patch order
    expect = torch.ones(N, L)
    expect.scatter_(1, ids_keep, 0.0)
    assert torch.equal(mask, expect)


def test_same_noise_same_mask_and_rng_when_no_noise(tiny):
    noise = random_noise(3, 64, seed=7)
    a = tiny.masking_ids(3, 0.75, noise)
    b = tiny.masking_ids(3, 0.75, noise.clone())
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    torch.manual_seed(123)
    c = tiny.masking_ids(3, 0.75)
    torch.manual_seed(123)
    d = tiny.masking_ids(3, 0.75)
    assert all(torch.equal(x, y) for x, y in zip(c, d))
    torch.manual_seed(123)
    e = tiny.masking_ids(3, 0.75, torch.rand(3, 64))
    assert all(torch.equal(x, y) for x, y in zip(c, e))  # RNG path draws torch.rand(N, L)


def test_official_random_masking_api(tiny):
    x = torch.randn(2, 64, 10)
    noise = random_noise(2, 64)
    x_masked, mask, ids_restore = tiny.random_masking(x, 0.75, noise)
    ids_keep = torch.argsort(noise, 1)[:, :16]
    assert torch.equal(x_masked, torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, 10)))
    assert mask.sum() == 2 * 48


def test_masks_differ_per_sample(tiny):
    _, mask, _ = tiny.masking_ids(4, 0.75, random_noise(4, 64, seed=3))
    assert len({tuple(r.tolist()) for r in mask}) == 4
