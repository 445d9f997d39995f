"""mae_fast/device.py: --device resolution (auto | cpu | cuda, LOCAL_RANK), the precision -> dtype policy, the
autocast context and synchronize. CUDA's presence is simulated where a CPU machine cannot have it."""
import pytest
import torch

from mae_fast import device as dev
from mae_fast.errors import DeviceError

CPU = torch.device("cpu")


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda reports ``count`` visible devices; set_device and synchronize calls are recorded."""
    calls = {"set_device": [], "synchronize": []}

    def visible(count: int):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls["set_device"].append(d))
        monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: calls["synchronize"].append(d))
        return calls
    return visible


@pytest.mark.parametrize("count,auto", [(0, "cpu"), (2, "cuda")])
def test_requested_device_type(fake_cuda, count, auto):
    fake_cuda(count)
    assert dev.requested_device_type("cpu") == "cpu"
    assert dev.requested_device_type("cuda") == "cuda"  # asked for: resolve_device decides if it is there
    assert dev.requested_device_type("auto") == auto


def test_unknown_device_is_refused_naming_the_choices():
    with pytest.raises(DeviceError, match=r"--device must be one of \['auto', 'cpu', 'cuda'\], got 'gpu'"):
        dev.requested_device_type("gpu")
    with pytest.raises(ValueError):  # DeviceError is a ValueError: the CLIs report it in one line
        dev.resolve_device("mps")


def test_resolve_device_without_cuda(fake_cuda):
    calls = fake_cuda(0)
    assert dev.resolve_device("cpu") == CPU and dev.resolve_device("auto") == CPU
    assert dev.resolve_device("auto", local_rank=3) == CPU  # ranks share the CPU
    with pytest.raises(DeviceError, match=r"--device cuda was asked for but no CUDA device is visible "
                                          r"\(use --device auto or cpu\)"):
        dev.resolve_device("cuda")
    assert calls["set_device"] == []


def test_resolve_device_picks_the_local_rank_gpu(fake_cuda):
    calls = fake_cuda(2)
    assert dev.resolve_device("auto") == torch.device("cuda", 0)
    assert dev.resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    assert calls["set_device"] == [0, 1]  # each process makes its own GPU the current one
    with pytest.raises(DeviceError, match=r"LOCAL_RANK 2 but only 2 CUDA device\(s\) are visible"):
        dev.resolve_device("cuda", local_rank=2)
    assert calls["set_device"] == [0, 1]
    assert dev.resolve_device("cpu", local_rank=5) == CPU  # --device cpu never touches CUDA


def test_precision_dtypes():
    assert dev.autocast_dtype("bf16") == torch.bfloat16 and dev.autocast_dtype("fp16") == torch.float16
    assert dev.autocast_dtype("fp32") is None and dev.autocast_dtype("fp64") is None
    assert [dev.compute_dtype(p) for p in ("bf16", "fp16", "fp32", "fp64")] == [
        torch.bfloat16, torch.float16, torch.float32, torch.float64]
    with pytest.raises(ValueError, match=r"precision must be one of \['bf16', 'fp16', 'fp32', 'fp64'\], got 'fp8'"):
        dev.compute_dtype("fp8")


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32),
                                             ("fp64", torch.float64)])
def test_autocast_for_runs_the_gemms_in_the_compute_dtype(precision, dtype):
    params = torch.float64 if precision == "fp64" else torch.float32  # fp64 runs keep fp64 parameters
    a, b = torch.randn(4, 8, dtype=params), torch.randn(8, 3, dtype=params)
    with dev.autocast_for(precision, CPU):
        out = a @ b
        assert torch.is_autocast_enabled("cpu") == (precision == "bf16")
    assert out.dtype == dtype == dev.compute_dtype(precision)
    assert not torch.is_autocast_enabled("cpu")  # left as it was


def test_synchronize_waits_only_on_cuda(fake_cuda):
    calls = fake_cuda(1)
    dev.synchronize(CPU)
    assert calls["synchronize"] == []
    dev.synchronize(torch.device("cuda", 0))
    assert calls["synchronize"] == [torch.device("cuda", 0)]
