"""The one model builder (mae_fast.model_spec): it draws ``create_model``'s weights and sets the model up as its
spec says, and mae-pretrain, mae-bench and mae-profile build the same model from the same flags."""
import argparse

import pytest
import torch

from mae_fast.model_spec import ModelSpec, build_model
from mae_fast.models_mae import create_model

TINY = "mae_vit_tiny_patch8"
FLAGS = ["--model", TINY, "--img-size", "32", "--batch-size", "6", "--precision", "bf16", "--mask-ratio", "0.5",
         "--attn-backend", "sdpa", "--activation-dtype", "bf16", "--grad-checkpointing", "2"]


@pytest.mark.parametrize("precision, draw_on_device", [("bf16", False), ("fp64", False), ("fp64", True)])
def test_builder_draws_create_models_weights_and_applies_the_spec(precision, draw_on_device):
    spec = ModelSpec(TINY, 32, norm_pix_loss=False, precision=precision, kernel_backend="torch", attn_backend="math",
                     activation_dtype="fp32", grad_checkpointing=2)
    torch.manual_seed(0)
    model = build_model(spec, torch.device("cpu"), draw_on_device=draw_on_device)
    torch.manual_seed(0)
    reference = create_model(TINY, img_size=32, norm_pix_loss=False)
    dtype = torch.float64 if precision == "fp64" else torch.float32
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert a.dtype == dtype, name
        # drawn in float64 on the device, the weights are another draw of the same distributions
        assert torch.equal(a, b.to(dtype)) or draw_on_device, name
    assert not model.norm_pix_loss and model.kernel_backend == "torch" and model.grad_checkpointing == 2
    assert {blk.attn.attn_backend for blk in [*model.blocks, *model.decoder_blocks]} == {"math"}
    assert [blk.checkpointed for blk in model.blocks] == [True, False, True, False]


def test_from_options_takes_every_field_from_the_command_or_an_override():
    with pytest.raises(AttributeError, match="activation_dtype"):
        ModelSpec.from_options(argparse.Namespace(model=TINY, img_size=32, norm_pix_loss=True, precision="bf16",
                                                  kernel_backend="auto", attn_backend="sdpa", batch_size=6,
                                                  mask_ratio=0.5, grad_checkpointing=0))
    with pytest.raises(TypeError, match="lr"):
        ModelSpec.from_options(argparse.Namespace(), lr=1.0)


def test_the_commands_build_the_same_model_from_the_same_flags():
    """mae-pretrain, mae-bench (its fused variant) and mae-profile: one spec, one model, bit for bit."""
    from mae_fast.bench import profile, throughput
    from mae_fast.train.engine.config import parse_config
    from mae_fast.train.pretrain import build_model as pretrain_model

    cpu = torch.device("cpu")
    cfg = parse_config(FLAGS)
    bench_args = throughput.parse_args([*FLAGS, "--device", "cpu", "--compile", "off", "--variants", "fused"])
    bench_run = argparse.Namespace(**{**vars(bench_args), "model": bench_args.models[0]})
    profile_args = profile.parse_args([*FLAGS, "--device", "cpu", "--compile", "off"])
    spec = ModelSpec.from_options(cfg)
    assert throughput.variant_spec(throughput.VARIANTS["fused"], bench_run) == spec == profile.model_spec(profile_args)
    assert spec == ModelSpec(TINY, 32, True, "bf16", "auto", "sdpa", 6, 0.5, "bf16", 2)

    torch.manual_seed(0)
    models = [pretrain_model(cfg, cpu)]
    torch.manual_seed(0)
    models.append(throughput.build_mae(throughput.VARIANTS["fused"], bench_run, cpu)[0])
    models.append(profile.build_training(profile_args, cpu)[0])  # seeds 0 itself
    first = models[0]
    for model in models[1:]:
        assert (model.activation_dtype, model.grad_checkpointing, model.attn_choices) == \
            (first.activation_dtype, first.grad_checkpointing, first.attn_choices)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), first.state_dict().values()))
