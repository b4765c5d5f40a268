"""bench/profile_step.py: a step's operators put in groups, the convolutions' rate and the step's ceiling."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from profile_step import group_of  # noqa: E402


@pytest.mark.parametrize("name, group", [
    ("aten::mkldnn_convolution", "convolution"), ("aten::convolution_backward", "convolution"),
    ("aten::native_batch_norm_backward", "batch norm"), ("aten::threshold_backward", "ReLU"),
    ("aten::max_pool2d_with_indices", "pooling"), ("aten::_to_copy", "copies, casts, fills"),
    ("aten::_fused_adamw_", "optimizer"), ("Optimizer.zero_grad#AdamW.zero_grad", "optimizer"),
    ("autograd::engine::evaluate_function: NativeBatchNormBackward0", "batch norm"), ("aten::add_", "other"),
])
def test_operators_fall_in_their_group(name, group):
    assert group_of(name) == group


def test_a_small_step_is_profiled_and_its_ceiling_printed():
    out = subprocess.run([sys.executable, "bench/profile_step.py", "--arch", "smallcnn", "--image-size", "32",
                          "--batch", "4", "--steps", "1", "--matmul-size", "128", "--matmul-seconds", "0.05",
                          "--precision", "fp32"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    shares = [float(m) for m in re.findall(r"^\w[\w ,]*?\s+[\d.]+\s+([\d.]+)%$", out.stdout, re.M)]
    assert len(shares) >= 3 and sum(shares) == pytest.approx(100, abs=0.5)
    assert re.search(r"convolutions: [\d.]+ GFLOP per step at \d+ GFLOP/s", out.stdout)
    assert re.search(r"ceiling with every other operator free: [\d.]+ img/s", out.stdout)


def test_bad_arguments_are_refused():
    out = subprocess.run([sys.executable, "bench/profile_step.py", "--steps", "0"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "--steps" in out.stderr
