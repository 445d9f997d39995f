"""train/evaluation/classifier.py, the part mae-finetune and mae-linprobe share: the classifier model, loading an
MAE encoder into it (pos_embed resizing, official/encoder-only/full checkpoints, errors naming key and shapes),
loading a trained model exactly, and top-k counting."""
import pytest
import torch
import torch.nn.functional as F

from mae_fast import mae_vit_tiny_patch8
from mae_fast.errors import CheckpointError
from mae_fast.device import DistInfo
from mae_fast.train.evaluation.classifier import accuracy_text, create_classifier, evaluate, load_pretrained, \
    load_trained, topk_hits


@pytest.mark.parametrize("size", [32, 128])
def test_pos_embed_resize_on_load(mae_ckpt, size):
    src = torch.load(mae_ckpt, weights_only=False)["model"]["pos_embed"]  # (1, 1 + 8*8, 96)
    model = create_classifier("vit_tiny_patch8", 3, size)
    load_pretrained(model, mae_ckpt)
    got = model.pos_embed.detach()
    g = size // 8
    assert got.shape == (1, 1 + g * g, 96)
    assert torch.equal(got[:, :1], src[:, :1])  # cls row kept
    grid = src[:, 1:].reshape(1, 8, 8, 96).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(g, g), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, -1, 96)
    torch.testing.assert_close(got[:, 1:], ref)


def test_official_encoder_only_checkpoint(mae_ckpt, tmp_path):
    enc = torch.load(mae_ckpt, weights_only=False)["model"]
    avg = create_classifier("vit_tiny_patch8", 5, 64, global_pool="avg")
    assert set(load_pretrained(avg, mae_ckpt)) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    assert torch.equal(avg.blocks[3].mlp.fc2.weight, enc["blocks.3.mlp.fc2.weight"])
    token = create_classifier("vit_tiny_patch8", 5, 64, global_pool="token")
    assert set(load_pretrained(token, mae_ckpt)) == {"head.weight", "head.bias"}
    assert torch.equal(token.norm.weight, enc["norm.weight"])
    full = tmp_path / "full.pth"  # an mae-fast checkpoint with the decoder (module. prefixes too)
    torch.save({"model": {"module." + k: v for k, v in mae_vit_tiny_patch8().state_dict().items()}}, full)
    assert set(load_pretrained(create_classifier("vit_tiny_patch8", 5, 64), full)) == {
        "head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}


def test_other_size_checkpoint_names_key_and_shapes(tmp_path):
    other = tmp_path / "other.pth"
    torch.save({"model": mae_vit_tiny_patch8(embed_dim=64, num_heads=2).state_dict()}, other)
    with pytest.raises(CheckpointError, match=r"key 'cls_token' has shape \(1, 1, 64\) in the checkpoint but "
                                              r"\(1, 1, 96\) in the model"):
        load_pretrained(create_classifier("vit_tiny_patch8", 3, 32), other)


def test_checkpoint_without_the_encoder_is_refused(tmp_path):
    enc = {k: v for k, v in mae_vit_tiny_patch8().state_dict().items() if not k.startswith("blocks.1.")}
    with pytest.raises(CheckpointError, match=r"checkpoint: encoder key 'blocks\.1\.\S+' is missing \(\d+ keys "
                                              r"missing\); the checkpoint is not an MAE encoder of this model"):
        load_pretrained(create_classifier("vit_tiny_patch8", 3, 64), {"model": enc})


def test_create_classifier_checks_name_and_size():
    model = create_classifier("vit_tiny_patch8", 7, 40, global_pool="token")
    assert model.head.out_features == 7 and model.patch_embed.grid_size == (5, 5)
    assert model(torch.randn(2, 3, 40, 40)).shape == (2, 7)
    with pytest.raises(ValueError, match=r"unknown model 'vit_tiny_patch9'"):
        create_classifier("vit_tiny_patch9", 3, 32)
    with pytest.raises(ValueError, match=r"--img-size 36 is not a multiple of vit_tiny_patch8's patch size 8"):
        create_classifier("vit_tiny_patch8", 3, 36)


def test_load_trained_is_exact_and_names_a_missing_key():
    torch.manual_seed(1)
    trained = create_classifier("vit_tiny_patch8", 3, 32)
    model = create_classifier("vit_tiny_patch8", 3, 32)
    load_trained(model, {"module." + k: v for k, v in trained.state_dict().items()}, "ddp.pth")  # DDP prefixes
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in model.state_dict().items())
    partial = {k: v for k, v in trained.state_dict().items() if k != "head.bias"}
    with pytest.raises(CheckpointError, match=r"x\.pth: key 'head\.bias' is missing \(1 keys missing\)"):
        load_trained(model, partial, "x.pth")


def test_topk_hits_counts_rows_and_caps_k_at_the_classes():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.2], [0.3, 0.2, 0.5], [0.1, 0.2, 0.7]])
    labels = torch.tensor([1, 2, 0, 0])  # right; second; second; last
    assert [int(h) for h in topk_hits(logits, labels, ks=(1, 2, 3))] == [1, 3, 4]
    assert [int(h) for h in topk_hits(logits, labels)] == [1, 4]  # top-5 of 3 classes: every row



@pytest.mark.parametrize("classes", [3, 5, 6])
def test_evaluation_reports_top5_only_above_5_classes(classes):
    """With 5 classes or fewer every label is in the top 5: acc5 is left out (and from the log text); top-1,
    the loss and the image count are as before."""
    from types import SimpleNamespace

    torch.manual_seed(classes)
    model = torch.nn.Linear(4, classes)
    batches = [(torch.randn(7, 4), torch.randint(0, classes, (7,))) for _ in range(2)]
    cfg = SimpleNamespace(precision="fp32", nb_classes=classes)
    metrics = evaluate(model, batches, cfg, torch.device("cpu"), DistInfo())
    logits, labels = torch.cat([model(x) for x, _ in batches]), torch.cat([y for _, y in batches])
    assert set(metrics) == ({"acc1", "acc5", "loss", "images"} if classes > 5 else {"acc1", "loss", "images"})
    assert metrics["images"] == 14 and metrics["acc1"] == pytest.approx(100 * (logits.argmax(1) == labels).sum() / 14)
    assert metrics["loss"] == pytest.approx(F.cross_entropy(logits, labels).item())
    want = f"top-1 {metrics['acc1']:.2f}%" + (f", top-5 {metrics['acc5']:.2f}%" if classes > 5 else "")
    assert accuracy_text(metrics) == want
    assert accuracy_text({"knn_acc1": 12.5, "knn_acc5": 50.0}, "knn_") == "top-1 12.50%, top-5 50.00%"
