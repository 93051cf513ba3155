"""The CycleGAN networks, from MONAI blocks: the ResNet-style image-to-image generator of Johnson et al. / Zhu et al.
(MONAI has no such generator in ``monai.networks.nets``) and MONAI's 2D PatchGAN discriminator with instance norm.

Images are in [0, 1] outside the networks (as everywhere in the bundle) and in [-1, 1] inside them
(``scripts.tensors.to_model_space`` / ``from_model_space``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution, ResidualUnit
from monai.networks.nets import PatchDiscriminator

__all__ = ["ResnetGenerator", "discriminator"]


class ResnetGenerator(nn.Module):
    """ResNet-style image-to-image generator (Johnson et al.; the CycleGAN generator) from MONAI blocks.

    reflection pad + 7x7 conv -> `num_downsamplings` x (3x3 conv, stride 2, channels doubled) -> `num_residual_units`
    x ``ResidualUnit`` -> `num_downsamplings` x (3x3 transposed conv, stride 2, channels halved) -> reflection pad +
    7x7 conv -> tanh. Instance norm and ReLU throughout. Inputs of any H x W: they are padded (replicate) to a
    multiple of ``2 ** num_downsamplings`` and the output is cropped back.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        channels: channels of the first (full-resolution) level.
        num_downsamplings: strided downsamplings (and upsamplings).
        num_residual_units: residual units at the coarsest level.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: int = 8,
        num_downsamplings: int = 3,
        num_residual_units: int = 6,
    ) -> None:
        super().__init__()
        if channels < 1 or num_downsamplings < 0 or num_residual_units < 0:
            raise ValueError(
                f"channels must be >= 1 and the numbers of downsamplings/residual units >= 0, got {channels}, "
                f"{num_downsamplings}, {num_residual_units}."
            )
        self.multiple = 2**num_downsamplings
        common = {"spatial_dims": 2, "act": "RELU", "norm": "INSTANCE", "adn_ordering": "NA"}
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            Convolution(in_channels=in_channels, out_channels=channels, kernel_size=7, padding=0, **common),
        ]
        width = channels
        for _ in range(num_downsamplings):
            layers.append(Convolution(in_channels=width, out_channels=width * 2, strides=2, kernel_size=3, **common))
            width *= 2
        for _ in range(num_residual_units):
            layers.append(ResidualUnit(in_channels=width, out_channels=width, subunits=2, **common))
        for _ in range(num_downsamplings):
            layers.append(
                Convolution(
                    in_channels=width,
                    out_channels=width // 2,
                    strides=2,
                    kernel_size=3,
                    is_transposed=True,
                    output_padding=1,
                    **common,
                )
            )
            width //= 2
        layers += [
            nn.ReflectionPad2d(3),
            Convolution(2, width, out_channels, kernel_size=7, padding=0, conv_only=True),
            nn.Tanh(),
        ]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        pad_h, pad_w = (-height) % self.multiple, (-width) % self.multiple
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        return self.model(x)[..., :height, :width]


def discriminator(in_channels: int = 1, channels: int = 16, num_layers: int = 3) -> PatchDiscriminator:
    """MONAI's 2D PatchGAN discriminator with instance norm (as in CycleGAN); its last output is the patch map."""
    return PatchDiscriminator(
        spatial_dims=2, channels=channels, in_channels=in_channels, num_layers_d=num_layers, norm="INSTANCE"
    )
