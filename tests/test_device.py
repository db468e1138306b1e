"""Device helpers on a CPU-only machine (CI has no GPU)."""
from __future__ import annotations

import pytest
import torch

from zsl_utils import device as dev
from zsl_utils.errors import ParameterError


def test_auto_and_cpu_resolve_to_cpu_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(dev, "_mps_available", lambda: False)
    assert dev.pick_device("auto") == torch.device("cpu")
    assert dev.pick_device("CPU") == torch.device("cpu")
    assert dev.try_gpu() == torch.device("cpu")


def test_auto_prefers_cuda_then_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert dev.pick_device("auto") == torch.device("cuda:0")
    assert dev.pick_device("cuda:1") == torch.device("cuda:1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(dev, "_mps_available", lambda: True)
    assert dev.pick_device("auto") == torch.device("mps")


def test_explicit_missing_hardware_and_nonsense_are_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ParameterError, match=r"device='cuda' was requested but this machine has 0"):
        dev.pick_device("cuda")
    with pytest.raises(ParameterError, match=r"device='tpu' is not understood.*'auto'"):
        dev.pick_device("tpu")
    with pytest.raises(ParameterError, match="not understood"):
        dev.pick_device("cuda:x")


def test_seed_everything_makes_draws_repeat():
    dev.seed_everything(123)
    first = (torch.rand(3), __import__("numpy").random.rand(2))
    dev.seed_everything(123)
    second = (torch.rand(3), __import__("numpy").random.rand(2))
    assert torch.equal(first[0], second[0]) and (first[1] == second[1]).all()
    with pytest.raises(ParameterError, match="seed must be an int"):
        dev.seed_everything("1")


def test_autocast_is_a_no_op_on_cpu():
    a = torch.ones(2, 2)
    with dev.autocast("cpu"):
        product = a @ a
    assert product.dtype == torch.float32
