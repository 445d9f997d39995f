"""Analytic FLOPs vs torch.utils.flop_counter, parameter counts, and the mae-flops command."""
import json

import pytest

from mae_fast.bench.flops import main as flops_main
from mae_fast.flops import analytic_parts, count_flops
from mae_fast.models_mae import MAEConfig


@pytest.mark.parametrize("name,img", [
    ("mae_vit_base_patch16", 224), ("mae_vit_large_patch16", 224),
    ("mae_vit_huge_patch14", 224), ("mae_vit_huge_patch14", 448),
])
def test_analytic_agrees_with_flop_counter(name, img):
    r = count_flops(name, check=True, img_size=img, norm_pix_loss=True)
    assert r.counter_check["forward_counter"] > 0
    assert r.counter_check["forward_rel_diff"] < 0.01
    assert r.counter_check["training_rel_diff"] < 0.01


@pytest.mark.parametrize("name,enc,dec,train_gf", [
    ("mae_vit_base_patch16", 85.6, 26.0, 58), ("mae_vit_large_patch16", 303.1, 26.1, 124),
    ("mae_vit_huge_patch14", 630.4, 26.2, 291),
])
def test_params_and_training_flops_match_reference(name, enc, dec, train_gf):
    r = count_flops(name)
    assert r.params["encoder"] / 1e6 == pytest.approx(enc, abs=0.05)
    assert r.params["decoder"] / 1e6 == pytest.approx(dec, abs=0.05)
    assert r.total("training") / 1e9 == pytest.approx(train_gf, rel=0.01)


def test_paper_ratios_for_vit_large():
    r = count_flops("mae_vit_large_patch16")
    assert r.encoder_with_mask_tokens["model_ratio"] == pytest.approx(3.3, abs=0.1)
    assert r.decoder_vs_encoder_per_token == pytest.approx(0.09, abs=0.01)


def test_block_formula_by_hand():
    cfg = MAEConfig(img_size=32, patch_size=8, embed_dim=8, depth=1, num_heads=2,
                    decoder_embed_dim=4, decoder_depth=1, decoder_num_heads=1)
    parts = {p.name: p for p in analytic_parts(cfg, mask_ratio=0.75)}
    # 16 patches, 4 kept, 5 encoder tokens, 17 decoder tokens; P = 192
    assert parts["patch_embed"].forward == 2 * 4 * 192 * 8
    assert parts["encoder_linear"].forward == 2 * 5 * (8 * 24 + 8 * 8 + 8 * 32 + 32 * 8)
    assert parts["encoder_attention"].forward == 2 * (2 * 5 * 5 * 8)
    assert parts["decoder_attention"].backward == 2 * parts["decoder_attention"].forward
    assert parts["pred_head"].forward == 2 * 17 * 4 * 192
    assert parts["patch_embed"].backward == parts["patch_embed"].forward


def test_cli_table_and_json(capsys):
    assert flops_main(["--model", "mae_vit_large_patch16", "--check"]) == 0
    out = capsys.readouterr().out
    for word in ["patch_embed", "encoder_linear", "encoder_attention", "decoder_embed", "decoder_linear",
                 "decoder_attention", "pred_head", "loss", "303.1M", "3.25x", "8.9%", "FlopCounterMode"]:
        assert word in out, word
    assert flops_main(["--model", "mae_vit_huge_patch14", "--img-size", "448", "--decoder-depth", "4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data[0]["tokens"] == {"patches": 1024, "visible": 256, "encoder": 257, "decoder": 1025}
    assert data[0]["config"]["decoder_depth"] == 4
    assert data[0]["total_per_image"]["training"] > data[0]["total_per_image"]["forward"] * 2.9


def test_cli_bad_input(capsys):
    assert flops_main(["--model", "mae_vit_huge_patch14", "--img-size", "230"]) == 2
    assert "img_size 230 is not a multiple of patch_size 14" in capsys.readouterr().err
    assert flops_main(["--model", "mae_vit_base_patch16", "--mask-ratio", "1.2"]) == 2
    assert "mask_ratio must be in (0, 1), got 1.2" in capsys.readouterr().err


def test_cli_defines_train_gf_and_gives_the_paper_ratio_only_for_vit_large(capsys):
    assert flops_main(["--model", "mae_vit_large_patch16", "--model", "mae_vit_base_patch16"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    train_gf = [line for line in lines if line.startswith("train GF = ")]
    assert len(train_gf) == 1 and "forward + backward FLOPs per image" in train_gf[0]
    assert "visible patches only" in train_gf[0] and "optimizer step not counted" in train_gf[0]
    ratio = [line for line in lines if line.startswith("mask-token ratio = ")]
    assert len(ratio) == 1 and "encoder run on all patches" in ratio[0] and "Table 1c" in ratio[0]
    enc = [line for line in lines if line.startswith("encoder with mask tokens")]
    large, base = (count_flops(n).encoder_with_mask_tokens["model_ratio"]
                   for n in ("mae_vit_large_patch16", "mae_vit_base_patch16"))
    assert enc[0].endswith(f"mask-token ratio {large:.2f}x (paper: 3.3x for ViT-L)")
    assert enc[1].endswith(f"mask-token ratio {base:.2f}x")  # the paper gives no ratio for ViT-B
    assert out.count("paper: 3.3x") == 1 and out.count("paper: 9%") == 1


def test_cli_several_image_sizes(capsys):
    args = ["--model", "mae_vit_large_patch16", "--img-size", "224", "--img-size", "448"]
    assert flops_main(args) == 0
    out = capsys.readouterr().out
    assert "mae_vit_large_patch16  img 224px" in out and "mae_vit_large_patch16  img 448px" in out
    assert out.count("fwd GF") == 2 and out.count("train GF = ") == 1
    assert out.count("(paper: 3.3x for ViT-L)") == 1  # at 224 px only, the paper's setting
    assert flops_main(args + ["--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["img_size"] for d in data] == [d["config"]["img_size"] for d in data] == [224, 448]
    assert [d["tokens"]["patches"] for d in data] == [196, 784]
    assert [d["paper_model_ratio"] for d in data] == [3.3, None]
    before = count_flops("mae_vit_large_patch16", img_size=448, norm_pix_loss=True).to_dict()
    assert set(before) < set(data[1]) and data[1]["total_per_image"] == before["total_per_image"]
