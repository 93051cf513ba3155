"""Synthetic test images shared by the test modules."""

from __future__ import annotations

import numpy as np
import torch


def phantom(size: int = 32, seed: int = 0) -> torch.Tensor:
    """A head-like (1, 1, size, size) image: bright ring (scalp), dark gap, brain with two tissues, noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / (size - 1) * 2 - 1
    radius = np.hypot(yy / 0.9, xx / 0.75)
    image = np.where(radius < 0.95, 0.8, 0.0)
    image = np.where(radius < 0.8, 0.1, image)
    image = np.where(radius < 0.7, 0.6, image)
    image = np.where((radius < 0.35) & (np.abs(xx) > 0.1), 0.9, image)
    image = image + 0.02 * rng.standard_normal(image.shape) * (radius < 0.95)
    return torch.from_numpy(np.clip(image, 0, 1).astype(np.float32))[None, None]
