"""Adaptive discriminator augmentation (ADA, Karras et al. 2020): augment what the discriminator sees, with a
probability tuned on the fly, so that a GAN trained on a few hundred slices does not let D memorise them.

Simplifications against the paper: bilinear (not wavelet-filtered) isotropic scaling, and no colour or cutout
augmentations beyond brightness and contrast (one channel).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["AdaptiveAugment"]


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
