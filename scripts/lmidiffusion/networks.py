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

A trained denoiser can also be made deeper without changing what it computes (:func:`deepen_state_dict`): every
added residual block starts as the identity (its last convolution at zero, and in the up path a skip projection
that passes the hidden state through), and every added attention block starts with its output projection at zero,
so a campaign can continue from the trained weights with more blocks per level.
"""

from __future__ import annotations

import torch
from monai.networks.nets import DiffusionModelUNet

__all__ = ["SpaceToDepthDiffusionUNet", "deepen_state_dict"]


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


def _identity_block(state: dict[str, torch.Tensor], prefix: str, out_channels: int) -> None:
    """Make the residual block (and attention block) at `prefix` of a fresh state return its input unchanged."""
    if prefix.rsplit(".", 2)[-2] == "resnets":
        state[f"{prefix}.conv2.conv.weight"].zero_()
        state[f"{prefix}.conv2.conv.bias"].zero_()
        skip = f"{prefix}.skip_connection.conv.weight"
        if skip in state:  # up path: 1 x 1 projection of [hidden, skip] -> keep the hidden channels only
            weight = torch.zeros_like(state[skip])
            weight[:, :out_channels, 0, 0] = torch.eye(out_channels, dtype=weight.dtype)
            state[skip] = weight
            state[f"{prefix}.skip_connection.conv.bias"].zero_()
    else:  # attentions: the residual attention block adds its output projection to its input
        state[f"{prefix}.attn.out_proj.weight"].zero_()
        state[f"{prefix}.attn.out_proj.bias"].zero_()


def deepen_state_dict(
    state: dict[str, torch.Tensor], network: torch.nn.Module, source_num_res_blocks: int | list[int]
) -> dict[str, torch.Tensor]:
    """A state dict for `network` that computes exactly what `state` (the same network with
    `source_num_res_blocks` residual blocks per level) computes (see the module docstring).

    The down path of level ``l`` gains blocks after its trained ones; each new block's output equals its input, so
    the extra skip tensors repeat the last trained block's output. The matching up block pops those repeats first:
    its first trained block keeps its place, the new identity blocks follow, then the remaining trained blocks.
    """
    target = {key: value.detach().clone() for key, value in network.state_dict().items()}
    unet = network.unet if hasattr(network, "unet") else network
    prefix = "unet." if hasattr(network, "unet") else ""
    levels = len(unet.down_blocks)
    new_blocks = [len(block.resnets) for block in unet.down_blocks]
    old_blocks = (
        [int(source_num_res_blocks)] * levels if isinstance(source_num_res_blocks, int) else list(source_num_res_blocks)
    )
    if len(old_blocks) != levels or any(not 1 <= o <= n for o, n in zip(old_blocks, new_blocks, strict=True)):
        raise ValueError(f"cannot deepen {old_blocks} residual blocks per level into {new_blocks}.")

    def renamed(key: str) -> str:
        """The key of `network` that the trained `key` moves to."""
        parts = key[len(prefix) :].split(".") if key.startswith(prefix) else None
        if parts is None or parts[0] not in ("down_blocks", "up_blocks") or parts[2] not in ("resnets", "attentions"):
            return key
        level = int(parts[1]) if parts[0] == "down_blocks" else levels - 1 - int(parts[1])
        index, extra = int(parts[3]), new_blocks[level] - old_blocks[level]
        if parts[0] == "up_blocks" and index >= 1:
            index += extra
        return prefix + ".".join(parts[:3] + [str(index)] + parts[4:])

    for key, value in state.items():
        new_key = renamed(key)
        if new_key not in target or target[new_key].shape != value.shape:
            raise ValueError(f"trained parameter {key} {tuple(value.shape)} has no place in the deeper network.")
        target[new_key] = value.detach().clone()
    for level in range(levels):
        extra = new_blocks[level] - old_blocks[level]
        channels = unet.down_blocks[level].resnets[0].out_channels
        up = levels - 1 - level
        fresh = [
            f"down_blocks.{level}.{kind}.{old_blocks[level] + k}"
            for k in range(extra)
            for kind in ("resnets", "attentions")
        ]
        fresh += [f"up_blocks.{up}.{kind}.{1 + k}" for k in range(extra) for kind in ("resnets", "attentions")]
        for block in fresh:
            if any(key.startswith(f"{prefix}{block}.") for key in target):
                _identity_block(target, prefix + block, channels)
    return target
