"""mae-convert: Hugging Face ViTMAE folders and timm .safetensors encoders <-> mae-fast checkpoints."""
import argparse
import json
import sys

import pytest
import timm
import torch
from safetensors.torch import load_file

from conftest import random_images, random_noise
from mae_fast import mae_vit_tiny_patch8
from mae_fast.checkpoint import load_mae_checkpoint, read_checkpoint
from mae_fast.errors import CheckpointError
from mae_fast.convert import convert, main
from mae_fast.errors import ConvertError
from mae_fast.hf import (from_hf_state_dict, hf_config, mae_config, read_hf_folder, to_hf_state_dict,
                         write_hf_folder)
from mae_fast.models_mae import MaskedAutoencoderViT

# float32: each implementation is itself ~1.3e-6 from the float64 result on these outputs (|x| <= 2.7, about
# 5 ulps; measured on an AMD EPYC, whose BLAS splits our fused qkv and HF's q/k/v GEMMs differently), so
# the two can differ by twice that; the float64 case holds them equal to 1e-12
FP32_TOL = dict(rtol=1e-5, atol=5e-6)


@pytest.fixture
def tf():
    """transformers, to check the folders written (the converter itself does not need it)."""
    return pytest.importorskip("transformers", reason="transformers is not installed: HF folders cannot be checked")


def _official_file(path, model, mask_ratio=0.75, encoder_only=False):
    """An official-format file: main_pretrain.py's dict with the argparse Namespace."""
    sd = {k: v for k, v in model.state_dict().items() if not (encoder_only and k.startswith(("decoder_", "mask_")))}
    args = argparse.Namespace(model="mae_vit_tiny_patch8", input_size=model.img_size, mask_ratio=mask_ratio,
                              norm_pix_loss=model.norm_pix_loss)
    torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": []}, "epoch": 3, "args": args}, path)
    return path


def _hf(folder, cls):
    """``cls.from_pretrained`` offline, asserting every weight came from the folder."""
    model, info = cls.from_pretrained(folder, output_loading_info=True, local_files_only=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def _assert_same_tensors(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("dtype,norm_pix_loss,mask_ratio,tol", [
    (torch.float32, False, 0.75, FP32_TOL),
    (torch.float64, True, 0.6, dict(rtol=1e-12, atol=1e-12)),
])
def test_hf_model_gives_same_loss_prediction_and_mask(tf, tmp_path, dtype, norm_pix_loss, mask_ratio, tol):
    torch.manual_seed(0)
    ours = mae_vit_tiny_patch8(norm_pix_loss=norm_pix_loss).to(dtype).eval()
    with torch.no_grad():  # a trained-looking decoder: no zero biases, no unit LayerNorms
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    src = _official_file(tmp_path / "ckpt.pth", ours, mask_ratio)
    report = convert(src, tmp_path / "hf")
    assert any("epoch, optimizer: training state" in d for d in report.dropped)
    theirs = _hf(tmp_path / "hf", tf.ViTMAEForPreTraining)
    assert theirs.config.mask_ratio == mask_ratio and theirs.config.norm_pix_loss == norm_pix_loss
    assert next(theirs.parameters()).dtype == dtype
    imgs, noise = random_images(3, 64).to(dtype), random_noise(3, 64).to(dtype)
    with torch.no_grad():
        out = theirs(pixel_values=imgs, noise=noise)
        loss, pred, mask = ours(imgs, mask_ratio=mask_ratio, noise=noise)
    assert torch.equal(out.mask, mask) and mask.sum() == 3 * (64 - int(64 * (1 - mask_ratio)))
    torch.testing.assert_close(out.logits, pred, **tol)
    torch.testing.assert_close(out.loss, loss.to(out.loss.dtype), **tol)


def test_qkv_is_split_into_query_key_value_rows():
    torch.manual_seed(0)
    m = mae_vit_tiny_patch8()
    hf = to_hf_state_dict(m.state_dict())
    qkv_w, qkv_b = m.decoder_blocks[1].attn.qkv.weight, m.decoder_blocks[1].attn.qkv.bias
    for i, part in enumerate(("query", "key", "value")):
        pre = f"decoder.decoder_layers.1.attention.attention.{part}"
        assert torch.equal(hf[f"{pre}.weight"], qkv_w[64 * i: 64 * (i + 1)])
        assert torch.equal(hf[f"{pre}.bias"], qkv_b[64 * i: 64 * (i + 1)])
    assert torch.equal(hf["vit.encoder.layer.3.attention.output.dense.weight"], m.blocks[3].attn.proj.weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_mae_hf_mae_is_identical(tmp_path, dtype):
    torch.manual_seed(0)
    m = mae_vit_tiny_patch8(norm_pix_loss=True).to(dtype)
    src = tmp_path / "a.pth"
    torch.save({"model": m.state_dict(), "config": {"model": "mae_vit_tiny_patch8", "img_size": 64,
                                                     "norm_pix_loss": True, "mask_ratio": 0.7}}, src)
    convert(src, tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "b.pth")
    back = read_checkpoint(tmp_path / "b.pth")
    _assert_same_tensors(m.state_dict(), back["model"])
    assert back["config"]["mask_ratio"] == 0.7 and back["config"]["norm_pix_loss"] is True
    assert back["config"]["model"] == "mae_vit_tiny_patch8"


def test_config_of_another_shape_round_trips(tf, tmp_path):
    torch.manual_seed(0)
    m = MaskedAutoencoderViT(img_size=40, patch_size=4, in_chans=3, embed_dim=48, depth=3, num_heads=4,
                             decoder_embed_dim=40, decoder_depth=3, decoder_num_heads=5, mlp_ratio=2.0)
    fields = hf_config(m.config, 0.55)
    assert {k: fields[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                                   "image_size", "patch_size", "decoder_hidden_size", "decoder_num_hidden_layers",
                                   "decoder_num_attention_heads", "decoder_intermediate_size", "layer_norm_eps",
                                   "hidden_act", "qkv_bias", "mask_ratio", "norm_pix_loss")} == dict(
        hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96, image_size=40,
        patch_size=4, decoder_hidden_size=40, decoder_num_hidden_layers=3, decoder_num_attention_heads=5,
        decoder_intermediate_size=80, layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True, mask_ratio=0.55,
        norm_pix_loss=False)
    assert mae_config(fields) == (m.config, 0.55, [])
    assert mae_config(tf.ViTMAEConfig(**fields).to_dict())[:2] == (m.config, 0.55)
    write_hf_folder(tmp_path / "hf", m.state_dict(), m.config, 0.55)
    convert(tmp_path / "hf", tmp_path / "x.pth")  # no factory has this shape: the .pth keeps it whole
    convert(tmp_path / "x.pth", tmp_path / "hf2")
    assert json.loads((tmp_path / "hf2/config.json").read_text()) == json.loads((tmp_path / "hf/config.json").read_text())
    _assert_same_tensors(m.state_dict(), read_hf_folder(tmp_path / "hf2").state_dict)
    theirs = _hf(tmp_path / "hf2", tf.ViTMAEForPreTraining)
    imgs, noise = random_images(2, 40), random_noise(2, 100)
    with torch.no_grad():
        torch.testing.assert_close(theirs(pixel_values=imgs, noise=noise).logits,
                                   m(imgs, mask_ratio=0.55, noise=noise)[1], **FP32_TOL)


def test_model_made_and_saved_by_transformers_converts(tf, tmp_path):
    """transformers >= 5 writes its own spelling (decoder_encoder.layer.N) and holds another in memory."""
    torch.manual_seed(3)
    cfg = tf.ViTMAEConfig(**hf_config(mae_vit_tiny_patch8(norm_pix_loss=True).config, 0.75))
    theirs = tf.ViTMAEForPreTraining(cfg).eval()
    theirs.save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "m.pth")
    ours = mae_vit_tiny_patch8(norm_pix_loss=True).eval()
    load_mae_checkpoint(ours, tmp_path / "m.pth")
    native = from_hf_state_dict(dict(theirs.named_parameters()))
    _assert_same_tensors(ours.state_dict(), {k: native[k] for k in ours.state_dict()})
    theirs.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded/model.safetensors.index.json").is_file()
    _assert_same_tensors(ours.state_dict(), read_hf_folder(tmp_path / "sharded").state_dict)
    imgs, noise = random_images(2, 64), random_noise(2, 64)
    with torch.no_grad():
        out = theirs(pixel_values=imgs, noise=noise)
        loss, pred, mask = ours(imgs, noise=noise)
    assert torch.equal(out.mask, mask)
    torch.testing.assert_close(out.logits, pred, **FP32_TOL)
    torch.testing.assert_close(out.loss, loss, **FP32_TOL)


def test_encoder_only_hf_folder_is_a_vitmaemodel(tf, tmp_path):
    torch.manual_seed(0)
    ours = mae_vit_tiny_patch8().eval()
    src = _official_file(tmp_path / "enc.pth", ours, encoder_only=True)
    with pytest.raises(ConvertError, match=r"enc\.pth: encoder-only .*pass --encoder-only"):
        convert(src, tmp_path / "full")
    convert(src, tmp_path / "enc", encoder_only=True)
    theirs = _hf(tmp_path / "enc", tf.ViTMAEModel)
    imgs, noise = random_images(2, 64), random_noise(2, 64)
    with torch.no_grad():
        latent, mask, ids_restore = ours.forward_encoder(imgs, 0.75, noise)
        out = theirs(pixel_values=imgs, noise=noise)
    assert torch.equal(out.mask, mask) and torch.equal(out.ids_restore, ids_restore)
    torch.testing.assert_close(out.last_hidden_state, latent, rtol=1e-5, atol=1e-5)
    back = read_checkpoint(tmp_path / "enc")  # and back: an encoder-only checkpoint
    _assert_same_tensors({k: v for k, v in ours.state_dict().items() if k in back["model"]}, back["model"])
    assert load_mae_checkpoint(mae_vit_tiny_patch8(), tmp_path / "enc").encoder_only


def test_folder_written_without_transformers_loads_in_transformers(tf, tmp_path, monkeypatch):
    torch.manual_seed(0)
    m = mae_vit_tiny_patch8(norm_pix_loss=True)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    write_hf_folder(tmp_path / "hf", m.state_dict(), m.config, 0.7)
    monkeypatch.undo()
    assert "transformers_version" not in json.loads((tmp_path / "hf/config.json").read_text())
    theirs = _hf(tmp_path / "hf", tf.ViTMAEForPreTraining)
    assert theirs.config.mask_ratio == 0.7 and theirs.config.norm_pix_loss and theirs.config.layer_norm_eps == 1e-6
    back = from_hf_state_dict(theirs.state_dict())
    assert sorted(back) == sorted(m.state_dict())
    _assert_same_tensors(m.state_dict(), {k: back[k] for k in m.state_dict()})


def test_full_checkpoint_to_hf_encoder_only_lists_the_decoder(tmp_path):
    src = _official_file(tmp_path / "c.pth", mae_vit_tiny_patch8())
    report = convert(src, tmp_path / "enc", encoder_only=True)
    assert any("decoder weights" in d and "decoder_blocks.0-1.*" in d and "--encoder-only" in d for d in report.dropped)
    assert json.loads((tmp_path / "enc/config.json").read_text())["architectures"] == ["ViTMAEModel"]


def test_timm_safetensors_loads_into_vision_transformer(tmp_path):
    torch.manual_seed(0)
    m = mae_vit_tiny_patch8().eval()
    report = convert(_official_file(tmp_path / "c.pth", m), tmp_path / "enc.safetensors")
    assert any("decoder weights" in d and "timm VisionTransformer has no decoder" in d for d in report.dropped)
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=64, patch_size=8, embed_dim=96, depth=4, num_heads=3, mlp_ratio=4.0, qkv_bias=True, num_classes=10)
    result = vit.load_state_dict(load_file(tmp_path / "enc.safetensors"), strict=False)
    assert sorted(result.missing_keys) == ["head.bias", "head.weight"] and not result.unexpected_keys
    imgs = random_images(2, 64)
    with torch.no_grad():
        torch.testing.assert_close(vit.eval().forward_features(imgs), m.forward_features(imgs), rtol=1e-4, atol=1e-5)
    # and back, with the classifier head a timm model adds named as left behind
    sd = {**load_file(tmp_path / "enc.safetensors"), "head.weight": torch.randn(10, 96), "head.bias": torch.randn(10)}
    from safetensors.torch import save_file
    save_file(sd, tmp_path / "clf.safetensors")
    report = convert(tmp_path / "clf.safetensors", tmp_path / "hf", encoder_only=True, model="mae_vit_tiny_patch8")
    assert any(d.startswith("head.* (2 tensors)") for d in report.dropped)
    _assert_same_tensors({k: v for k, v in m.state_dict().items() if not k.startswith(("decoder", "mask"))},
                         read_hf_folder(tmp_path / "hf").state_dict)


def test_init_from_finetune_and_visualize_read_an_hf_folder(tmp_path):
    from mae_fast.train.evaluation.classifier import create_classifier, load_pretrained
    from mae_fast.train.visualize import model_from_checkpoint

    torch.manual_seed(0)
    src = mae_vit_tiny_patch8(norm_pix_loss=True)
    write_hf_folder(tmp_path / "hf", src.state_dict(), src.config)
    torch.manual_seed(1)
    dst = mae_vit_tiny_patch8(norm_pix_loss=True)
    report = load_mae_checkpoint(dst, tmp_path / "hf")  # what mae-pretrain --init-from does
    assert not report.encoder_only
    _assert_same_tensors(src.state_dict(), dst.state_dict())
    clf = create_classifier("vit_tiny_patch8", 5, 64)
    missing = load_pretrained(clf, tmp_path / "hf")  # mae-finetune --finetune
    assert set(missing) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    assert torch.equal(clf.blocks[1].attn.qkv.weight, src.blocks[1].attn.qkv.weight)
    vis = model_from_checkpoint(str(tmp_path / "hf"))  # mae-visualize --checkpoint
    assert vis.norm_pix_loss and vis.img_size == 64
    _assert_same_tensors(src.state_dict(), vis.state_dict())


def test_hf_layer_norm_eps_and_dropout_are_reported(tmp_path):
    m = mae_vit_tiny_patch8()
    write_hf_folder(tmp_path / "hf", m.state_dict(), m.config)
    cfg = json.loads((tmp_path / "hf/config.json").read_text())
    cfg.update(layer_norm_eps=1e-12, hidden_dropout_prob=0.1)  # facebook/vit-mae-base's eps
    (tmp_path / "hf/config.json").write_text(json.dumps(cfg))
    report = convert(tmp_path / "hf", tmp_path / "m.pth")
    assert any(n.startswith("layer_norm_eps 1e-12 not carried over") for n in report.notes)
    assert any(n.startswith("hidden_dropout_prob 0.1 not carried over") for n in report.notes)


def _one_line_error(capsys, argv):
    assert main([str(a) for a in argv]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mae-convert: error: ")
    return err


def test_bad_inputs_give_one_line_errors_naming_the_path(tmp_path, capsys):
    m = mae_vit_tiny_patch8()
    write_hf_folder(tmp_path / "hf", m.state_dict(), m.config)
    (tmp_path / "hf/config.json").rename(tmp_path / "hf/other.json")
    err = _one_line_error(capsys, [tmp_path / "hf", tmp_path / "a.pth"])
    assert f"{tmp_path / 'hf'}: no config.json" in err
    with pytest.raises(CheckpointError, match="no config.json"):
        load_mae_checkpoint(mae_vit_tiny_patch8(), tmp_path / "hf")

    write_hf_folder(tmp_path / "wide", m.state_dict(), m.config)
    cfg = json.loads((tmp_path / "wide/config.json").read_text())
    cfg.update(hidden_size=48, num_attention_heads=4, intermediate_size=192)
    (tmp_path / "wide/config.json").write_text(json.dumps(cfg))
    err = _one_line_error(capsys, [tmp_path / "wide", tmp_path / "b.pth"])
    assert str(tmp_path / "wide") in err and "'cls_token' has shape (1, 1, 96)" in err and "(1, 1, 48)" in err

    src = _official_file(tmp_path / "c.pth", m)
    err = _one_line_error(capsys, [src, tmp_path / "out.npz"])
    assert "out.npz" in err and "unknown direction" in err
    err = _one_line_error(capsys, [tmp_path / "absent.pth", tmp_path / "x"])
    assert "absent.pth: no such file" in err
    err = _one_line_error(capsys, [src, tmp_path / "d.pth", "--model", "mae_vit_base_patch16"])
    assert "c.pth" in err and "'cls_token' has shape (1, 1, 96) in the checkpoint but (1, 1, 768)" in err
    err = _one_line_error(capsys, [src, tmp_path / "wide"])
    assert "wide: exists; pass --overwrite" in err
    (tmp_path / "run").mkdir()
    (tmp_path / "run/config.json").write_text(json.dumps({"model": "mae_vit_tiny_patch8", "img_size": 64}))
    err = _one_line_error(capsys, [tmp_path / "run", tmp_path / "f.pth"])
    assert "run/config.json: no model_type" in err

    (tmp_path / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    err = _one_line_error(capsys, [tmp_path / "broken.safetensors", tmp_path / "e.pth"])
    assert "broken.safetensors" in err


def test_hf_weights_that_mae_fast_does_not_know_are_refused():
    hf = to_hf_state_dict(mae_vit_tiny_patch8().state_dict())
    with pytest.raises(CheckpointError, match=r"key 'classifier.weight' is not a ViTMAE weight"):
        from_hf_state_dict({**hf, "classifier.weight": torch.randn(3, 96)}, "folder")
    del hf["vit.encoder.layer.2.attention.attention.key.weight"]
    with pytest.raises(CheckpointError, match=r"blocks 2: attention weight has no key tensor"):
        from_hf_state_dict(hf, "folder")
    with pytest.raises(CheckpointError, match=r"hidden_act 'gelu_new'"):
        mae_config({**hf_config(mae_vit_tiny_patch8().config), "hidden_act": "gelu_new"})
