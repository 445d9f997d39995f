"""The model against the official semantics (docs/semantics.md §3-§6) and its input checks."""
import math

import pytest
import torch

from conftest import random_images, random_noise
from mae_fast.bench.official_mae import official_forward
from mae_fast.kernels import patch_embed_gather
from mae_fast.kernels._utils import masking_reference
from mae_fast import (MODELS, create_model, mae_vit_base_patch16, mae_vit_huge_patch14,
                      mae_vit_large_patch16, mae_vit_tiny_patch8)


@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_matches_official_forward_float64(norm_pix, ratio):
    torch.manual_seed(0)
    m = mae_vit_tiny_patch8(norm_pix_loss=norm_pix).double()
    imgs = random_images(3, 64).double()
    noise = random_noise(3, 64)
    loss, pred, mask = m(imgs, mask_ratio=ratio, noise=noise)
    ref_loss, ref_pred, ref_mask = official_forward(m, imgs, ratio, noise)
    assert torch.equal(mask, ref_mask.to(mask.dtype))
    torch.testing.assert_close(pred, ref_pred, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-10)


def test_matches_official_forward_and_grads_float32(tiny):
    imgs, noise = random_images(2, 64, seed=11), random_noise(2, 64, seed=12)
    loss, pred, mask = tiny(imgs, noise=noise)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in tiny.named_parameters() if p.requires_grad}
    tiny.zero_grad()
    ref_loss, ref_pred, _ = official_forward(tiny, imgs, 0.75, noise)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pred, ref_pred, rtol=1e-4, atol=1e-5)
    for n, p in tiny.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    assert loss.dtype == torch.float32 and pred.shape == (2, 64, 192) and mask.shape == (2, 64)


def test_encoder_output_shape_and_no_mask_tokens(tiny):
    latent, mask, ids_restore = tiny.forward_encoder(random_images(2, 64), 0.75, random_noise(2, 64))
    assert latent.shape == (2, 1 + 16, 96)
    assert ids_restore.shape == (2, 64)
    assert tiny.forward_decoder(latent, ids_restore).shape == (2, 64, 192)


def test_gather_before_embed_equals_embed_then_gather(tiny):
    imgs = random_images(3, 64, seed=4)
    ids_keep = masking_reference(random_noise(3, 64), 0.75).ids_keep
    full = tiny.patch_embed(imgs)  # conv on every patch, as the official code
    expect = torch.gather(full, 1, ids_keep[..., None].expand(-1, -1, 96))
    got = patch_embed_gather(imgs, ids_keep, tiny.patch_embed.weight_in_patch_order(), tiny.patch_embed.proj.bias,
                             torch.zeros(64, 96), 8, backend="torch")
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)


def _direct_loss(imgs, pred, mask, p, norm_pix):
    """Loss by explicit per-patch arithmetic (sum / (P - 1) for the unbiased variance)."""
    N, L, P = pred.shape
    g = imgs.shape[-1] // p
    total, count = 0.0, 0.0
    for n in range(N):
        for i in range(L):
            r, c = divmod(i, g)
            t = imgs[n, :, r * p:(r + 1) * p, c * p:(c + 1) * p].permute(1, 2, 0).reshape(-1).double()
            if norm_pix:
                mu = t.sum() / P
                var = ((t - mu) ** 2).sum() / (P - 1)
                t = (t - mu) / math.sqrt(var + 1e-6)
            err = ((pred[n, i].double() - t) ** 2).sum() / P
            total += float(err) * float(mask[n, i])
            count += float(mask[n, i])
    return total / count


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_formula(norm_pix):
    m = mae_vit_tiny_patch8(norm_pix_loss=norm_pix, img_size=32)
    imgs = random_images(2, 32, seed=21) * 2 + 0.5
    pred = torch.randn(2, 16, 192)
    mask = (random_noise(2, 16, seed=22) > 0.4).float()
    loss = m.forward_loss(imgs, pred, mask)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(_direct_loss(imgs, pred, mask, 8, norm_pix), rel=1e-5)


def test_loss_ignores_visible_patches(tiny):
    imgs = random_images(1, 64)
    pred = torch.randn(1, 64, 192)
    mask = torch.zeros(1, 64)
    mask[0, ::3] = 1
    pred2 = pred.clone()
    pred2[0, 1::3] += 5.0  # visible patches only
    assert tiny.forward_loss(imgs, pred, mask) == tiny.forward_loss(imgs, pred2, mask)


def test_attention_backends_agree(tiny):
    imgs, noise = random_images(2, 64), random_noise(2, 64)
    a = tiny(imgs, noise=noise)[1]
    tiny.set_attn_backend("math")
    b = tiny(imgs, noise=noise)[1]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown attn_backend 'nope'"):
        tiny.set_attn_backend("nope")


def test_init_statistics():
    torch.manual_seed(0)
    D = 768
    m = mae_vit_tiny_patch8(embed_dim=D, depth=1, num_heads=12, decoder_embed_dim=512, decoder_num_heads=16)
    qkv = m.blocks[0].attn.qkv.weight
    bound = math.sqrt(6 / (D + 3 * D))  # xavier on the whole (3D, D) matrix, not per q/k/v
    assert qkv.abs().max() <= bound and qkv.abs().max() > 0.99 * bound
    assert qkv.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)
    fc1 = m.blocks[0].mlp.fc1.weight
    assert fc1.abs().max() <= math.sqrt(6 / (D + 4 * D))
    for name, mod in m.named_modules():
        if isinstance(mod, torch.nn.Linear):
            assert torch.all(mod.bias == 0), name
        if isinstance(mod, torch.nn.LayerNorm):
            assert torch.all(mod.weight == 1) and torch.all(mod.bias == 0) and mod.eps == 1e-6, name
    pw = m.patch_embed.proj.weight
    pbound = math.sqrt(6 / (D + 3 * 64))  # xavier on the (D, 3*p*p) view
    assert pw.abs().max() <= pbound and pw.std().item() == pytest.approx(pbound / math.sqrt(3), rel=0.05)
    pb = m.patch_embed.proj.bias  # PyTorch's conv default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert pb.abs().max() <= 1 / math.sqrt(3 * 64) and pb.abs().max() > 0
    tokens = torch.cat([m.cls_token.flatten(), m.mask_token.flatten()])
    assert tokens.std().item() == pytest.approx(0.02, rel=0.15) and abs(tokens.mean().item()) < 0.004


def expected_official_shapes(D, depth, p, L, Dd=512, ddepth=8):
    """State-dict keys and shapes as docs/semantics.md §7 lists them, built independently of the model."""
    def blocks(prefix, n, d):
        out = {}
        for i in range(n):
            for name, shape in [("norm1.weight", (d,)), ("norm1.bias", (d,)),
                                ("attn.qkv.weight", (3 * d, d)), ("attn.qkv.bias", (3 * d,)),
                                ("attn.proj.weight", (d, d)), ("attn.proj.bias", (d,)),
                                ("norm2.weight", (d,)), ("norm2.bias", (d,)),
                                ("mlp.fc1.weight", (4 * d, d)), ("mlp.fc1.bias", (4 * d,)),
                                ("mlp.fc2.weight", (d, 4 * d)), ("mlp.fc2.bias", (d,))]:
                out[f"{prefix}.{i}.{name}"] = shape
        return out
    return {
        "cls_token": (1, 1, D), "pos_embed": (1, L + 1, D), "mask_token": (1, 1, Dd),
        "decoder_pos_embed": (1, L + 1, Dd),
        "patch_embed.proj.weight": (D, 3, p, p), "patch_embed.proj.bias": (D,),
        **blocks("blocks", depth, D), "norm.weight": (D,), "norm.bias": (D,),
        "decoder_embed.weight": (Dd, D), "decoder_embed.bias": (Dd,),
        **blocks("decoder_blocks", ddepth, Dd), "decoder_norm.weight": (Dd,), "decoder_norm.bias": (Dd,),
        "decoder_pred.weight": (p * p * 3, Dd), "decoder_pred.bias": (p * p * 3,),
    }


@pytest.mark.parametrize("factory,D,depth,p,img", [
    (mae_vit_base_patch16, 768, 12, 16, 224),
    (mae_vit_large_patch16, 1024, 24, 16, 224),
    (mae_vit_huge_patch14, 1280, 32, 14, 224),
    (mae_vit_huge_patch14, 1280, 32, 14, 448),
])
def test_official_keys_and_shapes(factory, D, depth, p, img):
    with torch.device("meta"):
        m = factory(img_size=img)
    got = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert got == expected_official_shapes(D, depth, p, (img // p) ** 2)


def test_factories_accept_decoder_shape_and_img_size():
    with torch.device("meta"):
        m = create_model("mae_vit_large_patch16", img_size=448, norm_pix_loss=True,
                         decoder_embed_dim=256, decoder_depth=1, decoder_num_heads=8)
    assert m.norm_pix_loss and m.config.num_patches == 28 * 28
    assert len(m.decoder_blocks) == 1 and m.decoder_embed.out_features == 256
    assert set(MODELS) >= {"mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14"}
    with torch.device("meta"):
        official = create_model("mae_vit_huge_patch14_dec512d8b")  # the name official checkpoints store
    assert official.patch_size == 14 and len(official.blocks) == 32
    with pytest.raises(ValueError, match="unknown model 'vit_x'"):
        create_model("vit_x")


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_autocast_forward_backward_cpu(tiny, dtype):
    imgs, noise = random_images(2, 64, seed=31), random_noise(2, 64, seed=32)
    ref_loss = tiny(imgs, noise=noise)[0].detach()
    with torch.autocast("cpu", dtype=dtype):
        loss, pred, mask = tiny(imgs, noise=noise)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    for n, p in tiny.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert tiny.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert loss.item() == pytest.approx(ref_loss.item(), rel=3e-2)


# ------------------------------------------------------------------ bad input
def test_img_size_not_multiple_of_patch_at_build():
    with pytest.raises(ValueError, match=r"img_size 100 is not a multiple of patch_size 16"):
        mae_vit_base_patch16(img_size=100)


@pytest.mark.parametrize("shape,match", [
    ((2, 3, 60, 64), r"image size 60x64 is not a multiple of the patch size 8"),
    ((2, 1, 64, 64), r"images have 1 channels; this model takes 3"),
    ((2, 4, 64, 64), r"images have 4 channels"),
    ((2, 3, 72, 72), r"image size 72x72 does not match the model's img_size 64x64"),
    ((3, 64, 64), r"images must be \(N, C, H, W\), got a 3-D tensor"),
])
def test_bad_images(tiny, shape, match):
    with pytest.raises(ValueError, match=match):
        tiny(torch.randn(*shape))


@pytest.mark.parametrize("ratio,match", [
    (0.0, r"mask_ratio must be in \(0, 1\), got 0.0"),
    (1.0, r"mask_ratio must be in \(0, 1\), got 1.0"),
    (-0.2, r"got -0.2"),
    (1.5, r"got 1.5"),
    (0.99, r"mask_ratio 0.99 leaves no visible patch: int\(64 \* \(1 - 0.99\)\) = 0"),
])
def test_bad_mask_ratio(tiny, ratio, match):
    with pytest.raises(ValueError, match=match):
        tiny(random_images(1, 64), mask_ratio=ratio)


def test_bad_noise_shape(tiny):
    with pytest.raises(ValueError, match=r"noise must have shape \(N, L\) = \(2, 64\), got \(2, 49\)"):
        tiny(random_images(2, 64), noise=torch.rand(2, 49))
