"""The tensor conventions every translator shares, in one place: images in [0, 1], the networks' [-1, 1] model
space, plain tensors inside the networks, and the checks a source batch must pass before any network sees it."""

from __future__ import annotations

import torch
from monai.utils import convert_to_tensor

__all__ = ["from_model_space", "plain", "to_model_space", "validate_source"]


def to_model_space(image: torch.Tensor) -> torch.Tensor:
    """[0, 1] image -> the networks' [-1, 1] (diffusion space, GAN generator range)."""
    return image * 2.0 - 1.0


def from_model_space(sample: torch.Tensor) -> torch.Tensor:
    """The networks' [-1, 1] -> [0, 1] image (clipped)."""
    return ((sample + 1.0) * 0.5).clamp(0.0, 1.0)


def plain(tensor: torch.Tensor) -> torch.Tensor:
    """A plain ``torch.Tensor`` view of `tensor`: a MetaTensor sends every op of the UNet through Python meta-data
    handling, which slows every step (docs/method.md, "Implementation measurements"); meta data is restored on
    output."""
    return convert_to_tensor(tensor, track_meta=False)


def validate_source(inputs: torch.Tensor) -> None:
    """Clear errors for inputs the translation cannot handle, before any network sees them."""
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"the source must be a torch.Tensor, got {type(inputs).__name__}.")
    if inputs.ndim != 4:
        raise ValueError(f"the source must be a batch of 2D images (B, 1, H, W), got shape {tuple(inputs.shape)}.")
    if inputs.shape[1] != 1:
        raise ValueError(f"the source must have one channel, got {inputs.shape[1]} (shape {tuple(inputs.shape)}).")
    if not torch.isfinite(inputs).all():
        raise ValueError("the source contains NaN or Inf values.")
    flat = inputs.flatten(1)
    empty = (flat.abs().amax(dim=1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"source image(s) {empty} of the batch are all zero: nothing to translate.")
