from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import CopiesToTheDevice

from core.augment import AugmentParams, affine_grid, augment_batch


def test_augmentation_keeps_shape_and_range_and_is_reproducible():
    x = torch.rand(8, 1, 32, 32)
    a = augment_batch(x, AugmentParams(), torch.Generator().manual_seed(1))
    b = augment_batch(x, AugmentParams(), torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.allclose(a, x, atol=1e-3)


def test_flip_only_mirrors_the_image():
    x = torch.rand(4, 1, 16, 16)
    params = AugmentParams(flip=1.0, rotation=0, scale=0, shift=0, brightness=0, contrast=0)
    out = augment_batch(x, params, torch.Generator().manual_seed(0))
    assert torch.allclose(out, x.flip(-1), atol=1e-5)


def test_no_op_parameters_leave_the_batch_unchanged():
    x = torch.rand(4, 1, 16, 16)
    params = AugmentParams(flip=0.0, rotation=0, scale=0, shift=0, brightness=0, contrast=0)
    assert torch.allclose(augment_batch(x, params, torch.Generator().manual_seed(0)), x, atol=1e-5)


@pytest.mark.parametrize("height, width", [(224, 224), (7, 13), (1, 5)])
def test_the_sampling_grid_is_torchs_affine_grid(height, width):
    theta = torch.randn(6, 2, 3, generator=torch.Generator().manual_seed(height))
    want = F.affine_grid(theta, [6, 1, height, width], align_corners=False)
    torch.testing.assert_close(affine_grid(theta, height, width), want, rtol=0, atol=1e-6)


def test_a_batch_on_a_gpu_gets_its_random_parameters_in_one_copy_that_does_not_wait_for_the_gpu():
    # A plain .to(device) of a CPU tensor waits for every step queued on the GPU: one per parameter would stall
    # every training step. The numbers are still drawn on the CPU (reproducible on any device).
    x = torch.rand(8, 1, 32, 32, device="meta")
    with CopiesToTheDevice() as seen:
        out = augment_batch(x, AugmentParams(), torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.device.type == "meta"
    assert seen.copies == [("aten._to_copy.default", True)]
