"""The arithmetic behind bench/benchmark_pipeline.py's compute limit and floors, on tiny models (no training)."""

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

SPEC = importlib.util.spec_from_file_location(
    "benchmark_pipeline", Path(__file__).resolve().parents[1] / "bench" / "benchmark_pipeline.py")
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_training_flops_count_forward_and_backward_per_image(batch):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    # forward 2*(8*16 + 16*2) = 320; backward: both weight gradients (256 + 64) and the second layer's input
    # gradient (64); the images need no gradient, so the first layer's input gradient is not computed.
    assert bench.training_flops_per_image(mlp, (batch, 8)) == 704


def test_training_flops_of_a_convolution_leave_out_the_image_gradient():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 8 * 8, 2))
    conv = 2 * 8 * 8 * 4 * 9  # per image: forward, and the same again for the weight gradient
    linear = 2 * 256 * 2  # forward, weight gradient, input gradient
    assert bench.training_flops_per_image(net, (3, 1, 8, 8)) == 2 * conv + 3 * linear
    assert all(p.grad is None for p in net.parameters())  # counting leaves no gradients behind


def test_resnet18_training_flops_are_three_forward_passes():
    flops = bench.seed_flops_per_image(32)
    forward = 2 * 1.82e9 / 49  # resnet18: 1.82 GMAC at 224 px; every feature map is 7x smaller a side at 32
    assert 2.8 * forward < flops < 3.1 * forward


def test_limit_is_rate_over_flops_per_image():
    assert bench.images_per_s_limit(50.0, 10e9) == pytest.approx(5.0)


def test_matmul_rate_is_measured():
    assert bench.matmul_gflops("cpu", torch.float32, 64, 0.01, windows=2) > 0


@pytest.mark.parametrize("core, result", [(8.5, "PASS"), (8.4, "FAIL")])
def test_cpu_without_bf16_is_held_to_the_share_of_the_limit(core, result):
    # core slower than seed-style still passes: on a compute-bound CPU only the limit matters
    floor, verdict = bench.full_finetune_floor("cpu", False, "", 9.0, core, 10.0)
    assert (floor, verdict) == ("core >= 85% of limit", result)


@pytest.mark.parametrize("core, limit, result", [
    (20.0, 22.0, "PASS"),
    (19.9, 22.0, "FAIL"),  # under 2x seed-style
    (20.0, 30.0, "FAIL"),  # 2x seed-style, but under 85% of the limit
])
def test_cpu_with_bf16_also_keeps_the_ratio_floor(core, limit, result):
    floor, verdict = bench.full_finetune_floor("cpu", True, "", 10.0, core, limit)
    assert verdict == result
    assert "85% of limit" in floor and "2x seed" in floor


@pytest.mark.parametrize("name, seed, core, result", [
    ("NVIDIA H200", 1_000.0, 10_000.0, "PASS"),
    ("NVIDIA H100 80GB HBM3", 900.0, 9_999.0, "FAIL"),  # 11x, but under 10,000 img/s
    ("NVIDIA H200", 1_100.0, 10_500.0, "FAIL"),  # over 10,000 img/s, but under 10x
    ("NVIDIA L4", 100.0, 1_000.0, "PASS"),  # no absolute floor off Hopper
])
def test_cuda_floors(name, seed, core, result):
    assert bench.full_finetune_floor("cuda", True, name, seed, core, None)[1] == result


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA H200 NVL", 835.0), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA L4", 121.0), ("NVIDIA L40S", 362.0), ("NVIDIA A10", 125.0),
    ("NVIDIA A10G", None), ("Tesla T4", None),
])
def test_gpu_bf16_peak_table(name, peak):
    assert bench.gpu_bf16_peak_tflops(name) == peak


def test_share_of_the_limit_at_each_pipelines_precision():
    row = {"seed_ips": 5.0, "seed_precision": "fp32", "seed_flops_per_image": 10e9,
           "core_ips": 9.0, "core_precision": "bf16", "core_flops_per_image": 10e9}
    bench.add_limits(row, {"fp32": 100.0, "bf16": 150.0})
    assert (row["seed_limit_ips"], row["core_limit_ips"]) == pytest.approx((10.0, 15.0))
    assert (row["seed_share"], row["core_share"]) == pytest.approx((0.5, 0.6))
