"""Progressive resolution (mae_fast/resolution.py): the size of each epoch, its runs of epochs, and the training
FLOPs of a schedule against the final size throughout, analytic and counted, as mae-flops reports them."""
import json

import pytest
from mae_fast.bench import flops as flops_cli

from mae_fast.flops import count_flops
from mae_fast.resolution import ResolutionSchedule, schedule_training_flops


def test_sizes_grow_linearly_in_patch_multiples_then_stay_final():
    s = ResolutionSchedule(start=224, final=448, grow_epochs=960, epochs=1600, patch=14)
    sizes = [s.size_at(e) for e in range(s.epochs)]
    assert sizes[0] == 224 and sizes[900] < 448 and set(sizes[960:]) == {448}  # rounding reaches 448 a little early
    assert all(x % 14 == 0 for x in sizes) and sizes == sorted(sizes)
    assert s.size_at(480) == 336  # half way: the middle size
    phases = s.phases()
    assert phases[0][0] == 0 and phases[-1][1] == 1600 and phases[-1][2] == 448
    assert all(a[1] == b[0] and a[2] < b[2] for a, b in zip(phases, phases[1:]))  # contiguous, one run per size
    assert len(phases) == (448 - 224) // 14 + 1


def test_no_growth_is_the_fixed_size():
    s = ResolutionSchedule(start=64, final=64, grow_epochs=0, epochs=5, patch=8)
    assert s.phases() == [(0, 5, 64)]


@pytest.mark.parametrize("kwargs,message", [
    (dict(start=224, final=450, grow_epochs=10, epochs=20, patch=14), "final size 450 px must be a multiple of"),
    (dict(start=480, final=448, grow_epochs=10, epochs=20, patch=14), "start size 480 px must be between"),
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
    same = schedule_training_flops("mae_vit_tiny_patch8", ResolutionSchedule(64, 64, 0, 10, 8))
    assert same["fraction_of_fixed"] == 1.0


def test_mae_flops_costs_a_schedule(capsys):
    assert flops_cli.main(["--model", "mae_vit_tiny_patch8", "--img-size", "64", "--grow-from", "32",
                           "--grow-epochs", "6", "--epochs", "10"]) == 0
    out = capsys.readouterr().out
    assert "32 -> 64 px over the first 6 of 10 epochs, then 64 px" in out and "of fixed" not in out
    assert "at 64 px throughout (saves" in out
    assert flops_cli.main(["--model", "mae_vit_tiny_patch8", "--img-size", "64", "--grow-from", "32",
                           "--grow-epochs", "6", "--epochs", "10", "--json"]) == 0
    (rec,) = json.loads(capsys.readouterr().out)
    assert rec["schedule"]["final"] == 64 and rec["schedule"]["phases"][0]["img_size"] == 32
    assert flops_cli.main(["--model", "mae_vit_tiny_patch8", "--img-size", "64", "--grow-from", "100"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "mae-flops: error: --grow-from 100: start size 100 px must be between the patch size 8 and the " \
                  "final size 64"
