"""Progressive resolution (mae_fast/resolution.py): the size of each epoch, its runs of epochs, and the training
FLOPs of a schedule against the final size throughout, analytic and counted, as mae-flops reports them."""
import json

import pytest
from mae_fast.bench import flops as flops_cli

from mae_fast.flops import count_flops
from mae_fast.resolution import ResolutionSchedule, batch_multiple, schedule_training_flops


def test_sizes_grow_linearly_in_patch_multiples_then_stay_final():
    s = ResolutionSchedule(start=224, final=448, grow_epochs=960, epochs=1600, patch=14, step=14)
    sizes = [s.size_at(e) for e in range(s.epochs)]
    assert sizes[0] == 224 and sizes[900] < 448 and set(sizes[960:]) == {448}  # rounding reaches 448 a little early
    assert all(x % 14 == 0 for x in sizes) and sizes == sorted(sizes)
    assert s.size_at(480) == 336  # half way: the middle size
    phases = s.phases()
    assert phases[0][0] == 0 and phases[-1][1] == 1600 and phases[-1][2] == 448
    assert all(a[1] == b[0] and a[2] < b[2] for a, b in zip(phases, phases[1:]))  # contiguous, one run per size
    assert len(phases) == (448 - 224) // 14 + 1


def test_default_step_is_two_patches_and_bounds_the_sizes():
    s = ResolutionSchedule(start=224, final=448, grow_epochs=960, epochs=1600, patch=14)
    assert s.sizes() == list(range(224, 449, 28)) and s.size_step == 28
    s.check_bounded()
    with pytest.raises(ValueError, match=r"224 -> 448 px in steps of 14 px has 17 sizes, more than 16"):
        ResolutionSchedule(224, 448, 960, 1600, 14, step=14).check_bounded()
    odd = ResolutionSchedule(start=40, final=104, grow_epochs=5, epochs=8, patch=8)  # 40 is no multiple of 16
    assert odd.sizes() == [40, 48, 64, 80, 96, 104] and all(x % 8 == 0 for x in odd.sizes())


def test_tokens_batch_is_an_integer_multiple_keeping_tokens_within_2x():
    s = ResolutionSchedule(224, 448, 960, 1600, 14, grow_batch="tokens")
    for first, _, size in s.phases():
        k = s.batch_at(first, 32) // 32
        assert s.batch_at(first, 32) == 32 * k == 32 * batch_multiple(size, 448, 14)
        tokens, final_tokens = k * (size // 14) ** 2, (448 // 14) ** 2
        assert final_tokens / 2 < tokens <= final_tokens, (size, k)
    assert [s.batch_at(e, 32) for e in (0, 1599)] == [128, 32]
    assert ResolutionSchedule(224, 448, 960, 1600, 14).batch_at(0, 32) == 32  # fixed

def test_no_growth_is_the_fixed_size():
    s = ResolutionSchedule(start=64, final=64, grow_epochs=0, epochs=5, patch=8)
    assert s.phases() == [(0, 5, 64)]


@pytest.mark.parametrize("kwargs,message", [
    (dict(start=224, final=450, grow_epochs=10, epochs=20, patch=14), "final size 450 px must be a multiple of"),
    (dict(start=480, final=448, grow_epochs=10, epochs=20, patch=14), "start size 480 px must be a multiple of"),
    (dict(start=230, final=448, grow_epochs=10, epochs=20, patch=14), "start size 230 px must be a multiple of"),
    (dict(start=224, final=448, grow_epochs=10, epochs=20, patch=14, step=20), "size step 20 px must be a multiple"),
    (dict(start=224, final=448, grow_epochs=10, epochs=20, patch=14, grow_batch="pixels"), "grow batch 'pixels'"),
    (dict(start=224, final=448, grow_epochs=30, epochs=20, patch=14), "grow epochs 30 must be between 0 and"),
])
def test_bad_schedules_are_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ResolutionSchedule(**kwargs)


def test_schedule_flops_are_the_sum_of_its_epochs_and_the_counter_agrees():
    s = ResolutionSchedule(start=32, final=64, grow_epochs=6, epochs=10, patch=8)
    got = schedule_training_flops("mae_vit_tiny_patch8", s)
    per_epoch = [count_flops("mae_vit_tiny_patch8", img_size=s.size_at(e)).total("training") for e in range(10)]
    assert got["train_flops_per_image"] == pytest.approx(sum(per_epoch), rel=1e-12)
    final = count_flops("mae_vit_tiny_patch8", img_size=64).total("training")
    assert got["fixed_final_flops_per_image"] == pytest.approx(10 * final, rel=1e-12)
    assert 0.5 < got["fraction_of_fixed"] < 1.0
    for p in got["phases"]:  # each size's analytic count, checked by FlopCounterMode on the meta device
        check = count_flops("mae_vit_tiny_patch8", img_size=p["img_size"], check=True).counter_check
        assert abs(check["training_rel_diff"]) < 1e-9, (p["img_size"], check)
    counted = schedule_training_flops("mae_vit_tiny_patch8", s, check=True)["counted"]  # mae-flops --check
    assert counted["max_rel_diff"] < 1e-9
    analytic = counted["analytic_matmul_flops_per_image"]
    assert counted["train_matmul_flops_per_image"] == pytest.approx(analytic, rel=1e-9)
    assert 0.5 < counted["fraction_of_fixed"] < 1.0
    same = schedule_training_flops("mae_vit_tiny_patch8", ResolutionSchedule(64, 64, 0, 10, 8))
    assert same["fraction_of_fixed"] == 1.0


def test_mae_flops_costs_a_schedule(capsys):
    assert flops_cli.main(["--model", "mae_vit_tiny_patch8", "--img-size", "64", "--grow-from", "32",
                           "--grow-epochs", "6", "--epochs", "10"]) == 0
    out = capsys.readouterr().out
    assert "32 -> 64 px in steps of 16 px over the first 6 of 10 epochs, then 64 px" in out and "of fixed" not in out
    assert "at 64 px throughout (saves" in out
    assert flops_cli.main(["--model", "mae_vit_tiny_patch8", "--img-size", "64", "--grow-from", "32",
                           "--grow-epochs", "6", "--epochs", "10", "--json"]) == 0
    (rec,) = json.loads(capsys.readouterr().out)
    assert rec["schedule"]["final"] == 64 and rec["schedule"]["phases"][0]["img_size"] == 32
    assert flops_cli.main(["--model", "mae_vit_tiny_patch8", "--img-size", "64", "--grow-from", "100"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "mae-flops: error: --grow-from 100: start size 100 px must be a multiple of the patch size 8 " \
                  "between 8 and the final size 64"


# ------------------------------------------------------------------ the model at each size of a schedule
def test_position_tables_at_every_size_are_the_official_tables_of_that_size():
    import torch
    from mae_fast.models_mae import create_model

    schedule = ResolutionSchedule(start=24, final=64, grow_epochs=4, epochs=6, patch=8)
    model = create_model("mae_vit_tiny_patch8", img_size=64)
    final = (model.pos_embed.detach().clone(), model.decoder_pos_embed.detach().clone())
    for size in schedule.sizes():
        official = create_model("mae_vit_tiny_patch8", img_size=size)  # the official code's tables for that size
        model.set_input_size(size)
        enc, dec = model.position_tables()
        assert enc.shape == official.pos_embed.shape and torch.equal(enc, official.pos_embed), size
        assert torch.equal(dec, official.decoder_pos_embed), size
    # the parameters, hence every checkpoint, keep the final size's tables
    assert torch.equal(model.pos_embed, final[0]) and torch.equal(model.decoder_pos_embed, final[1])
    assert model.state_dict()["pos_embed"].shape == (1, 65, 96)
    model.double()  # the tables follow the parameters' dtype (fp64 runs)
    model.set_input_size(40)
    assert model.position_tables()[0].dtype == torch.float64


@pytest.mark.parametrize("size", [24, 40])
def test_a_model_at_another_input_size_computes_what_the_official_model_of_that_size_computes(size):
    """Same weights (but the fixed position tables), same noise: the loss and predictions of the final-size model
    taking ``size`` px images equal, in float64, the official forward of a model built at ``size``."""
    import torch
    from mae_fast.bench.official_mae import official_forward
    from mae_fast.models_mae import create_model

    torch.manual_seed(1)
    model = create_model("mae_vit_tiny_patch8", img_size=64, norm_pix_loss=True).double()
    small = create_model("mae_vit_tiny_patch8", img_size=size, norm_pix_loss=True).double()
    small.load_state_dict({k: v for k, v in model.state_dict().items() if "pos_embed" not in k}, strict=False)
    L = (size // 8) ** 2
    imgs, noise = torch.randn(3, 3, size, size, dtype=torch.float64), torch.rand(3, L, dtype=torch.float64)
    model.set_input_size(size)
    loss, pred, mask = model(imgs, noise=noise)
    ref_loss, ref_pred, ref_mask = official_forward(small, imgs, 0.75, noise)
    assert torch.equal(mask, ref_mask) and torch.allclose(pred, ref_pred, rtol=0, atol=1e-12)
    assert abs(loss.item() - ref_loss.item()) < 1e-12
    with pytest.raises(ValueError, match=rf"image size 64x64 does not match the model's input size {size}x{size}"):
        model(torch.randn(1, 3, 64, 64, dtype=torch.float64))
    with model.input_size_as(64):  # e.g. the k-NN monitor at the final size, mid-schedule
        assert model.forward_features(torch.randn(1, 3, 64, 64, dtype=torch.float64)).shape == (1, 65, 96)
    assert model.input_size == size
    with pytest.raises(ValueError, match="input size 30 px is not a multiple of the patch size 8"):
        model.set_input_size(30)


def test_scaled_position_tables_tie_each_code_to_a_place_in_the_image():
    """"scaled": the patch of a g-grid centred at x (in [0, 1]) gets the final F-grid's code of x, (x * F - 0.5), so
    at 32 px toward 64 (patch 8) the columns are 0.5, 2.5, 4.5, 6.5; at the final grid the official table."""
    import numpy as np
    import torch
    from mae_fast.models_mae import create_model
    from mae_fast.pos_embed import get_1d_sincos_pos_embed, get_2d_sincos_pos_embed

    table = get_2d_sincos_pos_embed(96, 4, cls_token=True, span=8)
    assert table.shape == (17, 96) and not table[0].any()
    for k, x in enumerate([0.5, 2.5, 4.5, 6.5]):  # row 0, column k: the first half codes the column
        assert np.allclose(table[1 + k, :48], get_1d_sincos_pos_embed(48, np.array([x]))[0], rtol=0, atol=1e-15)
        assert np.allclose(table[1 + 4 * k, 48:], get_1d_sincos_pos_embed(48, np.array([x]))[0], rtol=0, atol=1e-15)
    assert np.array_equal(get_2d_sincos_pos_embed(96, 8, True, span=8), get_2d_sincos_pos_embed(96, 8, True))
    model = create_model("mae_vit_tiny_patch8", img_size=64)
    model.set_input_size(32, "scaled")
    assert torch.equal(model.position_tables()[0][0], torch.from_numpy(table).float())
    model.set_input_size(48)  # keeps the choice
    assert model.input_positions == "scaled"
    model.set_input_size(64)
    assert model.position_tables()[0] is model.pos_embed
    with pytest.raises(ValueError, match="unknown positions 'shifted'"):
        model.set_input_size(32, "shifted")
