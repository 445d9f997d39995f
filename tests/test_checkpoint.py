"""docs/semantics.md §7: official-format checkpoints, encoder-only files, errors, timm export."""
import argparse
import logging

import pytest
import timm
import torch

from conftest import random_images, random_noise
from mae_fast import mae_vit_tiny_patch8
from mae_fast.checkpoint import encoder_state_dict, load_mae_checkpoint, save_checkpoint
from mae_fast.errors import CheckpointError


def _official_file(tmp_path, model, encoder_only=False, name="ckpt.pth"):
    sd = model.state_dict()
    if encoder_only:
        sd = {k: v for k, v in sd.items() if not k.startswith(("decoder_", "mask_token"))}
    # as main_pretrain.py writes it: model, optimizer, epoch, scaler, args (an argparse Namespace)
    obj = {"model": sd, "optimizer": {"state": {}, "param_groups": []}, "epoch": 3,
           "scaler": {"scale": 65536.0}, "args": argparse.Namespace(model="mae_vit_tiny_patch8", blr=1.5e-4)}
    path = tmp_path / name
    torch.save(obj, path)
    return path


def test_round_trip_official_format(tmp_path):
    torch.manual_seed(0)
    src = mae_vit_tiny_patch8(norm_pix_loss=True)
    path = _official_file(tmp_path, src)
    torch.manual_seed(1)
    dst = mae_vit_tiny_patch8(norm_pix_loss=True)
    report = load_mae_checkpoint(dst, path)
    assert not report.encoder_only and len(report.loaded) == len(src.state_dict())
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    imgs, noise = random_images(2, 64), random_noise(2, 64)
    assert torch.equal(src(imgs, noise=noise)[0], dst(imgs, noise=noise)[0])


def test_ddp_prefixed_state_dict_loads():
    torch.manual_seed(0)
    src = mae_vit_tiny_patch8()
    dst = mae_vit_tiny_patch8()
    load_mae_checkpoint(dst, {"model": {f"module.{k}": v for k, v in src.state_dict().items()}})
    assert torch.equal(dst.cls_token, src.cls_token)


def test_encoder_only_reports_missing_decoder_in_one_line(tmp_path, caplog):
    torch.manual_seed(0)
    src = mae_vit_tiny_patch8()
    path = _official_file(tmp_path, src, encoder_only=True, name="mae_pretrain_vit_tiny.pth")
    torch.manual_seed(5)
    dst = mae_vit_tiny_patch8()
    dec_before = dst.decoder_pred.weight.clone()
    with caplog.at_level(logging.WARNING, logger="mae_fast.checkpoint"):
        report = load_mae_checkpoint(dst, path)
    assert report.encoder_only
    assert torch.equal(dst.blocks[2].attn.qkv.weight, src.blocks[2].attn.qkv.weight)
    assert torch.equal(dst.decoder_pred.weight, dec_before)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "\n" not in lines[0]
    msg = lines[0]
    assert "mae_pretrain_vit_tiny.pth" in msg and "encoder-only" in msg
    assert "mask_token" in msg and "decoder_blocks.0-1.*" in msg and "decoder_pred.*" in msg


def test_other_size_names_first_mismatching_key_and_shapes(tmp_path):
    src = mae_vit_tiny_patch8(embed_dim=48, num_heads=3)
    path = _official_file(tmp_path, src)
    with pytest.raises(CheckpointError) as e:
        load_mae_checkpoint(mae_vit_tiny_patch8(), path)
    msg = str(e.value)
    assert str(path) in msg and "'cls_token'" in msg and "(1, 1, 48)" in msg and "(1, 1, 96)" in msg


def test_other_resolution_names_pos_embed(tmp_path):
    path = _official_file(tmp_path, mae_vit_tiny_patch8(img_size=32))
    with pytest.raises(CheckpointError, match=r"'pos_embed' has shape \(1, 17, 96\).*\(1, 65, 96\).*resize_pos_embed"):
        load_mae_checkpoint(mae_vit_tiny_patch8(), path)


def test_other_model_unexpected_and_missing_keys(tmp_path):
    sd = mae_vit_tiny_patch8().state_dict()
    with pytest.raises(CheckpointError, match=r"key 'head.weight' is not in this model"):
        load_mae_checkpoint(mae_vit_tiny_patch8(), {"model": {**sd, "head.weight": torch.randn(10, 96)}})
    del sd["blocks.3.norm1.weight"]
    with pytest.raises(CheckpointError, match=r"encoder key 'blocks.3.norm1.weight' is missing"):
        load_mae_checkpoint(mae_vit_tiny_patch8(), {"model": sd})
    with pytest.raises(CheckpointError, match=r"no 'model' key and not a state_dict"):
        load_mae_checkpoint(mae_vit_tiny_patch8(), {"epoch": 3, "optimizer": {}})


def test_corrupt_truncated_empty_missing_files(tmp_path):
    good = _official_file(tmp_path, mae_vit_tiny_patch8())
    data = good.read_bytes()
    (tmp_path / "trunc.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    for name, match in [("trunc.pth", "cannot be read"), ("empty.pth", "file is empty"),
                        ("text.pth", "cannot be read"), ("absent.pth", "no such file")]:
        with pytest.raises(CheckpointError, match=match) as e:
            load_mae_checkpoint(mae_vit_tiny_patch8(), tmp_path / name)
        assert name in str(e.value)


def test_save_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "c.pth"
    save_checkpoint({"model": {"w": torch.randn(3)}, "step": 1}, path)
    first = path.read_bytes()

    def boom(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint({"model": {"w": torch.randn(3)}, "step": 2}, path)
    assert path.read_bytes() == first
    assert [p.name for p in tmp_path.iterdir()] == ["c.pth"]  # no temp file left behind


def test_timm_vit_equals_encoder_features():
    torch.manual_seed(0)
    m = mae_vit_tiny_patch8()
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=64, patch_size=8, embed_dim=96, depth=4, num_heads=3, mlp_ratio=4.0, qkv_bias=True,
        num_classes=10)
    result = vit.load_state_dict(encoder_state_dict(m), strict=False)
    assert sorted(result.missing_keys) == ["head.bias", "head.weight"] and not result.unexpected_keys
    vit.eval()
    imgs = random_images(2, 64)
    torch.testing.assert_close(vit.forward_features(imgs), m.forward_features(imgs), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mae_name,timm_name", [
    ("mae_vit_base_patch16", "vit_base_patch16_224"),
    ("mae_vit_large_patch16", "vit_large_patch16_224"),
    ("mae_vit_huge_patch14", "vit_huge_patch14_224"),
])
def test_timm_official_models_load_encoder(mae_name, timm_name):
    from mae_fast import create_model
    with torch.device("meta"):
        m = create_model(mae_name)
        vit = timm.create_model(timm_name, pretrained=False, num_classes=1000)
    result = vit.load_state_dict(encoder_state_dict(m), strict=False, assign=True)
    assert sorted(result.missing_keys) == ["head.bias", "head.weight"] and not result.unexpected_keys


def test_export_resizes_pos_embed_for_another_resolution():
    torch.manual_seed(0)
    m = mae_vit_tiny_patch8()
    enc = encoder_state_dict(m, img_size=96)
    assert enc["pos_embed"].shape == (1, 1 + 12 * 12, 96)
    assert torch.equal(enc["pos_embed"][:, 0], m.pos_embed[:, 0])
    big = mae_vit_tiny_patch8(img_size=96)
    load_mae_checkpoint(big, {"model": enc})  # encoder-only at 96 px
    with pytest.raises(ValueError, match="img_size 100 is not a multiple of the patch size 8"):
        encoder_state_dict(m, img_size=100)
