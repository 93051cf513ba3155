"""The default translator's denoiser: MONAI's ``DiffusionModelUNet`` on a space-to-depth view of the full grid.

``torch.nn.PixelUnshuffle(f)`` turns a (B, C, H, W) input into (B, C*f*f, H/f, W/f) without losing a pixel, the UNet
works on that coarser grid, and ``PixelShuffle(f)`` puts its output back on the full grid. At f = 2 a training step
costs a fraction of the same UNet on the native 128 x 128 grid, while the output keeps the full resolution that the
cortical ribbon needs (measurements: docs/method.md, "What each measured choice bought").

The UNet's last layer must carry every pixel's detail through the coarse grid. With ``refine_channels`` > 0 a small
full-resolution head (three 3 x 3 convolutions) sees the UNet's estimate beside the full-resolution input and adds a
correction; its last convolution starts at zero, so the head can be added to a trained network and fine-tuned from
exactly that network's output. The shipped model has none: fine-tuned onto it, the head did not raise validation
Dice (docs/method.md, "What each measured choice bought").
"""

from __future__ import annotations

import torch
from monai.networks.nets import DiffusionModelUNet

__all__ = ["SpaceToDepthDiffusionUNet"]


class SpaceToDepthDiffusionUNet(torch.nn.Module):
    """``DiffusionModelUNet`` wrapped in pixel unshuffle/shuffle by `factor` (see the module docstring).

    Args:
        in_channels, out_channels: channels of the full-resolution input and output.
        factor: space-to-depth factor; the input's height and width must be multiples of it.
        refine_channels: width of the full-resolution head; 0 (no head) keeps the plain wrapped UNet.
        unet_kwargs: every other ``DiffusionModelUNet`` argument (``channels``, ``attention_levels``...).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        factor: int = 2,
        spatial_dims: int = 2,
        refine_channels: int = 0,
        **unet_kwargs,
    ):
        super().__init__()
        if spatial_dims != 2:
            raise ValueError(f"SpaceToDepthDiffusionUNet is 2D only, got spatial_dims={spatial_dims}.")
        if factor < 1:
            raise ValueError(f"factor must be >= 1, got {factor}.")
        self.factor = int(factor)
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.unshuffle = torch.nn.PixelUnshuffle(self.factor)
        self.shuffle = torch.nn.PixelShuffle(self.factor)
        self.unet = DiffusionModelUNet(
            spatial_dims=2,
            in_channels=self.in_channels * self.factor**2,
            out_channels=self.out_channels * self.factor**2,
            **unet_kwargs,
        )
        if refine_channels < 0:
            raise ValueError(f"refine_channels must be >= 0, got {refine_channels}.")
        self.refine = None
        if refine_channels:
            width = int(refine_channels)
            self.refine = torch.nn.Sequential(
                torch.nn.Conv2d(self.in_channels + self.out_channels, width, 3, padding=1),
                torch.nn.SiLU(),
                torch.nn.Conv2d(width, width, 3, padding=1),
                torch.nn.SiLU(),
                torch.nn.Conv2d(width, self.out_channels, 3, padding=1),
            )
            torch.nn.init.zeros_(self.refine[-1].weight)
            torch.nn.init.zeros_(self.refine[-1].bias)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, **kwargs) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected (B, {self.in_channels}, H, W), got {tuple(x.shape)}.")
        if x.shape[2] % self.factor or x.shape[3] % self.factor:
            raise ValueError(f"height and width {tuple(x.shape[2:])} must be multiples of {self.factor}.")
        coarse = self.shuffle(self.unet(self.unshuffle(x), timesteps=timesteps, **kwargs))
        if self.refine is None:
            return coarse
        return coarse + self.refine(torch.cat([coarse, x], dim=1))
