"""Translation with a trained CycleGAN generator, with the same input checks and output conventions as the diffusion
inferers, for an evaluator or as the ``translator`` of ``scripts.lmidiffusion.inferers.SliceWiseInferer``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.utils import convert_to_dst_type

from scripts.tensors import from_model_space, plain, to_model_space, validate_source

__all__ = ["CycleGANInferer"]


class CycleGANInferer(Inferer):
    """Translate (B, 1, H, W) source images in [0, 1] with a trained CycleGAN generator (source -> target).

    The input is checked like every source (``validate_source``), resized to `image_size` (the generator's working
    grid; None keeps the input size) and the result resized back; the output is a ``MetaTensor`` in [0, 1] with the
    input's meta data. Deterministic, no gradients; the network's train/eval mode is restored afterwards.
    """

    method_names = ("cyclegan",)  # checked by scripts.configs.check_method

    def __init__(self, image_size: Sequence[int] | None = None) -> None:
        super().__init__()
        self.image_size = tuple(int(s) for s in image_size) if image_size is not None else None

    @torch.no_grad()
    def _generate(self, source: torch.Tensor, network: nn.Module) -> torch.Tensor:
        """The translation of a validated plain-tensor batch, on the input grid, clamped to [0, 1]."""
        size = tuple(source.shape[2:])
        x = source
        if self.image_size is not None and size != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="area")
        was_training = network.training
        network.eval()
        try:
            y = from_model_space(network(to_model_space(x)))
        finally:
            network.train(was_training)
        if y.shape[2:] != size:
            y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        return y.clamp(0.0, 1.0)

    def sample(self, inputs: torch.Tensor, network: nn.Module) -> MetaTensor:
        """Translate a (B, 1, H, W) batch of [0, 1] source images (the translator interface of every method)."""
        validate_source(inputs)
        parameter = next(network.parameters(), None)
        device = parameter.device if parameter is not None else inputs.device
        source = plain(inputs).float().to(device)
        result = convert_to_dst_type(self._generate(source, network), dst=inputs)[0]
        return result if isinstance(result, MetaTensor) else MetaTensor(result)

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args, **kwargs) -> MetaTensor:  # type: ignore[override]
        """The translation too: a GAN generator has no training forward pass through its inferer."""
        return self.sample(inputs, network)
