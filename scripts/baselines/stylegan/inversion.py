"""GAN inversion as a zero-shot translation baseline: a source (PDw) image is translated by finding the latent code
whose generated T1w image best matches it under a modality-robust loss; that generated image is the translation."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.utils import convert_to_dst_type
from tqdm import tqdm

from scripts.baselines.stylegan.networks import StyleGAN2Generator
from scripts.lmidiffusion.lmi import LocalMutualInformation
from scripts.tensors import from_model_space, plain, validate_source
from scripts.transforms import head_mask

__all__ = ["StyleGANInversionInferer"]


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
    (``scripts.lmidiffusion.lmi``, differentiable; 12 bins, sigma 0.07 as the conditioner) measures local statistical
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
    Cost per slice: ``docs/README.md`` (Baselines).

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

    method_names = ("stylegan",)  # checked by scripts.configs.check_method

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
                image = from_model_space(network(None, noise=noises, ws=ws))
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
            image = from_model_space(network(None, noise=noises, ws=ws))
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

    def sample(self, inputs: torch.Tensor, network: torch.nn.Module) -> torch.Tensor:
        """Same as calling the inferer: the translator interface of every method (``SliceWiseInferer`` uses it)."""
        return self(inputs, network)
