"""StyleGAN2-ADA trained on target (T1w) images only, and GAN inversion as a zero-shot translation baseline.

The paper's second GAN baseline (Karras et al., "Training Generative Adversarial Networks with Limited Data",
StyleGAN2-ADA): a generator learns the target modality from target images alone; a source image is translated by
finding the latent code whose generated image best matches it under a modality-robust loss (GAN inversion), and that
generated image is the translation. The paper reports this baseline as poor (Dice 0.66); this module is an honest,
working and compact version of it, not a tuned one.

Model (written with torch building blocks; MONAI supplies the engine, handlers, inferer base and data pipeline):

- :class:`StyleGAN2Generator`: mapping network (pixel-normalised z -> w, ``mapping_layers`` fully connected layers,
  leaky ReLU, equalised learning rate, learning-rate multiplier 0.01) and synthesis network from a learned 4 x 4
  constant up to ``resolution`` (64 x 64 by default; any power of two >= 8): per resolution two modulated /
  demodulated 3 x 3 convolutions (grouped-convolution implementation: one conv call for the whole batch), the first
  after a bilinear 2x upsampling, per-layer noise inputs with a learned strength, and a toRGB skip output (modulated
  1 x 1 convolution without demodulation) added to the upsampled image of the level below. One output channel,
  trained in [-1, 1] (:func:`to_unit` maps to [0, 1]). Channels ``min(channel_base // r, channel_max)`` at
  resolution r. **The generator works at 64 x 64; for evaluation its output is upsampled bilinearly to the 128 x 128
  image grid** (the inferer does it).
- :class:`StyleGAN2Discriminator`: residual (fromRGB, then per level two 3 x 3 convolutions and a 2x average-pool
  downsampling with a 1 x 1 skip, sum scaled by 1/sqrt(2)), minibatch standard deviation, 3 x 3 conv and a two-layer
  fully connected head.
- Simplifications against the paper, all stated: bilinear upsampling and 2 x 2 average-pool downsampling instead of
  FIR filters, no path-length regularisation, bilinear (not wavelet-filtered) isotropic scaling in ADA, no
  colour/cutout augmentations beyond brightness and contrast (one channel).

Training (:class:`StyleGAN2Trainer`, a ``monai.engines.Trainer``): non-saturating logistic loss, lazy R1
regularisation on reals every ``r1_interval`` iterations (``r1_gamma`` 1.0 at 64 x 64; the penalty is the gradient
with respect to the augmented reals that D sees: grid_sample has no double backward), style-mixing
regularisation, an EMA generator, and adaptive discriminator augmentation (:class:`AdaptiveAugment`): x-flip,
90-degree rotation, integer translation, isotropic scaling, brightness and contrast, each applied to real and fake
images before the discriminator with probability p; every 4 iterations p moves by ``images / (speed_kimg * 1000)``
up when ``r_t = E[sign(D(real))]`` exceeds the target 0.6 (the discriminator overfits), down otherwise. p and the
EMA generator are part of the checkpoint, so a resumed run continues with them.

Inversion (:class:`StyleGANInversionInferer`, a ``monai.inferers.Inferer``): see its docstring for the loss.

Commands (from the bundle root)::

    # CPU: 64 x 64, batch 8, 82 iterations per epoch on the labelmaps data (657 T1w training slices), 300 epochs
    OMP_NUM_THREADS=1 python -m monai.bundle run --config_file configs/train_stylegan.json
    # GPU: same config, bigger batch and more epochs (20 iterations per epoch at batch 32; 40k iterations, 1.3 M images)
    python -m monai.bundle run --config_file configs/train_stylegan.json \\
        --batch_size 32 --train#trainer#max_epochs 2000 --checkpoint_interval 20

Both resume from the newest checkpoint in ``models/checkpoints_stylegan/`` and export the EMA generator's state dict
to ``models/stylegan_generator.pt``. Costs measured on the project's 2-core CPU (shared with other jobs), torch 2.13,
default sizes (0.38 M generator and 0.30 M discriminator parameters), batch 8: 0.25 s per iteration with one thread
(0.4 s on the R1 iterations), 21-22 s per epoch, so the 300 default epochs take about 1.8 hours; two threads were
6x slower under the machine's other load (OpenMP barriers), hence ``OMP_NUM_THREADS=1``. A 28-epoch (10 minute)
run already gives head-shaped samples. Inversion: about 9 s per 128 x 128 slice at the default 200 steps, one
thread.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.engines import Trainer
from monai.inferers import Inferer
from monai.utils import convert_to_dst_type
from torch.utils.data import DataLoader
from tqdm import tqdm

from scripts.inferers import plain, validate_source
from scripts.lmi import LocalMutualInformation
from scripts.transforms import head_mask

logger = logging.getLogger(__name__)

__all__ = [
    "AdaptiveAugment",
    "ModulatedConv2d",
    "StyleGAN2Discriminator",
    "StyleGAN2Generator",
    "StyleGAN2Trainer",
    "StyleGANInversionInferer",
    "ema_copy",
    "to_unit",
]

_LRELU_GAIN = math.sqrt(2.0)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """Generator output ([-1, 1] training range) -> [0, 1] images, clipped."""
    return ((images + 1.0) * 0.5).clamp(0.0, 1.0)


def ema_copy(network: nn.Module) -> nn.Module:
    """A frozen copy of `network` for the exponential moving average of its weights (eval mode, no gradients)."""
    return copy.deepcopy(network).eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------------
# layers with equalised learning rate


class EqualLinear(nn.Module):
    """Fully connected layer with equalised learning rate: weights stored N(0, 1/lr_mul^2), scaled at run time."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias_init: float = 0.0,
        lr_mul: float = 1.0,
        activation: bool = False,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init) / lr_mul))
        self.weight_gain = lr_mul / math.sqrt(in_features)
        self.lr_mul = lr_mul
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.linear(x, self.weight * self.weight_gain, self.bias * self.lr_mul)
        return F.leaky_relu(x, 0.2) * _LRELU_GAIN if self.activation else x


class EqualConv2d(nn.Module):
    """Convolution with equalised learning rate; `down` average-pools by 2 before the convolution."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        bias: bool = True,
        activation: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        self.activation = activation
        self.down = down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down:
            x = F.avg_pool2d(x, 2)
        x = F.conv2d(x, self.weight * self.weight_gain, self.bias, padding=self.weight.shape[-1] // 2)
        return F.leaky_relu(x, 0.2) * _LRELU_GAIN if self.activation else x


class ModulatedConv2d(nn.Module):
    """StyleGAN2 modulated convolution: per-sample weights ``w * s`` (style s from w), optionally demodulated.

    Demodulation rescales each output channel's per-sample weights to unit L2 norm, so unit-variance inputs give
    unit-variance outputs whatever the style. The batch is one grouped convolution (groups = batch size). `up`
    upsamples the input bilinearly by 2 first.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        w_dim: int,
        demodulate: bool = True,
        up: bool = False,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.affine = EqualLinear(w_dim, in_channels, bias_init=1.0)
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        self.demodulate = demodulate
        self.up = up

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        batch, in_channels = x.shape[:2]
        styles = self.affine(w)  # (B, in)
        weight = self.weight[None] * self.weight_gain * styles[:, None, :, None, None]  # (B, out, in, k, k)
        if self.demodulate:
            weight = weight * torch.rsqrt(weight.square().sum(dim=(2, 3, 4), keepdim=True) + 1e-8)
        if self.up:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        height, width = x.shape[2:]
        out_channels, k = weight.shape[1], weight.shape[-1]
        x = F.conv2d(
            x.reshape(1, batch * in_channels, height, width),
            weight.reshape(batch * out_channels, in_channels, k, k),
            padding=k // 2,
            groups=batch,
        )
        return x.reshape(batch, out_channels, height, width)


# ----------------------------------------------------------------------------------------------------------------
# generator


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
        return F.leaky_relu(x + self.bias[None, :, None, None], 0.2) * _LRELU_GAIN


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
    """Compact StyleGAN2 generator (see the module docstring); ``forward(z)`` gives (B, out_channels, R, R) in ~[-1, 1].

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
    """Residual StyleGAN2 discriminator: (B, in_channels, R, R) images in [-1, 1] -> (B, 1) logits."""

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


# ----------------------------------------------------------------------------------------------------------------
# adaptive discriminator augmentation


class AdaptiveAugment(nn.Module):
    """ADA: differentiable augmentations applied with probability p; p tuned by the r_t sign heuristic.

    ``forward(images)`` augments (B, C, H, W) images (square, [-1, 1]): each of x-flip, 90-degree rotation (by 90,
    180 or 270 degrees), integer translation (up to `translate_max` of the side, in whole pixels), isotropic scaling
    (log2-normal, std `scale_std`), brightness (additive, std `brightness_std`) and contrast (log2-normal factor, std
    `contrast_std`) is applied to each image independently with probability p. The geometric ones are one bilinear
    ``grid_sample`` with reflection padding (flips, rotations and integer shifts land on pixel centres exactly); all
    are differentiable with respect to the images. At p = 0 the images are returned unchanged.

    ``observe(real_logits)`` is called once per iteration with the discriminator's logits on (augmented) reals; every
    `interval` calls, ``r_t = mean(sign(logits))`` over those calls and p moves by
    ``sign(r_t - target) * images / (speed_kimg * 1000)``, clipped to [0, 1]. p, r_t and the accumulators are buffers,
    so they are saved and restored with the module's state dict.
    """

    def __init__(
        self,
        target: float = 0.6,
        interval: int = 4,
        speed_kimg: float = 100.0,
        initial_p: float = 0.0,
        translate_max: float = 0.125,
        scale_std: float = 0.2,
        brightness_std: float = 0.2,
        contrast_std: float = 0.5,
        adjust: bool = True,
    ) -> None:
        super().__init__()
        if interval < 1 or speed_kimg <= 0:
            raise ValueError(f"interval must be >= 1 and speed_kimg > 0, got {interval} and {speed_kimg}.")
        self.target = float(target)
        self.interval = int(interval)
        self.speed_kimg = float(speed_kimg)
        self.translate_max = float(translate_max)
        self.scale_std = float(scale_std)
        self.brightness_std = float(brightness_std)
        self.contrast_std = float(contrast_std)
        self.adjust = adjust
        self.register_buffer("p", torch.tensor(float(initial_p), dtype=torch.float64))
        self.register_buffer("r_t", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("sign_sum", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("sign_count", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("calls", torch.tensor(0, dtype=torch.long))

    @property
    def probability(self) -> float:
        return float(self.p)

    @torch.no_grad()
    def observe(self, real_logits: torch.Tensor) -> None:
        """Accumulate sign(D(real)); adjust p every `interval` calls (when `adjust`)."""
        self.sign_sum += torch.sign(real_logits.detach()).sum().to(self.sign_sum)
        self.sign_count += real_logits.numel()
        self.calls += 1
        if int(self.calls) % self.interval == 0 and self.sign_count > 0:
            self.r_t.copy_(self.sign_sum / self.sign_count)
            if self.adjust:
                step = torch.sign(self.r_t - self.target) * self.sign_count / (self.speed_kimg * 1000.0)
                self.p.copy_((self.p + step).clamp(0.0, 1.0))
            self.sign_sum.zero_()
            self.sign_count.zero_()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        p = float(self.p)
        if p <= 0:
            return images
        batch, device = images.shape[0], images.device

        def chosen() -> torch.Tensor:
            return torch.rand(batch, device=device) < p

        # geometric: one 2 x 3 sampling matrix per image in normalised coordinates
        theta = torch.eye(3, device=device).repeat(batch, 1, 1)
        flip = torch.where(chosen(), -1.0, 1.0)
        theta = theta @ torch.diag_embed(torch.stack([flip, torch.ones_like(flip), torch.ones_like(flip)], 1))
        quarter = torch.randint(1, 4, (batch,), device=device) * chosen()
        cos = torch.tensor([1.0, 0.0, -1.0, 0.0], device=device)[quarter]  # exact cos/sin of k * 90 degrees
        sin = torch.tensor([0.0, 1.0, 0.0, -1.0], device=device)[quarter]
        rotation = torch.eye(3, device=device).repeat(batch, 1, 1)
        rotation[:, 0, 0], rotation[:, 0, 1], rotation[:, 1, 0], rotation[:, 1, 1] = cos, -sin, sin, cos
        theta = theta @ rotation
        height, width = images.shape[-2:]
        shift = (torch.rand(batch, 2, device=device) * 2 - 1) * self.translate_max
        shift = torch.round(shift * torch.tensor([width, height], device=device)) * chosen()[:, None]
        translation = torch.eye(3, device=device).repeat(batch, 1, 1)
        translation[:, 0, 2] = 2 * shift[:, 0] / width
        translation[:, 1, 2] = 2 * shift[:, 1] / height
        theta = theta @ translation
        scale = torch.where(chosen(), torch.exp2(torch.randn(batch, device=device) * self.scale_std), 1.0)
        theta = theta @ torch.diag_embed(torch.stack([scale, scale, torch.ones_like(scale)], 1))
        grid = F.affine_grid(theta[:, :2].to(images.dtype), list(images.shape), align_corners=False)
        images = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

        # intensity
        view = (batch,) + (1,) * (images.ndim - 1)
        brightness = torch.randn(batch, device=device) * self.brightness_std * chosen()
        contrast = torch.where(chosen(), torch.exp2(torch.randn(batch, device=device) * self.contrast_std), 1.0)
        return (images + brightness.view(view).to(images.dtype)) * contrast.view(view).to(images.dtype)

    def extra_repr(self) -> str:
        return f"p={float(self.p):.4f}, target={self.target}, interval={self.interval}, speed_kimg={self.speed_kimg}"


# ----------------------------------------------------------------------------------------------------------------
# training


class StyleGAN2Trainer(Trainer):
    """StyleGAN2-ADA training as a MONAI ``Trainer`` (ignite engine; handlers, checkpoints and resume as usual).

    Each iteration, on a batch of target images in [0, 1] (mapped to [-1, 1]):

    1. discriminator: logistic loss ``softplus(D(A(fake))) + softplus(-D(A(real)))`` with A the ADA augmentation;
       its real logits feed ``augment.observe`` (the r_t heuristic);
    2. lazy R1 on iterations 1, 1 + r1_interval, ...: ``r1_gamma / 2 * |grad_y D(y)|^2 * r1_interval`` at the
       augmented reals y = A(x)
       (the interval factor keeps the effective strength of an every-iteration penalty);
    3. generator: non-saturating ``softplus(-D(A(G(z))))``, with style mixing (two z, random crossover layer) in
       `style_mixing_prob` of the iterations;
    4. EMA of the generator's weights and buffers: ``beta = min(ema_beta, (1 + i) / (10 + i))`` at iteration i.

    The output dict holds floats for StatsHandler / TensorBoardStatsHandler: 'g_loss', 'd_loss', 'r1' (the latest
    penalty, without its gamma factor), 'ada_p', 'ada_rt'.

    Args:
        device: device of the networks.
        max_epochs: epochs to run.
        train_data_loader: batches of dicts with `image_key` -> (B, 1, R, R) images in [0, 1].
        generator: :class:`StyleGAN2Generator`.
        discriminator: :class:`StyleGAN2Discriminator`.
        g_optimizer: optimizer of the generator.
        d_optimizer: optimizer of the discriminator.
        generator_ema: the EMA copy (e.g. :func:`ema_copy`); None disables the EMA.
        augment: :class:`AdaptiveAugment`; None trains without augmentation.
        r1_gamma: R1 weight (0 disables it).
        r1_interval: lazy regularisation interval.
        style_mixing_prob: probability of a style-mixing iteration.
        ema_beta: EMA decay per iteration.
        image_key: key of the images in the batch dict.
        epoch_length, non_blocking, iteration_update, train_handlers: as in ``monai.engines.Trainer``.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: DataLoader,
        generator: StyleGAN2Generator,
        discriminator: StyleGAN2Discriminator,
        g_optimizer: torch.optim.Optimizer,
        d_optimizer: torch.optim.Optimizer,
        generator_ema: nn.Module | None = None,
        augment: AdaptiveAugment | None = None,
        r1_gamma: float = 1.0,
        r1_interval: int = 16,
        style_mixing_prob: float = 0.9,
        ema_beta: float = 0.999,
        image_key: str = "image",
        epoch_length: int | None = None,
        non_blocking: bool = False,
        iteration_update=None,
        train_handlers: Sequence | None = None,
    ) -> None:
        if r1_interval < 1:
            raise ValueError(f"r1_interval must be >= 1, got {r1_interval}.")
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            iteration_update=iteration_update,
            handlers=train_handlers,
            decollate=False,
        )
        self.generator = generator
        self.discriminator = discriminator
        self.g_optimizer = g_optimizer
        self.d_optimizer = d_optimizer
        self.generator_ema = generator_ema
        self.augment = augment
        self.r1_gamma = float(r1_gamma)
        self.r1_interval = int(r1_interval)
        self.style_mixing_prob = float(style_mixing_prob)
        self.ema_beta = float(ema_beta)
        self.image_key = image_key
        self.last_r1 = 0.0

    def _augment(self, images: torch.Tensor) -> torch.Tensor:
        return images if self.augment is None else self.augment(images)

    def generate(self, batch: int) -> torch.Tensor:
        """Fakes from fresh latents, with style mixing in `style_mixing_prob` of the calls."""
        generator = getattr(self.generator, "module", self.generator)
        device = generator.synthesis.const.device
        w = generator.mapping(torch.randn(batch, generator.latent_dim, device=device))
        ws = w[:, None].repeat(1, generator.num_ws, 1)
        if self.style_mixing_prob > 0 and float(torch.rand(())) < self.style_mixing_prob:
            cutoff = int(torch.randint(1, generator.num_ws, ()))
            ws[:, cutoff:] = generator.mapping(torch.randn(batch, generator.latent_dim, device=device))[:, None]
        return self.generator(None, ws=ws)

    @torch.no_grad()
    def update_ema(self, iteration: int) -> None:
        if self.generator_ema is None:
            return
        beta = min(self.ema_beta, (1.0 + iteration) / (10.0 + iteration))
        source = getattr(self.generator, "module", self.generator)
        for ema, value in zip(self.generator_ema.parameters(), source.parameters(), strict=True):
            ema.lerp_(value.detach(), 1.0 - beta)
        for ema, value in zip(self.generator_ema.buffers(), source.buffers(), strict=True):
            ema.copy_(value)

    def _iteration(self, engine: StyleGAN2Trainer, batchdata) -> dict[str, float]:  # type: ignore[override]
        if batchdata is None:
            raise ValueError("must provide batch data for current iteration.")
        if isinstance(batchdata, dict):
            reals = batchdata[engine.image_key]
        elif isinstance(batchdata, (list, tuple)):
            reals = batchdata[0]
        else:
            reals = batchdata
        reals = plain(reals).to(engine.state.device, non_blocking=engine.non_blocking).float() * 2.0 - 1.0
        batch = reals.shape[0]
        iteration = engine.state.iteration
        discriminator = engine.discriminator

        # discriminator: logistic loss on augmented fakes and reals
        with torch.no_grad():
            fakes = engine.generate(batch)
        real_logits = discriminator(engine._augment(reals))
        d_loss = F.softplus(discriminator(engine._augment(fakes))).mean() + F.softplus(-real_logits).mean()
        engine.d_optimizer.zero_grad(set_to_none=True)
        d_loss.backward()
        engine.d_optimizer.step()
        if engine.augment is not None:
            engine.augment.observe(real_logits)

        # lazy R1 on the augmented reals (the images D actually sees): the gradient is taken with respect to them,
        # not through the augmentation, because grid_sample has no double backward (a CUDA run failed on it)
        if engine.r1_gamma > 0 and (iteration - 1) % engine.r1_interval == 0:
            with torch.no_grad():
                reals_r1 = engine._augment(reals)
            reals_r1 = reals_r1.detach().requires_grad_(True)
            logits = discriminator(reals_r1)
            (gradient,) = torch.autograd.grad(logits.sum(), reals_r1, create_graph=True)
            penalty = gradient.square().sum(dim=(1, 2, 3)).mean()
            engine.d_optimizer.zero_grad(set_to_none=True)
            (penalty * (engine.r1_gamma / 2) * engine.r1_interval).backward()
            engine.d_optimizer.step()
            engine.last_r1 = float(penalty.detach())

        # generator: non-saturating loss
        discriminator.requires_grad_(False)
        try:
            g_loss = F.softplus(-discriminator(engine._augment(engine.generate(batch)))).mean()
            engine.g_optimizer.zero_grad(set_to_none=True)
            g_loss.backward()
            engine.g_optimizer.step()
        finally:
            discriminator.requires_grad_(True)
        engine.update_ema(iteration)

        return {
            "g_loss": float(g_loss.detach()),
            "d_loss": float(d_loss.detach()),
            "r1": engine.last_r1,
            "ada_p": engine.augment.probability if engine.augment is not None else 0.0,
            "ada_rt": float(engine.augment.r_t) if engine.augment is not None else 0.0,
        }


# ----------------------------------------------------------------------------------------------------------------
# inversion


def _soft_dice(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image soft Dice of two (B, 1, H, W) maps in [0, 1]."""
    return 2 * (a * b).flatten(1).sum(1) / (a.flatten(1).sum(1) + b.flatten(1).sum(1)).clamp_min(1e-6)


def _noise_regularisation(noises: Sequence[torch.Tensor]) -> torch.Tensor:
    """StyleGAN2 projector's noise regulariser: squared spatial autocorrelation at lag 1, over a pyramid."""
    total = noises[0].new_zeros(())
    for noise in noises:
        while True:
            total = total + (noise * noise.roll(1, dims=3)).mean().square()
            total = total + (noise * noise.roll(1, dims=2)).mean().square()
            if noise.shape[2] <= 8:
                break
            noise = F.avg_pool2d(noise, 2)
    return total


class StyleGANInversionInferer(Inferer):
    """Translate source images by GAN inversion of a generator trained on the target modality only.

    ``inferer(inputs, network)``: `inputs` are (B, 1, H, W) source (e.g. PDw) images in [0, 1]; `network` is the
    trained (EMA) :class:`StyleGAN2Generator`. For each image a W+ latent (one w per synthesis layer, initialised at
    the mean w of `num_mean_samples` mapped z, seeded) and the per-layer noise maps (seeded normal) are optimised with
    Adam for `num_steps` steps (learning-rate ramp up over the first 5 %, cosine ramp down over the last 25 %, and the
    noise maps renormalised to zero mean and unit variance after each step, as the StyleGAN2 projector does). The
    generator output at the last step, in [0, 1], upsampled bilinearly to the input size (and set to 0 outside the
    source's head mask when `mask_background`), is the translation: a ``MetaTensor`` with the input's meta data.

    The loss, minimised, per image (source resampled to the generator grid by area averaging, head = the source's
    head mask on that grid, G = the generator output mapped to [0, 1] and clipped)::

        (1 - mean_{head} LMI(source, G))                           # structure, whatever the contrast
        + mask_weight * (1 - softDice(silhouette(G), head))        # the head outline: air is dark in every contrast
        + w_weight * mean(((w+ - w_mean) / w_std)^2)               # stay near the learned distribution
        + noise_weight * autocorrelation(n)                        # noise stays noise

    Why this loss. A pixel loss (L1/L2, SSIM, perceptual features of a network trained on one contrast) would ask the
    T1w generator to reproduce PDw intensities, i.e. to invert to the wrong contrast or fail. The LMI of the bundle
    (``scripts.lmi``, differentiable; 12 bins, sigma 0.07 as the diffusion conditioner) measures local statistical
    dependence between 3 x 3 patches, whatever one-to-one intensity map relates them, so maximising its mean over the
    head asks the generated T1w image to have the source's structures (edges, tissue boundaries) in the same places,
    with its own contrast. G is clipped to [0, 1] before the LMI: out-of-range intensities have small Parzen weights
    and inflate the NMI ratio (LMI(s, s + 1) is about 9x LMI(s, s)), which an unclipped optimisation exploits. The
    LMI has two blind spots: it is 0 wherever the source is flat (the air around the head), and its reach is the
    patch plus the search window (2 pixels), so it cannot pull a misplaced outline. The head-mask term covers both
    with the one intensity fact the two modalities share, that air is dark: ``scripts.transforms.head_mask`` of the
    source is modality independent, and the generated image's silhouette is a soft threshold at
    `foreground_threshold` followed by a grey-level closing (`closing_size`) that fills the dark skull and CSF gaps
    inside a T1w head (on real test pairs, the silhouette of the true T1w target reaches a soft Dice of 0.95 with
    the PDw head mask, so the term does not pull away from the right answer). Nothing else is imposed inside the
    head, where any intensity rule would assume a contrast. The W+ regulariser keeps the latent where the generator
    produces plausible T1w images (far from the mean, W+ can fit almost anything, PDw contrast included), and the
    noise regulariser (StyleGAN2 projector) stops the noise maps from encoding the image.

    The LMI is evaluated on the bounding box of the head plus the LMI's reach (the same values, ~40 % less work).
    Cost, measured on the project's 2-core CPU, one thread, default generator (64 x 64): 0.04-0.05 s per step,
    about 9 s per 128 x 128 slice at 200 steps.

    Honest expectations: the result is a plausible T1w-like image with the source's outline and coarse structure;
    fine anatomy is limited by the 64 x 64 generator and by how far a compact GAN's latent space reaches. The paper
    reports this baseline as the weakest (Dice 0.66).

    Args:
        num_steps: optimisation steps.
        learning_rate: peak Adam learning rate (for W+ and the noise maps).
        num_mean_samples: mapped z averaged for the initial w.
        optimize_noise: optimise the noise maps too (else they stay at their seeded initial values).
        lmi_bins, lmi_sigma, patch_size, search_size: the LMI layer's parameters (defaults as the bundle's
            conditioner: 12 bins, sigma 0.07).
        mask_weight, w_weight, noise_weight: weights of the loss terms above.
        foreground_threshold: intensity (in [0, 1]) above which a generated pixel counts as head for the silhouette.
        closing_size: odd size of the silhouette's closing (1 = none).
        mask_background: zero the translation outside the source's head mask.
        seed: seed of the mean-w samples and the initial noise maps; each call restarts from it.
        progress: show a progress bar over the steps.
    """

    def __init__(
        self,
        num_steps: int = 200,
        learning_rate: float = 0.1,
        num_mean_samples: int = 1000,
        optimize_noise: bool = True,
        lmi_bins: int = 12,
        lmi_sigma: float = 0.07,
        patch_size: int = 3,
        search_size: int = 3,
        mask_weight: float = 1.0,
        foreground_threshold: float = 0.15,
        closing_size: int = 5,
        w_weight: float = 0.01,
        noise_weight: float = 1e3,
        mask_background: bool = True,
        seed: int = 0,
        progress: bool = False,
    ) -> None:
        super().__init__()
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
        if num_mean_samples < 2:
            raise ValueError(f"num_mean_samples must be >= 2, got {num_mean_samples}.")
        if closing_size < 1 or closing_size % 2 == 0:
            raise ValueError(f"closing_size must be a positive odd integer, got {closing_size}.")
        self.num_steps = int(num_steps)
        self.learning_rate = float(learning_rate)
        self.num_mean_samples = int(num_mean_samples)
        self.optimize_noise = optimize_noise
        self.lmi = LocalMutualInformation(patch_size, search_size, lmi_bins, lmi_sigma)
        self.mask_weight = float(mask_weight)
        self.foreground_threshold = float(foreground_threshold)
        self.closing_size = int(closing_size)
        self.w_weight = float(w_weight)
        self.noise_weight = float(noise_weight)
        self.mask_background = mask_background
        self.seed = int(seed)
        self.progress = progress

    @staticmethod
    def _head(images: torch.Tensor) -> torch.Tensor:
        masks = [head_mask(img[0]) for img in images.detach().cpu().numpy()]
        return torch.from_numpy(np.stack(masks)[:, None].astype(np.float32)).to(images.device)

    def _foreground(self, image: torch.Tensor) -> torch.Tensor:
        """Soft head silhouette of a [0, 1] image: soft threshold, then a grey-level closing (max-pool dilation and
        erosion) that fills the dark skull and CSF gaps a T1w head has inside its outline."""
        foreground = torch.sigmoid((image - self.foreground_threshold) / 0.02)
        k = self.closing_size
        if k > 1:
            foreground = -F.max_pool2d(-F.max_pool2d(foreground, k, 1, k // 2), k, 1, k // 2)
        return foreground

    def _crop(self, head: torch.Tensor) -> tuple[slice, ...]:
        """Bounding box of the batch's head masks plus the LMI's reach: the LMI of every head pixel is unchanged by
        the crop (its patches and search candidates lie inside), and the LMI costs ~40 % less on a brain slice."""
        reach = self.lmi.patch_size // 2 + self.lmi.search_size // 2 + 1
        found = head.flatten(0, 1).amax(0) > 0
        if not found.any():
            return (slice(None),) * 4
        rows, cols = found.any(1).nonzero().flatten(), found.any(0).nonzero().flatten()
        height, width = found.shape
        return (
            slice(None),
            slice(None),
            slice(max(0, int(rows[0]) - reach), min(height, int(rows[-1]) + reach + 1)),
            slice(max(0, int(cols[0]) - reach), min(width, int(cols[-1]) + reach + 1)),
        )

    def _learning_rate(self, step: int) -> float:
        t = step / self.num_steps
        ramp = min(1.0, (1.0 - t) / 0.25)
        ramp = 0.5 - 0.5 * math.cos(ramp * math.pi)
        return self.learning_rate * ramp * min(1.0, t / 0.05 + 1.0 / self.num_steps)

    def invert(self, source: torch.Tensor, head: torch.Tensor, network: StyleGAN2Generator) -> dict:
        """Optimise W+ and noise for `source` / `head` (B, 1, R, R) on the generator grid R.

        Returns a dict with 'ws', 'noise', 'image' (the generator output in [0, 1] at the final latent, R x R) and
        'history': per step, the total loss ('loss', summed over the batch) and the mean LMI over the head ('lmi',
        averaged over the batch), lists of floats.
        """
        network = getattr(network, "module", network)
        source, head = plain(source), plain(head)
        batch, device = source.shape[0], source.device
        w_mean, w_std = network.mean_w(self.num_mean_samples, self.seed)
        generator = torch.Generator(device=device).manual_seed(self.seed + 1)
        noises = [n.requires_grad_(self.optimize_noise) for n in network.make_noise(batch, generator, device)]
        ws = w_mean.detach()[None, None].repeat(batch, network.num_ws, 1).requires_grad_(True)
        params = [ws] + (noises if self.optimize_noise else [])
        optimizer = torch.optim.Adam(params, lr=self.learning_rate, betas=(0.9, 0.999))
        head_pixels = head.flatten(1).sum(1).clamp_min(1.0)
        crop = self._crop(head)
        source_crop, head_crop = source[crop], head[crop]
        history: dict[str, list[float]] = {"loss": [], "lmi": []}
        steps = tqdm(range(self.num_steps), desc="invert", leave=False, disable=not self.progress)
        with torch.enable_grad():
            for step in steps:
                for group in optimizer.param_groups:
                    group["lr"] = self._learning_rate(step)
                # Clipped to [0, 1] before the LMI: out-of-range intensities have small kernel weights, which makes
                # the NMI ratio blow up (LMI(s, s + 1) is ~9x LMI(s, s)); an unclipped image would exploit that.
                image = to_unit(network(None, noise=noises, ws=ws))
                lmi = (self.lmi(source_crop, image[crop])[0] * head_crop).flatten(1).sum(1) / head_pixels
                loss_mask = 1.0 - _soft_dice(self._foreground(image), head)
                loss_w = ((ws - w_mean) / w_std).square().flatten(1).mean(1)
                loss = (1.0 - lmi + self.mask_weight * loss_mask + self.w_weight * loss_w).sum()
                if self.optimize_noise and self.noise_weight > 0:
                    loss = loss + self.noise_weight * _noise_regularisation(noises)
                gradients = torch.autograd.grad(loss, params)
                for param, gradient in zip(params, gradients, strict=True):
                    param.grad = gradient
                optimizer.step()
                history["loss"].append(float(loss.detach()))
                history["lmi"].append(float(lmi.detach().mean()))
                if self.optimize_noise:
                    with torch.no_grad():
                        for noise in noises:
                            noise -= noise.mean(dim=(2, 3), keepdim=True)
                            noise *= noise.square().mean(dim=(2, 3), keepdim=True).add(1e-8).rsqrt()
        with torch.no_grad():
            image = to_unit(network(None, noise=noises, ws=ws))
        return {"ws": ws.detach(), "noise": [n.detach() for n in noises], "image": image, "history": history}

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args, **kwargs) -> torch.Tensor:  # type: ignore[override]
        """Translate a (B, 1, H, W) batch of [0, 1] source images (see the class docstring)."""
        validate_source(inputs)
        generator = getattr(network, "module", network)
        if not isinstance(generator, StyleGAN2Generator):
            raise TypeError(f"the network must be a StyleGAN2Generator, got {type(generator).__name__}.")
        device = generator.synthesis.const.device
        source_full = plain(inputs).detach().float().to(device).clamp(0.0, 1.0)
        head_full = self._head(source_full)
        full_size = tuple(source_full.shape[2:])
        size = (generator.resolution, generator.resolution)
        resize = size != full_size
        source = F.interpolate(source_full, size=size, mode="area") if resize else source_full
        head = (F.interpolate(head_full, size=size, mode="area") > 0.5).float() if resize else head_full
        result = self.invert(source, head, generator)["image"]
        if resize:
            result = F.interpolate(result, size=full_size, mode="bilinear", align_corners=False)
        if self.mask_background:
            result = result * head_full
        result = result.clamp(0.0, 1.0).to(inputs.device)
        output = convert_to_dst_type(result, dst=inputs, dtype=torch.float32)[0]
        return output if isinstance(output, MetaTensor) else MetaTensor(output)

    def translate(self, inputs: torch.Tensor, network: torch.nn.Module) -> torch.Tensor:
        """Same as calling the inferer: the interface ``scripts.inferers.SliceWiseInferer`` uses."""
        return self(inputs, network)
