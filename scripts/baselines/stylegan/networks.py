"""The StyleGAN2 networks: a mapping network and a synthesis network from a learned 4 x 4 constant (the generator),
and a residual discriminator with minibatch standard deviation.

Simplifications against the paper, all deliberate for a compact CPU-trainable baseline: bilinear upsampling and
2 x 2 average-pool downsampling instead of FIR filters, no path-length regularisation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from scripts.baselines.stylegan.layers import LRELU_GAIN, EqualConv2d, EqualLinear, ModulatedConv2d

__all__ = [
    "DiscriminatorBlock",
    "MappingNetwork",
    "StyleGAN2Discriminator",
    "StyleGAN2Generator",
    "SynthesisLayer",
    "SynthesisNetwork",
    "ToRGB",
    "minibatch_stddev",
]


class MappingNetwork(nn.Module):
    """z -> w: pixel norm, then `num_layers` equalised-lr fully connected layers with leaky ReLU."""

    def __init__(self, latent_dim: int, w_dim: int, num_layers: int, lr_mul: float = 0.01) -> None:
        super().__init__()
        sizes = [latent_dim] + [w_dim] * num_layers
        self.layers = nn.Sequential(
            *[EqualLinear(sizes[i], sizes[i + 1], lr_mul=lr_mul, activation=True) for i in range(num_layers)]
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z * torch.rsqrt(z.square().mean(dim=1, keepdim=True) + 1e-8)
        return self.layers(z)


class SynthesisLayer(nn.Module):
    """Modulated 3 x 3 convolution, noise input with a learned strength (initially 0), bias, leaky ReLU."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, up: bool = False) -> None:
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, out_channels, 3, w_dim, up=up)
        self.noise_strength = nn.Parameter(torch.zeros(()))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.register_buffer("noise_const", torch.randn(1, 1, resolution, resolution))
        self.resolution = resolution

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise: torch.Tensor | str = "random") -> torch.Tensor:
        x = self.conv(x, w)
        if isinstance(noise, str):
            if noise == "random":
                noise = torch.randn(x.shape[0], 1, *x.shape[2:], device=x.device, dtype=x.dtype)
            elif noise == "const":
                noise = self.noise_const
            elif noise == "none":
                noise = None
            else:
                raise ValueError(f"noise must be a tensor or one of 'random', 'const', 'none', got '{noise}'.")
        if noise is not None:
            x = x + noise * self.noise_strength
        return F.leaky_relu(x + self.bias[None, :, None, None], 0.2) * LRELU_GAIN


class ToRGB(nn.Module):
    """Modulated 1 x 1 convolution (no demodulation) to the output channels, plus bias."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int) -> None:
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, out_channels, 1, w_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.conv(x, w) + self.bias[None, :, None, None]


def _channels(resolution: int, channel_base: int, channel_max: int) -> int:
    return max(1, min(channel_base // resolution, channel_max))


class SynthesisNetwork(nn.Module):
    """W+ (B, num_ws, w_dim) -> image: learned 4 x 4 constant, two modulated convs per level, toRGB skips."""

    def __init__(self, w_dim: int, resolution: int, channel_base: int, channel_max: int, out_channels: int) -> None:
        super().__init__()
        if resolution < 8 or resolution & (resolution - 1):
            raise ValueError(f"resolution must be a power of two >= 8, got {resolution}.")
        self.resolution = resolution
        ch = [_channels(4 << i, channel_base, channel_max) for i in range(int(math.log2(resolution)) - 1)]
        self.const = nn.Parameter(torch.randn(ch[0], 4, 4))
        self.layers = nn.ModuleList([SynthesisLayer(ch[0], ch[0], w_dim, 4)])
        self.to_rgb = nn.ModuleList([ToRGB(ch[0], out_channels, w_dim)])
        for level in range(1, len(ch)):
            size = 4 << level
            self.layers.append(SynthesisLayer(ch[level - 1], ch[level], w_dim, size, up=True))
            self.layers.append(SynthesisLayer(ch[level], ch[level], w_dim, size))
            self.to_rgb.append(ToRGB(ch[level], out_channels, w_dim))
        # w index of each layer: the 4 x 4 conv uses 0; level l >= 1 uses 2l - 1, 2l and its toRGB 2l + 1
        # (shared with the next level's first conv), as in StyleGAN2.
        self.num_ws = 2 * len(ch)

    @property
    def noise_shapes(self) -> list[tuple[int, int]]:
        return [(layer.resolution, layer.resolution) for layer in self.layers]

    def forward(self, ws: torch.Tensor, noise: str | Sequence[torch.Tensor] = "random") -> torch.Tensor:
        if ws.ndim != 3 or ws.shape[1] != self.num_ws:
            raise ValueError(f"ws must be (B, {self.num_ws}, w_dim), got {tuple(ws.shape)}.")
        noises = [noise] * len(self.layers) if isinstance(noise, str) else list(noise)
        if len(noises) != len(self.layers):
            raise ValueError(f"expected {len(self.layers)} noise maps, got {len(noises)}.")
        x = self.const[None].expand(ws.shape[0], -1, -1, -1)
        x = self.layers[0](x, ws[:, 0], noises[0])
        image = self.to_rgb[0](x, ws[:, 1])
        for level in range(1, len(self.to_rgb)):
            x = self.layers[2 * level - 1](x, ws[:, 2 * level - 1], noises[2 * level - 1])
            x = self.layers[2 * level](x, ws[:, 2 * level], noises[2 * level])
            image = F.interpolate(image, scale_factor=2, mode="bilinear", align_corners=False)
            image = image + self.to_rgb[level](x, ws[:, 2 * level + 1])
        return image


class StyleGAN2Generator(nn.Module):
    """Compact StyleGAN2 generator; ``forward(z)`` gives (B, out_channels, R, R) images in ~[-1, 1].

    Mapping network: pixel-normalised z -> w through ``mapping_layers`` fully connected layers (leaky ReLU, equalised
    learning rate, learning-rate multiplier ``mapping_lr_mul``). Synthesis network: from a learned 4 x 4 constant up
    to ``resolution``, per resolution two modulated / demodulated 3 x 3 convolutions (one grouped convolution for the
    whole batch), the first after a bilinear 2x upsampling, per-layer noise inputs with a learned strength, and a toRGB
    skip output (modulated 1 x 1 convolution without demodulation) added to the upsampled image of the level below.
    Trained in [-1, 1] (``scripts.tensors.from_model_space`` maps to [0, 1]). The bundle's generator works at
    64 x 64; for evaluation its output is upsampled bilinearly to the 128 x 128 image grid (the inversion inferer
    does it).

    Args:
        latent_dim: size of z.
        w_dim: size of w (default `latent_dim`).
        mapping_layers: fully connected layers of the mapping network.
        resolution: output side R, a power of two >= 8.
        channel_base, channel_max: the synthesis level at side r has ``min(channel_base // r, channel_max)`` channels.
        out_channels: image channels.
        mapping_lr_mul: learning-rate multiplier of the mapping network.
    """

    def __init__(
        self,
        latent_dim: int = 128,
        w_dim: int | None = None,
        mapping_layers: int = 4,
        resolution: int = 64,
        channel_base: int = 2048,
        channel_max: int = 128,
        out_channels: int = 1,
        mapping_lr_mul: float = 0.01,
    ) -> None:
        super().__init__()
        self.latent_dim = int(latent_dim)
        self.w_dim = int(w_dim or latent_dim)
        self.resolution = int(resolution)
        self.mapping = MappingNetwork(self.latent_dim, self.w_dim, mapping_layers, mapping_lr_mul)
        self.synthesis = SynthesisNetwork(self.w_dim, self.resolution, channel_base, channel_max, out_channels)
        self.num_ws = self.synthesis.num_ws

    def make_noise(
        self, batch: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> list[torch.Tensor]:
        """One (B, 1, r, r) standard normal map per synthesis layer."""
        device = device if device is not None else self.synthesis.const.device
        return [torch.randn(batch, 1, h, w, generator=generator, device=device) for h, w in self.synthesis.noise_shapes]

    @torch.no_grad()
    def mean_w(self, num_samples: int = 1000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean w over `num_samples` mapped z (seeded) and the root-mean-square deviation from it (a scalar)."""
        device = self.synthesis.const.device
        generator = torch.Generator(device=device).manual_seed(seed)
        z = torch.randn(num_samples, self.latent_dim, generator=generator, device=device)
        w = self.mapping(z)
        mean = w.mean(0)
        return mean, (w - mean).square().sum(1).mean().div(self.w_dim).sqrt()

    def forward(
        self, z: torch.Tensor, noise: str | Sequence[torch.Tensor] = "random", ws: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Images from latents `z` (B, latent_dim), or from `ws` (B, num_ws, w_dim) when given (`z` is then ignored).

        `noise`: 'random' (fresh maps), 'const' (the stored maps), 'none', or one map per layer.
        """
        if ws is None:
            ws = self.mapping(z)[:, None].expand(-1, self.num_ws, -1)
        return self.synthesis(ws, noise)


# ----------------------------------------------------------------------------------------------------------------
# discriminator


def minibatch_stddev(x: torch.Tensor, group_size: int = 4) -> torch.Tensor:
    """Append the mean standard deviation over groups of samples as one extra feature map (StyleGAN)."""
    batch, channels, height, width = x.shape
    group = max(g for g in range(1, min(group_size, batch) + 1) if batch % g == 0)
    y = x.reshape(group, -1, channels, height, width)
    y = (y - y.mean(0)).square().mean(0).add(1e-8).sqrt().mean(dim=(1, 2, 3))  # (batch // group,)
    y = y.reshape(-1, 1, 1, 1).repeat(group, 1, height, width)
    return torch.cat([x, y], dim=1)


class DiscriminatorBlock(nn.Module):
    """Residual block: 3 x 3 conv, downsampling 3 x 3 conv; 1 x 1 downsampling skip; sum / sqrt(2)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv0 = EqualConv2d(in_channels, in_channels, 3, activation=True)
        self.conv1 = EqualConv2d(in_channels, out_channels, 3, activation=True, down=True)
        self.skip = EqualConv2d(in_channels, out_channels, 1, bias=False, down=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.skip(x) + self.conv1(self.conv0(x))) / math.sqrt(2.0)


class StyleGAN2Discriminator(nn.Module):
    """Residual StyleGAN2 discriminator: (B, in_channels, R, R) images in [-1, 1] -> (B, 1) logits.

    fromRGB, then per level two 3 x 3 convolutions and a 2x average-pool downsampling with a 1 x 1 skip (sum scaled
    by 1/sqrt(2)), minibatch standard deviation, a 3 x 3 convolution and a two-layer fully connected head.
    """

    def __init__(
        self,
        resolution: int = 64,
        in_channels: int = 1,
        channel_base: int = 2048,
        channel_max: int = 128,
        mbstd_group_size: int = 4,
    ) -> None:
        super().__init__()
        if resolution < 8 or resolution & (resolution - 1):
            raise ValueError(f"resolution must be a power of two >= 8, got {resolution}.")
        self.resolution = resolution
        self.mbstd_group_size = mbstd_group_size
        sizes = [resolution >> i for i in range(int(math.log2(resolution)) - 1)]  # R, R/2, ..., 4
        ch = [_channels(s, channel_base, channel_max) for s in sizes]
        self.from_rgb = EqualConv2d(in_channels, ch[0], 1, activation=True)
        self.blocks = nn.Sequential(*[DiscriminatorBlock(ch[i], ch[i + 1]) for i in range(len(ch) - 1)])
        self.conv = EqualConv2d(ch[-1] + 1, ch[-1], 3, activation=True)
        self.fc = EqualLinear(ch[-1] * 16, ch[-1], activation=True)
        self.out = EqualLinear(ch[-1], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.resolution, self.resolution):
            raise ValueError(f"expected {self.resolution} x {self.resolution} images, got {tuple(x.shape)}.")
        x = self.blocks(self.from_rgb(x))
        x = self.conv(minibatch_stddev(x, self.mbstd_group_size))
        return self.out(self.fc(x.flatten(1)))
