"""Device and precision choices: compile only where asked (or measured faster), the device a spec names, the
fused optimizer."""

from __future__ import annotations

import pytest
import torch

from core.config import TrainConfig
from core.device import choose_fast_kernels, maybe_compile, optimizer_options, select_device


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


def test_several_gpus_offer_all_of_them_as_one_choice_run_by_torchrun(monkeypatch, tmp_path):
    import core.device as device
    from core.config import config_from_preset
    from core.launch import spawn_command
    from core.trainer import create_run

    monkeypatch.setattr(device, "available_devices", lambda: ["auto", "cpu", "cuda:0", "cuda:1", "cuda:2"])
    assert device.device_choices()[-1] == "all GPUs (3)"
    assert device.device_and_processes("all GPUs (3)") == ("cuda", 3)
    assert device.device_and_processes("cuda:1") == ("cuda:1", 1)
    monkeypatch.setattr(device, "available_devices", lambda: ["auto", "cpu", "cuda:0"])
    assert not any(c.startswith("all GPUs") for c in device.device_choices())

    many = create_run(config_from_preset("tiny", data=str(tmp_path), runs_dir=str(tmp_path / "runs"), device="cuda",
                                         processes=3))
    command = spawn_command(many)
    assert command[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3", "-m"]
    assert command[6:9] == ["core", "resume", str(many)] and "--launched" in command
    one = create_run(config_from_preset("tiny", data=str(tmp_path), runs_dir=str(tmp_path / "runs"), name="one"))
    assert spawn_command(one)[1:4] == ["-m", "core", "resume"]


def test_the_fused_optimizer_steps_as_the_default_one_does():
    torch.manual_seed(0)
    nets = [torch.nn.Linear(8, 2) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    options = optimizer_options(torch.device("cpu"))
    assert options == {"fused": True}
    optimizers = [torch.optim.AdamW(nets[0].parameters(), lr=0.01, weight_decay=0.1),
                  torch.optim.AdamW(nets[1].parameters(), lr=0.01, weight_decay=0.1, **options)]
    x, y = torch.randn(16, 8), torch.randint(0, 2, (16,))
    for _ in range(5):
        for net, opt in zip(nets, optimizers):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_cudnn_picks_the_fastest_convolutions_for_a_gpu_run_and_a_cpu_run_changes_nothing(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    choose_fast_kernels(torch.device("cpu"))
    assert torch.backends.cudnn.benchmark is False
    choose_fast_kernels(torch.device("cuda", 0))
    assert torch.backends.cudnn.benchmark is True
