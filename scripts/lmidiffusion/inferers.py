"""Inferers that translate a source-modality image with a diffusion model trained on the target modality only.

They follow MONAI's ``DiffusionInferer`` contract: ``inferer(inputs, network, noise=..., timesteps=...)`` is the
training forward pass (with the same conditioning code as sampling, so the two cannot drift) and
``inferer.sample(inputs, network)`` translates. :class:`SamplingInferer` is the thin adapter that lets an engine
(a ``SupervisedEvaluator``) translate through ``inferer(inputs, network)``; every translator of the bundle, the GAN
baselines' included, has that ``sample`` method.

- :class:`LMIGuidedInferer` (LMIDiffusion, Wang et al.): reverse diffusion from pure noise; at every step the denoiser
  sees ``LMI(source, x_t)``, ``LMI(source, source)`` and the head mask. Options beyond the paper: DDIM in few steps,
  LMI-gradient guidance of the x0 estimate, and the LMI projection of the x0 estimate (``projection``).
- :class:`SDEditInferer` (Meng et al.): perturb the source to ``start_timestep`` and denoise with the same model.
- :class:`SliceWiseInferer`: any translator on slices or volumes of any in-plane size.

Inputs are (B, 1, H, W) source images scaled to [0, 1]; outputs are translated images in [0, 1] carrying the input's
meta data. The model may work on a coarser grid (``model_size``) than the image: the source is resampled to it, and
the final x0 estimate is brought back to the input grid (and projected onto the full-resolution source when the
projection is on).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import DiffusionInferer, Inferer
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, Scheduler
from monai.utils import convert_to_dst_type
from tqdm import tqdm

from scripts.configs import DEFAULT_METHOD
from scripts.lmidiffusion.diffusion import LMIConditioner, model_output_from_x0, x0_from_model_output
from scripts.lmidiffusion.projection import LocalConditionalMean
from scripts.tensors import from_model_space, plain, to_model_space, validate_source
from scripts.transforms import head_mask, in_plane_spacing, square_field_of_view

logger = logging.getLogger(__name__)

__all__ = [
    "LMIGuidedInferer",
    "SDEditInferer",
    "SamplingInferer",
    "SliceWiseInferer",
]


class LMIGuidedInferer(DiffusionInferer):
    """LMI-guided reverse diffusion (see the module docstring).

    Args:
        scheduler: a ``DDIMScheduler`` (few deterministic steps) or ``DDPMScheduler`` (ancestral) whose
            ``prediction_type`` matches the trained network.
        conditioner: builds the LMI conditioning channels; must match the one used in training.
        num_inference_steps: reverse steps.
        guidance_scale: largest intensity change (in [0, 1] units) per step of the normalised LMI-gradient ascent on
            the x0 estimate (0 disables it).
        projection: the LMI projection applied to each x0 estimate (None disables it).
        projection_strength: blend between the network's x0 (0) and its projection (1).
        projection_start: project only the x0 estimates of timesteps below this one: early estimates are blurry
            means whose projection would flatten the contrast before the prior has chosen it (the final estimate
            is always projected when a projection is given).
        recompute_every: recompute LMI(source, x_t) every this many steps (1 = every step, as in the paper).
        guidance_every: apply the LMI-gradient guidance on every this many steps (the first step included): each
            guided step costs an LMI forward and backward, about 0.7 of a network evaluation at 64 x 64.
        eta: DDIM stochasticity (0 = deterministic DDIM).
        stop_timestep: walk only the reverse steps at or above this timestep and return the x0 estimate of the
            last one (0 walks them all). An estimate at a higher noise level is closer to the posterior mean given
            the source; the step count then sets how finely the way there is walked, not how noisy the output is.
        num_samples: samples per image, averaged (their standard deviation is kept in ``last_std``).
        mirror_samples: with ``num_samples`` > 1, every second sample translates the source mirrored along
            `mirror_axis` and is mirrored back before the average (test-time augmentation: the samples then differ
            in the network's systematic errors as well as in their noise).
        mirror_axis: the spatial axis mirrored; it must be one the training augmentation flips (the bundle's slices
            hold left-right along spatial axis 0), or the mirrored samples show the network an unseen anatomy.
        model_size: spatial size the network works on; None uses the input size.
        mask_background: set the translation to 0 outside the head mask of the source.
        output_gamma: power applied to each [0, 1] sample: the translator's intensity calibration. The denoiser
            returns smooth images, and a smooth T1w has its 99.5th percentile (the scale every consumer here divides
            by) lower relative to its tissues than a noisy acquired T1w; the power that makes the translation of a
            T1w return that T1w's scaled tissue intensities undoes it (fitted on target images only by
            ``benchmarks/calibrate_output.py``). A power survives any per-image scaling, a gain would not.
        seed: seed of the sampling noise; each call restarts from it, so a call is reproducible.
        progress: show a progress bar over the reverse steps.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        conditioner: LMIConditioner,
        num_inference_steps: int = 50,
        guidance_scale: float = 0.0,
        projection: LocalConditionalMean | None = None,
        projection_strength: float = 1.0,
        projection_start: int = 1000,
        recompute_every: int = 1,
        guidance_every: int = 1,
        eta: float = 0.0,
        stop_timestep: int = 0,
        num_samples: int = 1,
        mirror_samples: bool = False,
        mirror_axis: int = 0,
        model_size: Sequence[int] | None = None,
        mask_background: bool = True,
        output_gamma: float = 1.0,
        seed: int = 0,
        progress: bool = False,
    ) -> None:
        super().__init__(scheduler=scheduler)
        if not output_gamma > 0:
            raise ValueError(f"output_gamma must be > 0, got {output_gamma}.")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}.")
        if recompute_every < 1:
            raise ValueError(f"recompute_every must be >= 1, got {recompute_every}.")
        if guidance_every < 1:
            raise ValueError(f"guidance_every must be >= 1, got {guidance_every}.")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
        if not 0 <= stop_timestep < scheduler.num_train_timesteps:
            raise ValueError(f"stop_timestep must be in [0, {scheduler.num_train_timesteps}), got {stop_timestep}.")
        if mirror_axis not in (0, 1):
            raise ValueError(f"mirror_axis must be a spatial axis of a 2D slice (0 or 1), got {mirror_axis}.")
        self.conditioner = conditioner
        self.num_inference_steps = int(num_inference_steps)
        self.guidance_scale = float(guidance_scale)
        self.projection = projection
        self.projection_strength = float(projection_strength)
        self.projection_start = int(projection_start)
        self.recompute_every = int(recompute_every)
        self.guidance_every = int(guidance_every)
        self.eta = float(eta)
        self.stop_timestep = int(stop_timestep)
        self.num_samples = int(num_samples)
        self.mirror_samples = bool(mirror_samples)
        self.mirror_axis = int(mirror_axis)
        self.last_std: torch.Tensor | None = None
        self.model_size = tuple(model_size) if model_size is not None else None
        self.mask_background = mask_background
        self.output_gamma = float(output_gamma)
        self.seed = int(seed)
        self.progress = progress

    @property
    def method_names(self) -> tuple[str, ...]:
        """The methods (configs/methods/*.json) this inferer implements (``scripts.configs.check_method``)."""
        return ("lmi_projection",) if self.projection is not None else (DEFAULT_METHOD, "lmi_paper")

    # ----------------------------------------------------------------------------------------------- training
    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        network: torch.nn.Module,
        noise: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        head: torch.Tensor | None = None,
        static: torch.Tensor | None = None,
        reference: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """The training forward pass: the network's output for `inputs` noised with `noise` to `timesteps`.

        `inputs` are the clean target images and `reference` the images the conditioning is built from (the targets
        themselves when None; a contrast-randomised copy for the default translator). `static` holds precomputed
        reference-only channels (``diffusion.StaticConditiond``) when the data pipeline cached them; otherwise they
        are computed here from the reference and `head`. Translation is :meth:`sample`.
        """
        if noise is None or timesteps is None:
            raise ValueError(
                f"{type(self).__name__}(inputs, network) is the training forward pass and needs noise and timesteps; "
                "translate with .sample(inputs, network), or give an engine SamplingInferer(translator)"
            )
        target = plain(inputs).float()
        reference = target if reference is None else plain(reference).to(target)
        noisy = self.scheduler.add_noise(original_samples=to_model_space(target), noise=noise, timesteps=timesteps)
        with torch.no_grad():
            if static is None:
                head = self._head(reference) if head is None else plain(head).to(reference)
                static = self.conditioner.static_maps(reference, head)
            condition = self.conditioner(reference, noisy, plain(static).to(reference))
        return network(torch.cat([noisy, condition], dim=1), timesteps=timesteps)

    # ---------------------------------------------------------------------------------------------- sampling
    @staticmethod
    def _head(images: torch.Tensor) -> torch.Tensor:
        masks = [head_mask(img[0]) for img in images.detach().cpu().numpy()]
        return torch.from_numpy(np.stack(masks)[:, None].astype(np.float32)).to(images.device)

    def _timesteps(self) -> torch.Tensor:
        self.scheduler.set_timesteps(self.num_inference_steps)
        return self.scheduler.timesteps

    def start(
        self, source: torch.Tensor, timesteps: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first sample and the timesteps to walk: pure noise and all of them."""
        noise = torch.randn(source.shape, generator=generator, dtype=source.dtype, device=source.device)
        return noise, timesteps

    def _step(
        self, output: torch.Tensor, t: torch.Tensor, sample: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        if isinstance(self.scheduler, DDIMScheduler):
            return self.scheduler.step(output, int(t), sample, eta=self.eta, generator=generator)[0]
        if isinstance(self.scheduler, DDPMScheduler):
            return self.scheduler.step(output, int(t), sample, generator=generator)[0]
        return self.scheduler.step(output, int(t), sample)[0]

    def _guide(
        self,
        x0: torch.Tensor,
        source: torch.Tensor,
        head: torch.Tensor,
        project: bool,
        pixel_scale: float = 1.0,
        guide: bool = True,
    ) -> torch.Tensor:
        """Correct the model-space x0 estimate with LMI guidance (when `guide`) and the LMI projection (`project`)."""
        if guide and self.guidance_scale > 0:
            with torch.enable_grad():
                estimate = from_model_space(x0).detach().requires_grad_(True)
                energy = self.conditioner.lmi(source, estimate)[0].sum()
                (gradient,) = torch.autograd.grad(energy, estimate)
            # Normalised ascent step: `guidance_scale` is the largest intensity change (in [0, 1] units) per step,
            # whatever the LMI gradient's magnitude (which grows with the number of windows a pixel belongs to).
            peak = gradient.flatten(1).abs().amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
            x0 = x0 + 2.0 * self.guidance_scale * gradient / peak
        if project and self.projection is not None and self.projection_strength > 0:
            projected = to_model_space(self.projection(from_model_space(x0), source, head, pixel_scale))
            x0 = torch.lerp(x0, projected, self.projection_strength)
        return x0.clamp(-1.0, 1.0)

    @torch.no_grad()
    def sample(  # type: ignore[override]
        self, inputs: torch.Tensor, network: torch.nn.Module, head: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Translate a (B, 1, H, W) batch of [0, 1] source images; returns [0, 1] images with the input's meta.

        With ``num_samples`` > 1 each image is sampled that many times in one batch (different noise) and the mean
        is returned; the per-pixel standard deviation of the samples is kept in ``last_std``.
        """
        validate_source(inputs)
        if self.num_samples == 1:
            self.last_std = None  # one sample: no spread to report
            return self._sample_once(inputs, network, head)
        count, batch = self.num_samples, inputs.shape[0]
        repeated = plain(inputs).repeat_interleave(count, 0)
        heads = None if head is None else plain(head).repeat_interleave(count, 0)
        mirrored = (torch.arange(count * batch) % count % 2 == 1) if self.mirror_samples else None
        axis = 2 + self.mirror_axis  # (B, C, spatial...)
        if mirrored is not None:
            repeated[mirrored] = repeated[mirrored].flip(axis)
            if heads is not None:
                heads[mirrored] = heads[mirrored].flip(axis)
        samples = plain(self._sample_once(repeated, network, heads))
        if mirrored is not None:
            samples[mirrored] = samples[mirrored].flip(axis)
        samples = samples.view(batch, count, *inputs.shape[1:])
        self.last_std = samples.std(1)
        return convert_to_dst_type(samples.mean(1), dst=inputs)[0]

    @torch.no_grad()
    def _sample_once(
        self, inputs: torch.Tensor, network: torch.nn.Module, head: torch.Tensor | None = None
    ) -> torch.Tensor:
        source_full = plain(inputs).float().clamp(0.0, 1.0)
        head_full = self._head(source_full) if head is None else plain(head).to(source_full)
        full_size = tuple(source_full.shape[2:])
        size = self.model_size or full_size
        resize = size != full_size
        source = F.interpolate(source_full, size=size, mode="area") if resize else source_full
        head_model = (F.interpolate(head_full, size=size, mode="area") > 0.5).to(source) if resize else head_full

        generator = torch.Generator(device=source.device).manual_seed(self.seed)
        sample, timesteps = self.start(source, self._timesteps(), generator)
        walked = timesteps[timesteps >= self.stop_timestep]
        timesteps = walked if walked.numel() else timesteps[:1]  # at least the first step
        static = self.conditioner.static_maps(source, head_model)
        x0 = sample
        condition = None
        steps = tqdm(timesteps, desc="translate", leave=False) if self.progress else timesteps
        for index, t in enumerate(steps):
            if condition is None or index % self.recompute_every == 0:
                condition = self.conditioner(source, sample, static)
            t_batch = torch.full((source.shape[0],), int(t), device=source.device, dtype=torch.long)
            output = network(torch.cat([sample, condition], dim=1), timesteps=t_batch)
            last = index == len(timesteps) - 1
            project = int(t) < self.projection_start or last
            x0_net = x0_from_model_output(self.scheduler, output, sample, t_batch)
            guide = index % self.guidance_every == 0
            x0 = self._guide(x0_net, source, head_model, project, full_size[0] / size[0], guide)
            output = model_output_from_x0(self.scheduler, x0, sample, t_batch)
            sample = self._step(output, t, sample, generator)

        result = from_model_space(x0)
        if resize:
            result = F.interpolate(result, size=full_size, mode="bilinear", align_corners=False)
            if self.projection is not None and self.projection_strength > 0:
                projected = self.projection(result, source_full, head_full)
                result = torch.lerp(result, projected, self.projection_strength)
        result = result.clamp(0.0, 1.0)
        if self.output_gamma != 1.0:
            result = result**self.output_gamma
        if self.mask_background:
            result = result * head_full
        return convert_to_dst_type(result, dst=inputs)[0]


class SDEditInferer(LMIGuidedInferer):
    """SDEdit: noise the source itself to `start_timestep`, then denoise with the same target-only model.

    No guidance or projection by default (the baseline as published); the conditioning channels are the same as the
    LMI-guided inferer's because the network needs them, so the comparison isolates the starting point.
    """

    def __init__(self, scheduler: Scheduler, conditioner: LMIConditioner, start_timestep: int = 500, **kwargs) -> None:
        kwargs.setdefault("guidance_scale", 0.0)
        kwargs.setdefault("projection", None)
        kwargs.setdefault("output_gamma", 1.0)
        super().__init__(scheduler=scheduler, conditioner=conditioner, **kwargs)
        if not 0 < start_timestep < scheduler.num_train_timesteps:
            raise ValueError(f"start_timestep must be in (0, {scheduler.num_train_timesteps}), got {start_timestep}.")
        self.start_timestep = int(start_timestep)

    @property
    def method_names(self) -> tuple[str, ...]:
        return ("sdedit",)

    def start(
        self, source: torch.Tensor, timesteps: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        remaining = timesteps[timesteps <= self.start_timestep]
        if remaining.numel() == 0:
            raise ValueError(f"no reverse step at or below start_timestep={self.start_timestep}.")
        noise = torch.randn(source.shape, generator=generator, dtype=source.dtype, device=source.device)
        t0 = remaining[:1].repeat(source.shape[0]).to(source.device)
        return self.scheduler.add_noise(to_model_space(source), noise, t0), remaining


class SamplingInferer(Inferer):
    """Engine adapter: ``inferer(inputs, network)`` returns ``translator.sample(inputs, network)``.

    A ``SupervisedEvaluator`` calls its inferer as ``inferer(inputs, network)``, which for a diffusion inferer is the
    training forward pass; this adapter makes the evaluator translate instead (as the validation during training and
    ``configs/evaluate.json`` need), for any translator with a ``sample`` method.
    """

    def __init__(self, translator: Inferer) -> None:
        super().__init__()
        if not callable(getattr(translator, "sample", None)):
            name = type(translator).__name__
            raise TypeError(f"the translator must have a sample(inputs, network) method, got {name}")
        self.translator = translator

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args, **kwargs) -> torch.Tensor:  # type: ignore[override]
        return self.translator.sample(inputs, network)


class SliceWiseInferer(Inferer):
    """Run a 2D translator on inputs of any in-plane size, 2D slices or 3D volumes.

    A (B, 1, H, W) batch is padded to a square field of view (:func:`scripts.transforms.square_field_of_view`),
    resized to `image_size`, translated, resized back and cropped; a (B, 1, X, Y, Z) volume is cut
    along `slice_axis` into 2D slices, translated `batch_size` slices at a time (all-zero slices stay zero) and stacked
    back into one volume, so the output has the input's shape and meta data (affine included). The sampler restarts
    its seed at every call, so with `batch_size` 1 every slice of a volume gets the same noise sequence, as separate 2D
    inputs do: a slice translates the same alone or in a volume, and neighbouring slices flicker less than with
    independent noise (docs/README.md, "Uncertainty and volumes"). When the translator
    reports the spread of its samples (``last_std``), the same geometry gives ``last_std`` of the output's shape
    (``scripts.lmidiffusion.uncertainty``); otherwise ``last_std`` is None.
    """

    def __init__(
        self,
        translator: LMIGuidedInferer,
        image_size: Sequence[int] = (128, 128),
        slice_axis: int = -1,
        batch_size: int = 1,
        progress: bool = True,
    ) -> None:
        super().__init__()
        self.translator = translator
        self.image_size = tuple(image_size)
        self.slice_axis = slice_axis
        self.batch_size = batch_size
        self.progress = progress
        self.last_std: torch.Tensor | None = None

    def _translate_slices(
        self, slices: torch.Tensor, network: torch.nn.Module, spacing: tuple[float, float] = (1.0, 1.0)
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The translated slices and the spread of their samples (None when the translator reports none)."""
        size = tuple(slices.shape[2:])
        square = square_field_of_view(size, spacing)  # keeps the aspect ratio of a non-square slice
        before = [(p - n) // 2 for p, n in zip(square, size, strict=True)]
        if square != size:
            slices = F.pad(
                slices, (before[1], square[1] - size[1] - before[1], before[0], square[0] - size[0] - before[0])
            )
        resized = F.interpolate(slices, size=self.image_size, mode="area") if square != self.image_size else slices
        translated = torch.as_tensor(self.translator.sample(resized, network))
        spread = getattr(self.translator, "last_std", None)
        spread = None if spread is None else torch.as_tensor(spread).float()
        if square != self.image_size:
            translated = F.interpolate(translated, size=square, mode="bilinear", align_corners=False).clamp(0.0, 1.0)
            if spread is not None:
                spread = F.interpolate(spread, size=square, mode="bilinear", align_corners=False).clamp(min=0.0)

        def crop(image: torch.Tensor) -> torch.Tensor:
            return image[..., before[0] : before[0] + size[0], before[1] : before[1] + size[1]]

        return crop(translated), None if spread is None else crop(spread)

    @torch.no_grad()
    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args, **kwargs) -> torch.Tensor:  # type: ignore[override]
        if inputs.ndim == 4:
            validate_source(inputs)
            spacing = in_plane_spacing(inputs, (0, 1))
            translated, self.last_std = self._translate_slices(torch.as_tensor(inputs).float(), network, spacing)
            return convert_to_dst_type(translated, inputs)[0]
        if inputs.ndim != 5 or inputs.shape[1] != 1:
            raise ValueError(f"expected (B, 1, H, W) slices or (B, 1, X, Y, Z) volumes, got {tuple(inputs.shape)}.")
        axis = self.slice_axis % 3 + 2
        spacing = in_plane_spacing(inputs, tuple(a for a in range(3) if a != axis - 2))
        volumes = torch.as_tensor(inputs).float()
        output = torch.zeros_like(volumes)
        spreads: torch.Tensor | None = torch.zeros_like(volumes)
        for b in range(volumes.shape[0]):
            slices = volumes[b].movedim(axis - 1, 0)  # (D, 1, H, W)
            keep = (slices.flatten(1).abs().amax(1) > 0).nonzero().flatten()
            if keep.numel() == 0:
                raise ValueError(f"volume {b} of the batch is all zero: nothing to translate.")
            result, spread = torch.zeros_like(slices), torch.zeros_like(slices)
            chunks = list(keep.split(self.batch_size))
            for chunk in tqdm(chunks, desc="slices", disable=not self.progress, leave=False):
                result[chunk], chunk_spread = self._translate_slices(slices[chunk], network, spacing)
                if chunk_spread is None:
                    spreads = None
                else:
                    spread[chunk] = chunk_spread
            output[b] = result.movedim(0, axis - 1)
            if spreads is not None:
                spreads[b] = spread.movedim(0, axis - 1)
        self.last_std = spreads
        return convert_to_dst_type(output, inputs)[0]
