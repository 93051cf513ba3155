"""Layers of the compact StyleGAN2: equalised-learning-rate linear and convolution layers, and the modulated
(style-scaled, demodulated) convolution that lets one ``w`` per layer steer the synthesis."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["LRELU_GAIN", "EqualConv2d", "EqualLinear", "ModulatedConv2d"]

# gain after a leaky ReLU (slope 0.2), so that activations keep unit variance
LRELU_GAIN = math.sqrt(2.0)


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
        return F.leaky_relu(x, 0.2) * LRELU_GAIN if self.activation else x


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
        return F.leaky_relu(x, 0.2) * LRELU_GAIN if self.activation else x


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
