"""Augmentation of whole batches on the training device (one affine warp per image via grid_sample).

Per-image PIL transforms cost CPU time per image and cannot run on the GPU; a batched warp does
flip, rotation, zoom and shift in one kernel wherever the batch lives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentParams:
    flip: float = 0.5
    rotation: float = 10.0  # degrees
    scale: float = 0.1
    shift: float = 0.08
    brightness: float = 0.15
    contrast: float = 0.15


def _uniform(n: int, bound: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return (torch.rand(n, generator=generator) * 2 - 1).mul_(bound).to(device)


def augment_batch(x: torch.Tensor, params: AugmentParams, generator: torch.Generator) -> torch.Tensor:
    """x: (N, C, H, W) float in [0, 1]. Random numbers come from a CPU generator so runs are
    reproducible across devices and resumable from a saved generator state."""
    n, device = x.shape[0], x.device
    angle = _uniform(n, math.radians(params.rotation), generator, device)
    scale = 1 + _uniform(n, params.scale, generator, device)
    flip = torch.where(torch.rand(n, generator=generator) < params.flip, -1.0, 1.0).to(device)
    tx = _uniform(n, 2 * params.shift, generator, device)
    ty = _uniform(n, 2 * params.shift, generator, device)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1),
                         torch.stack([sin * flip, cos, ty], 1)], 1).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    brightness = _uniform(n, params.brightness, generator, device).view(n, 1, 1, 1).to(x.dtype)
    contrast = (1 + _uniform(n, params.contrast, generator, device)).view(n, 1, 1, 1).to(x.dtype)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    return ((out - mean) * contrast + mean + brightness).clamp_(0, 1)
