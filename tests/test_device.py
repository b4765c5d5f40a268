"""Device and precision choices: compile only where asked (or measured faster), the device a spec names."""

from __future__ import annotations

import pytest
import torch

from core.config import TrainConfig
from core.device import maybe_compile, select_device


def test_compile_is_applied_only_when_asked_for_on_a_cpu():
    net = torch.nn.Linear(3, 2)
    cpu = torch.device("cpu")
    assert maybe_compile(net, "off", cpu) is net
    assert maybe_compile(net, "auto", cpu) is net  # not measured faster on a CPU
    compiled = maybe_compile(net, "on", cpu)
    assert compiled is not net and compiled._orig_mod is net  # compiled lazily, at the first step


def test_a_compile_setting_that_does_not_exist_is_refused():
    with pytest.raises(ValueError, match="compile must be one of auto, on, off"):
        TrainConfig(data="x", compile="fast").validate()


def test_a_gpu_that_is_not_there_is_named():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        select_device("cuda:0")
