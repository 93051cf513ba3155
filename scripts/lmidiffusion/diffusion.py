"""What the denoiser sees, and what it is trained to predict.

The denoiser is a MONAI ``DiffusionModelUNet`` whose input is x_t concatenated with conditioning channels built from a
reference image (:class:`LMIConditioner`). At translation time the reference is the source image. In training it is
either the clean target itself (the paper's recipe: ``[x_t, LMI(ref, x_t), LMI(ref, ref), head]``; LMI is invariant to
a one-to-one remapping of intensities, so T1w maps in training and PDw maps at translation time come from the same
distribution) or a contrast-randomised copy of the target (the default translator: ``[x_t, head, ref]``, see
``scripts.lmidiffusion.contrast``), so that the source is one more contrast of a family the network was trained on.
The head mask is computed the same way from any contrast (``scripts.transforms.head_mask``) and tells the network
where tissue is, which LMI cannot (it is 0 on any flat region, air and white matter alike).

Images live in [0, 1] outside the model and in [-1, 1] inside it (the schedulers clip x0 to [-1, 1]). The method and
the measurements behind these choices: docs/method.md, "Conditioning the denoiser".
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import torch
from monai.config import KeysCollection
from monai.engines.utils import DiffusionPrepareBatch, default_prepare_batch
from monai.networks.schedulers import Scheduler
from monai.transforms import MapTransform
from monai.utils import convert_to_tensor

from scripts.lmidiffusion.lmi import LocalMutualInformation
from scripts.tensors import from_model_space, to_model_space

__all__ = [
    "LMIConditioner",
    "LMIDiffusionPrepareBatch",
    "StaticConditiond",
    "TissueAwareLoss",
    "model_output_from_x0",
    "x0_from_model_output",
]


def _alpha_bar(scheduler: Scheduler, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    alphas = scheduler.alphas_cumprod.to(like.device, like.dtype)[timesteps.long()]
    return alphas.reshape(-1, *([1] * (like.ndim - 1)))


def x0_from_model_output(
    scheduler: Scheduler, output: torch.Tensor, sample: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """The clean-image estimate implied by the network output for the scheduler's prediction type."""
    alpha = _alpha_bar(scheduler, timesteps, sample)
    if scheduler.prediction_type == "epsilon":
        return (sample - (1 - alpha).sqrt() * output) / alpha.sqrt()
    if scheduler.prediction_type == "sample":
        return output
    return alpha.sqrt() * sample - (1 - alpha).sqrt() * output  # v_prediction


def model_output_from_x0(
    scheduler: Scheduler, x0: torch.Tensor, sample: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """Inverse of :func:`x0_from_model_output`: lets a corrected x0 go through ``scheduler.step`` unchanged."""
    alpha = _alpha_bar(scheduler, timesteps, sample)
    if scheduler.prediction_type == "sample":
        return x0
    epsilon = (sample - alpha.sqrt() * x0) / (1 - alpha).sqrt().clamp_min(1e-8)
    if scheduler.prediction_type == "epsilon":
        return epsilon
    return alpha.sqrt() * epsilon - (1 - alpha).sqrt() * x0  # v_prediction


class LMIConditioner(torch.nn.Module):
    """Builds the extra input channels of the denoiser from a reference image and the noisy sample.

    Channels, in order: ``LMI(ref, x_t)`` (`use_dynamic_lmi`), ``LMI(ref, ref)`` (`use_self_lmi`), the head mask
    (`use_head_mask`) and the reference itself (`use_reference`). The paper's recipe uses the first three; the default
    translator, trained on contrast-randomised references, sees the reference and the head mask: each LMI channel
    would cost one LMI evaluation of the batch per training step, and the reference carries everything the maps are
    computed from (LMI guidance at sampling time stays available in ``scripts.lmidiffusion.inferers.LMIGuidedInferer``).

    Args:
        num_bins, patch_size, search_size, sigma: the LMI layer's parameters (docs/method.md, "Local mutual
            information").
        use_head_mask, use_reference, use_self_lmi, use_dynamic_lmi: which channels to build (at least one).
    """

    def __init__(
        self,
        num_bins: int = 12,
        patch_size: int = 3,
        search_size: int = 3,
        sigma: float = 0.07,
        use_head_mask: bool = True,
        use_reference: bool = False,
        use_self_lmi: bool = True,
        use_dynamic_lmi: bool = True,
    ) -> None:
        super().__init__()
        self.lmi = LocalMutualInformation(
            patch_size=patch_size, search_size=search_size, num_bins=num_bins, sigma=sigma
        )
        self.use_head_mask = bool(use_head_mask)
        self.use_reference = bool(use_reference)
        self.use_self_lmi = bool(use_self_lmi)
        self.use_dynamic_lmi = bool(use_dynamic_lmi)
        if self.num_channels == 0:
            raise ValueError("LMIConditioner needs at least one conditioning channel.")

    @property
    def num_channels(self) -> int:
        return self.use_dynamic_lmi + self.num_static_channels

    @property
    def num_static_channels(self) -> int:
        return self.use_self_lmi + self.use_head_mask + self.use_reference

    def static_maps(self, reference: torch.Tensor, head: torch.Tensor | None) -> torch.Tensor:
        """The channels that depend on the reference only: computed once per image, reused at every step."""
        maps = []
        if self.use_self_lmi:
            maps.append(self.lmi(reference, reference)[0])
        if self.use_head_mask:
            if head is None:
                raise ValueError("LMIConditioner was built with use_head_mask=True but no head mask was given.")
            maps.append(head.to(reference))
        if self.use_reference:
            maps.append(reference)
        if not maps:
            return reference.new_zeros((reference.shape[0], 0, *reference.shape[2:]))
        return torch.cat(maps, dim=1)

    def forward(self, reference: torch.Tensor, sample: torch.Tensor, static: torch.Tensor) -> torch.Tensor:
        """Conditioning for the model-space `sample` x_t, given `reference` in [0, 1] and its static maps."""
        if not self.use_dynamic_lmi:
            return static
        with torch.no_grad():
            dynamic, _ = self.lmi(reference, from_model_space(sample))
        return torch.cat([dynamic, static], dim=1)


class StaticConditiond(MapTransform):
    """Precompute the reference-only conditioning channels of `keys` (``[LMI(x, x), head]``) under `output_key`.

    In training the reference is the clean image itself, so these channels never change: computing them once in a
    ``CacheDataset`` instead of at every step halves the LMI cost of a training step. Spatial augmentations that run
    after it must transform `output_key` with the image.
    """

    def __init__(
        self, keys: KeysCollection, conditioner: LMIConditioner, head_key: str = "head", output_key: str = "static"
    ) -> None:
        super().__init__(keys)
        self.conditioner = conditioner
        self.head_key = head_key
        self.output_key = output_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = torch.as_tensor(d[key]).float()[None]
            head = torch.as_tensor(d[self.head_key]).float()[None] if self.head_key in d else None
            with torch.no_grad():
                d[self.output_key] = self.conditioner.static_maps(image, head)[0]
        return d


class LMIDiffusionPrepareBatch(DiffusionPrepareBatch):
    """``prepare_batch`` for ``SupervisedTrainer``: noise, timesteps and the regression target.

    The target follows the scheduler's ``prediction_type`` (epsilon, sample or v_prediction) in model space; the head
    mask under ``head_key``, precomputed static maps under ``static_key`` (see :class:`StaticConditiond`) and a
    contrast-randomised reference under ``reference_key`` (``contrast``) are handed to the inferer when the
    batch has them; the inferer builds the conditioning from them and the noisy sample.

    ``high_noise_fraction`` of the timesteps are drawn from ``[high_noise_start, T)`` instead of ``[0, T)``: at high
    noise the denoiser must infer tissue intensities from the LMI maps and the head mask alone, which is what a
    zero-shot translation needs most and what a short (CPU) training budget learns last.

    With ``label_key``, the target's tissue label map (of the *target* image, never of a source) rides along as one
    more target channel after the regression target, for :class:`TissueAwareLoss`; a batch without it is refused.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        head_key: str = "head",
        static_key: str = "static",
        reference_key: str = "reference",
        high_noise_fraction: float = 0.0,
        high_noise_start: int = 500,
        label_key: str | None = None,
    ) -> None:
        super().__init__(num_train_timesteps=scheduler.num_train_timesteps)
        if not 0.0 <= high_noise_fraction <= 1.0:
            raise ValueError(f"high_noise_fraction must be in [0, 1], got {high_noise_fraction}.")
        if not 0 <= high_noise_start < scheduler.num_train_timesteps:
            raise ValueError(
                f"high_noise_start must be in [0, {scheduler.num_train_timesteps}), got {high_noise_start}."
            )
        self.scheduler = scheduler
        self.head_key = head_key
        self.static_key = static_key
        self.reference_key = reference_key
        self.high_noise_fraction = high_noise_fraction
        self.high_noise_start = high_noise_start
        self.label_key = label_key

    def get_timesteps(self, images: torch.Tensor) -> torch.Tensor:
        timesteps = super().get_timesteps(images)
        if self.high_noise_fraction > 0:
            high = torch.randint_like(timesteps, self.high_noise_start, self.num_train_timesteps)
            pick = torch.rand(timesteps.shape, device=timesteps.device) < self.high_noise_fraction
            timesteps = torch.where(pick, high, timesteps)
        return timesteps

    def get_target(self, images: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        x0 = to_model_space(images)
        if self.scheduler.prediction_type == "epsilon":
            return noise
        if self.scheduler.prediction_type == "sample":
            return x0
        return self.scheduler.get_velocity(x0, noise, timesteps)

    def __call__(
        self,
        batchdata: Mapping[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
        images, _ = default_prepare_batch(batchdata, device, non_blocking, **kwargs)
        # plain tensors: a MetaTensor sends every op of the UNet through Python meta handling, which slows the CPU
        # training step several times and binds the GPU step (docs/method.md, "Implementation measurements")
        images = convert_to_tensor(images, track_meta=False)
        noise = self.get_noise(images)
        timesteps = self.get_timesteps(images)
        target = self.get_target(images, noise, timesteps)
        if self.label_key is not None:
            if self.label_key not in batchdata:
                raise ValueError(
                    f"the tissue-aware loss needs the target's label map under '{self.label_key}', but the batch has "
                    f"only {sorted(batchdata)}: prepare the data with label maps or set the tissue loss weight to 0."
                )
            labels = convert_to_tensor(batchdata[self.label_key], track_meta=False).to(device, target.dtype)
            target = torch.cat([target, labels], dim=1)
        infer_kwargs = {"noise": noise, "timesteps": timesteps}
        for name, key in (("head", self.head_key), ("static", self.static_key), ("reference", self.reference_key)):
            if key in batchdata:
                value = convert_to_tensor(batchdata[key], track_meta=False)
                infer_kwargs[name] = value.to(device, non_blocking=non_blocking)
        return images, target, (), infer_kwargs


class TissueAwareLoss(torch.nn.Module):
    """MSE on the regression target plus a tissue term that keeps the predicted x0 on the right side of the
    segmenter's boundaries.

    MSE alone is paid by the grey/white-matter *mean*, which lies right on the K-means GM/WM boundary of the target
    segmenter, so small errors flip tissue classes. The tissue term is the cross-entropy of
    ``softmax(-(y - c_k)^2 / temperature)`` over the target segmenter's centres ``c_k`` (CSF, GM, WM) against the
    target slice's own labels (1-3; 0, outside the brain, is ignored), where ``y`` is the predicted x0 in [0, 1].
    Only target-side information is used: the training T1w, its labels and the T1w segmenter. The target is
    ``[regression target, labels]`` along channels (:class:`LMIDiffusionPrepareBatch` with ``label_key``); the
    prediction must be x0 ("sample" prediction type). With ``weight`` 0 it is plain MSE and reads no labels.
    """

    def __init__(self, centres: list[float], weight: float = 0.02, temperature: float = 0.01) -> None:
        super().__init__()
        if weight < 0 or temperature <= 0:
            raise ValueError(f"TissueAwareLoss needs weight >= 0 and temperature > 0, got {weight} and {temperature}.")
        centres = [float(c) for c in centres]
        if len(centres) != 3:
            raise ValueError(f"TissueAwareLoss needs the 3 tissue centres (CSF, GM, WM), got {centres}.")
        self.register_buffer("centres", torch.tensor(centres).reshape(1, -1, 1, 1), persistent=False)
        self.weight = float(weight)
        self.temperature = float(temperature)

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        channels = prediction.shape[1]
        mse = torch.nn.functional.mse_loss(prediction, target[:, :channels])
        if self.weight == 0:
            return mse
        if target.shape[1] != channels + 1:
            raise ValueError(
                f"TissueAwareLoss expects the target as [regression target, labels] ({channels + 1} channels), got "
                f"{target.shape[1]}."
            )
        labels = target[:, channels].round().long()
        brain = labels > 0
        if not brain.any():
            return mse
        y = from_model_space(prediction[:, :1])
        logits = -((y - self.centres.to(y)) ** 2) / self.temperature
        cross_entropy = torch.nn.functional.cross_entropy(logits, (labels - 1).clamp_min(0), reduction="none")
        return mse + self.weight * cross_entropy[brain].mean()
