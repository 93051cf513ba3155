"""LMI projection: replace an image by its local conditional mean given the source intensities.

Among all images y, those with maximal local mutual information with the source s are the local functions of s:
y_i = f_i(s_i) with f varying slowly in space. The least-squares projection of an estimate x onto that set is the
local conditional expectation E[x | s] inside a spatial window, computed here as a Parzen regression with the same
Gaussian bins as the LMI layer:

    P(x)_i = sum_k w_k(s_i) (G * (w_k(s) x))_i / sum_k w_k(s_i) (G * w_k(s))_i

with w_k the Gaussian bin weights of the source and G a Gaussian spatial window (wide enough to hold several tissue
classes, narrow enough to follow a bias field). Applied to the denoiser's x0 estimate during reverse diffusion it
keeps the anatomy of the source exactly while the diffusion prior (trained on T1w only) decides the intensities.
It costs 2K separable blurs per image and no back-propagation through the network (docs/method.md, "Sampling").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["LocalConditionalMean"]


def _gaussian_kernel1d(sigma: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    radius = max(1, int(math.ceil(3.0 * sigma)))
    grid = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    kernel = torch.exp(-0.5 * (grid / sigma) ** 2)
    return kernel / kernel.sum()


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of every channel, zero padded (the weights blur the same way, so it cancels)."""
    kernel = _gaussian_kernel1d(sigma, x.device, x.dtype)
    channels = x.shape[1]
    radius = kernel.numel() // 2
    x = F.conv2d(x, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), padding=(radius, 0), groups=channels)
    return F.conv2d(x, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), padding=(0, radius), groups=channels)


class LocalConditionalMean(torch.nn.Module):
    """Project `x` onto images that are a slowly varying function of `source` (see the module docstring).

    Args:
        num_bins: Gaussian bins over the source range [0, 1].
        bin_sigma: width of a bin kernel, in source intensity units.
        spatial_sigma: width of the spatial window, in pixels.
    """

    def __init__(self, num_bins: int = 27, bin_sigma: float = 8 / 255, spatial_sigma: float = 12.0) -> None:
        super().__init__()
        if num_bins < 2:
            raise ValueError(f"num_bins must be >= 2, got {num_bins}.")
        if bin_sigma <= 0 or spatial_sigma <= 0:
            raise ValueError(f"bin_sigma and spatial_sigma must be > 0, got {bin_sigma} and {spatial_sigma}.")
        self.num_bins = num_bins
        self.bin_sigma = bin_sigma
        self.spatial_sigma = spatial_sigma

    def forward(
        self, x: torch.Tensor, source: torch.Tensor, weight: torch.Tensor | None = None, pixel_scale: float = 1.0
    ) -> torch.Tensor:
        """`x`, `source` (in [0, 1]) and optional `weight` (e.g. a head mask): (B, 1, H, W). Returns (B, 1, H, W).

        `pixel_scale` is the size of this grid's pixel relative to the grid `spatial_sigma` was set for (2 on a
        64 x 64 model grid for a 128 x 128 image), so the window covers the same anatomy on either grid.
        """
        if x.shape != source.shape or x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"x and source must share a (B, 1, H, W) shape, got {tuple(x.shape)} and {source.shape}.")
        centres = torch.linspace(0.0, 1.0, self.num_bins, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        bins = torch.exp(-0.5 * ((source - centres) / self.bin_sigma) ** 2)  # (B, K, H, W)
        sample_weight = bins if weight is None else bins * weight
        sigma = self.spatial_sigma / pixel_scale
        numerator = _blur(sample_weight * x, sigma)
        denominator = _blur(sample_weight, sigma)
        return (bins * numerator).sum(1, keepdim=True) / (bins * denominator).sum(1, keepdim=True).clamp_min(1e-12)
