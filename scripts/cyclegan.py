"""CycleGAN baseline (Zhu et al., ICCV 2017): unpaired PDw -> T1w translation trained with 11% of the source data.

The paper compares LMIDiffusion with a CycleGAN that may see a small part (11 %) of the source-modality training data;
this module is that baseline, built from MONAI pieces so it trains and runs through the bundle like the diffusion
model (``configs/train_cyclegan.json``):

- :class:`ResnetGenerator`: the image-to-image generator of Johnson et al. / Zhu et al. (7x7 stem, strided
  downsamplings, ``monai.networks.blocks.ResidualUnit`` bottleneck, transposed-convolution upsamplings, 7x7 head,
  tanh), from ``monai.networks.blocks.Convolution``; MONAI has no such generator in ``monai.networks.nets``.
  :func:`discriminator` is ``monai.networks.nets.PatchDiscriminator`` (a 2D PatchGAN) with instance norm.
- :class:`ImagePool`: the history buffer of 50 generated images the discriminators are updated with (Shrivastava et
  al.), which damps the oscillation of the adversarial game.
- :class:`CycleGANTrainer`: a ``monai.engines.Trainer`` whose iteration is the standard CycleGAN update (LSGAN
  adversarial losses, cycle L1 loss, identity L1 loss, image pools), so the bundle's handlers (checkpoints, resume,
  stats, TensorBoard) work unchanged. Unpaired data: an epoch is one pass over the target (T1w) loader; source (PDw)
  batches come from an endless cycle over the source loader.
- :func:`select_source_subset` / :func:`load_source_subset`: the 11 % of the source training slices, chosen by whole
  subjects from the training subjects only (the datalist's ``source_training`` key), never from a test subject.
- :class:`CycleGANInferer`: ``inferer(source, generator)`` for an evaluator (or the ``translator`` of
  ``scripts.inferers.SliceWiseInferer``): the same input checks and output conventions as the diffusion inferers.

Images are in [0, 1] outside these classes (as everywhere in the bundle) and in [-1, 1] inside the networks.

Size and cost (defaults): generator 8 base channels, 3 downsamplings, 6 residual units at 16 x 16 (0.49 M
parameters); discriminators PatchGAN with 16 channels and 3 layers (0.17 M parameters each); 128 x 128, batch 4. One
training iteration (six generator passes, four discriminator passes, both updates) took 0.67 s on 1 CPU thread
(OMP_NUM_THREADS=1, 2-core CPU shared with other jobs) and 0.75 s through the bundle runner with its handlers; the
7 x 7 stem and head convolutions cost about a third of it (0.56 s with 5 x 5, 0.51 s with 3 x 3: kept at 7 x 7 as in
the paper). An epoch is 165 iterations over the 657 target slices (about 2 minutes), so the default 50 epochs
(8,250 iterations, about 1.7 hours at 0.75 s) fit in under 2 hours on the CPU. Wider generators with 2
downsamplings cost 1.5 s per iteration at 16 base channels and 5.3 s at 32 (with 64-channel discriminators).

Commands (from the bundle root, after ``configs/prepare.json --source labelmaps``)::

    # CPU: the default config (50 epochs); resumes from models/checkpoints_cyclegan/ when a checkpoint is there
    python -m monai.bundle run --config_file configs/train_cyclegan.json

    # GPU (device is cuda when available): the same networks (so models/cyclegan_generator.pt matches the
    # default generator_def), more epochs; a run stopped anywhere continues from its checkpoint
    python -m monai.bundle run --config_file configs/train_cyclegan.json --train#trainer#max_epochs 200

Wider networks (e.g. ``--generator_channels 16 --discriminator_channels 32``) train on a GPU the same way, but then
every config that rebuilds ``generator_def`` needs the same size overrides to load the exported weights.

The generator source -> target is exported to ``models/cyclegan_generator.pt`` after every epoch; rebuild it with
``%configs/train_cyclegan.json#generator_def`` and translate with :class:`CycleGANInferer`.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.engines import Trainer
from monai.engines.utils import default_prepare_batch
from monai.inferers import Inferer
from monai.networks.blocks import Convolution, ResidualUnit
from monai.networks.nets import PatchDiscriminator
from monai.utils import convert_to_dst_type
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from scripts.inferers import plain, validate_source
from scripts.training import spread

logger = logging.getLogger(__name__)

__all__ = [
    "CycleGANInferer",
    "CycleGANTrainer",
    "ImagePool",
    "ResnetGenerator",
    "discriminator",
    "from_model_space",
    "load_source_subset",
    "select_source_subset",
    "to_model_space",
]


def to_model_space(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] images -> the networks' [-1, 1]."""
    return images * 2.0 - 1.0


def from_model_space(images: torch.Tensor) -> torch.Tensor:
    """The networks' [-1, 1] -> [0, 1] images."""
    return (images + 1.0) / 2.0


# ------------------------------------------------------------------------------------------------------- networks
class ResnetGenerator(nn.Module):
    """ResNet-style image-to-image generator (Johnson et al.; the CycleGAN generator) from MONAI blocks.

    reflection pad + 7x7 conv -> `num_downsamplings` x (3x3 conv, stride 2, channels doubled) -> `num_residual_units`
    x ``ResidualUnit`` -> `num_downsamplings` x (3x3 transposed conv, stride 2, channels halved) -> reflection pad +
    7x7 conv -> tanh. Instance norm and ReLU throughout. Inputs of any H x W: they are padded (replicate) to a
    multiple of ``2 ** num_downsamplings`` and the output is cropped back.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        channels: channels of the first (full-resolution) level.
        num_downsamplings: strided downsamplings (and upsamplings).
        num_residual_units: residual units at the coarsest level.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: int = 8,
        num_downsamplings: int = 3,
        num_residual_units: int = 6,
    ) -> None:
        super().__init__()
        if channels < 1 or num_downsamplings < 0 or num_residual_units < 0:
            raise ValueError(
                f"channels must be >= 1 and the numbers of downsamplings/residual units >= 0, got {channels}, "
                f"{num_downsamplings}, {num_residual_units}."
            )
        self.multiple = 2**num_downsamplings
        common = {"spatial_dims": 2, "act": "RELU", "norm": "INSTANCE", "adn_ordering": "NA"}
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            Convolution(in_channels=in_channels, out_channels=channels, kernel_size=7, padding=0, **common),
        ]
        width = channels
        for _ in range(num_downsamplings):
            layers.append(Convolution(in_channels=width, out_channels=width * 2, strides=2, kernel_size=3, **common))
            width *= 2
        for _ in range(num_residual_units):
            layers.append(ResidualUnit(in_channels=width, out_channels=width, subunits=2, **common))
        for _ in range(num_downsamplings):
            layers.append(
                Convolution(
                    in_channels=width,
                    out_channels=width // 2,
                    strides=2,
                    kernel_size=3,
                    is_transposed=True,
                    output_padding=1,
                    **common,
                )
            )
            width //= 2
        layers += [
            nn.ReflectionPad2d(3),
            Convolution(2, width, out_channels, kernel_size=7, padding=0, conv_only=True),
            nn.Tanh(),
        ]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        pad_h, pad_w = (-height) % self.multiple, (-width) % self.multiple
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        return self.model(x)[..., :height, :width]


def discriminator(in_channels: int = 1, channels: int = 16, num_layers: int = 3) -> PatchDiscriminator:
    """MONAI's 2D PatchGAN discriminator with instance norm (as in CycleGAN); its last output is the patch map."""
    return PatchDiscriminator(
        spatial_dims=2, channels=channels, in_channels=in_channels, num_layers_d=num_layers, norm="INSTANCE"
    )


def _patch_scores(network: nn.Module, images: torch.Tensor) -> torch.Tensor:
    out = network(images)
    return out[-1] if isinstance(out, (list, tuple)) else out


# ------------------------------------------------------------------------------------------------------ image pool
class ImagePool:
    """History of generated images (Zhu et al.: 50): the discriminator sees older fakes half of the time.

    While the pool holds fewer than `pool_size` images, every query image is stored and returned; once full, each
    image is, with probability 1/2, swapped with a random stored one (the stored one is returned), else returned as
    is. `pool_size` 0 disables the pool. Images are stored detached.
    """

    def __init__(self, pool_size: int = 50, seed: int = 0) -> None:
        if pool_size < 0:
            raise ValueError(f"pool_size must be >= 0, got {pool_size}.")
        self.pool_size = int(pool_size)
        self.images: list[torch.Tensor] = []
        self.rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.images)

    def query(self, images: torch.Tensor) -> torch.Tensor:
        """A batch of the same shape as `images`, mixing them with stored ones."""
        images = images.detach()
        if self.pool_size == 0:
            return images
        out = []
        for image in images:
            image = image.unsqueeze(0)
            if len(self.images) < self.pool_size:
                self.images.append(image.clone())
                out.append(image)
            elif self.rng.random() < 0.5:
                index = self.rng.randrange(self.pool_size)
                out.append(self.images[index].clone())
                self.images[index] = image.clone()
            else:
                out.append(image)
        return torch.cat(out, dim=0)


# --------------------------------------------------------------------------------------------------------- trainer
def _cycle(loader: Iterable) -> Iterator:
    """Endless iteration over `loader` (a shuffling DataLoader reshuffles at every pass)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("the source data loader is empty.")


class CycleGANTrainer(Trainer):
    """Unpaired CycleGAN training (A = source/PDw, B = target/T1w) as a MONAI ``Trainer``.

    One iteration: a target batch from `train_data_loader` (the epoch) and a source batch from an endless cycle over
    `source_data_loader`; generators update on ``LSGAN(D_B(G_AB(a)), 1) + LSGAN(D_A(G_BA(b)), 1) + lambda_cycle *
    (|G_BA(G_AB(a)) - a| + |G_AB(G_BA(b)) - b|) + lambda_identity * lambda_cycle * (|G_AB(b) - b| + |G_BA(a) - a|)``;
    then the discriminators on ``0.5 * (LSGAN(D(real), 1) + LSGAN(D(pool(fake)), 0))`` each. The output is a dict of
    floats: ``g_loss``, ``adv_loss``, ``cycle_loss``, ``identity_loss``, ``d_loss``, ``d_a_loss``, ``d_b_loss``.

    Args:
        device: where the networks run.
        max_epochs: epochs (passes over the target loader).
        train_data_loader: target (T1w) batches (``image`` key).
        source_data_loader: source (PDw) batches (``image`` key).
        generator_ab: G source -> target (the model the bundle exports).
        generator_ba: G target -> source.
        discriminator_a: D on source images.
        discriminator_b: D on target images.
        g_optimizer: optimizer over both generators' parameters.
        d_optimizer: optimizer over both discriminators' parameters.
        lambda_cycle: weight of the cycle L1 losses (10).
        lambda_identity: identity loss weight relative to `lambda_cycle` (0.5; 0 skips the identity forward passes).
        pool_size: size of each image pool (50).
        seed: seed of the image pools.
        epoch_length: iterations per epoch (default: the target loader's length).
        prepare_batch: as in ``SupervisedTrainer``; the first element of its result is the image batch.
        train_handlers: ignite handlers with ``attach`` (checkpoints, stats, ...).
        optim_set_to_none: ``zero_grad(set_to_none=...)``.
        non_blocking: asynchronous host-to-device copies.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: DataLoader,
        source_data_loader: Iterable,
        generator_ab: nn.Module,
        generator_ba: nn.Module,
        discriminator_a: nn.Module,
        discriminator_b: nn.Module,
        g_optimizer: Optimizer,
        d_optimizer: Optimizer,
        lambda_cycle: float = 10.0,
        lambda_identity: float = 0.5,
        pool_size: int = 50,
        seed: int = 0,
        epoch_length: int | None = None,
        prepare_batch=default_prepare_batch,
        train_handlers: Sequence | None = None,
        optim_set_to_none: bool = False,
        non_blocking: bool = False,
    ) -> None:
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch,
            handlers=train_handlers,
            decollate=False,
        )
        self.source_data_loader = source_data_loader
        self.generator_ab = generator_ab
        self.generator_ba = generator_ba
        self.discriminator_a = discriminator_a
        self.discriminator_b = discriminator_b
        self.g_optimizer = g_optimizer
        self.d_optimizer = d_optimizer
        self.lambda_cycle = float(lambda_cycle)
        self.lambda_identity = float(lambda_identity)
        self.pool_a = ImagePool(pool_size, seed=seed)
        self.pool_b = ImagePool(pool_size, seed=seed + 1)
        self.optim_set_to_none = optim_set_to_none
        self._source_iter: Iterator | None = None

    def _images(self, batchdata) -> torch.Tensor:
        images = self.prepare_batch(batchdata, self.state.device, self.non_blocking, **self.to_kwargs)[0]
        return to_model_space(plain(images).float())

    def _next_source(self):
        if self._source_iter is None:
            self._source_iter = _cycle(self.source_data_loader)
        return next(self._source_iter)

    def _iteration(self, engine: CycleGANTrainer, batchdata) -> dict[str, float]:  # type: ignore[override]
        if batchdata is None:
            raise ValueError("must provide batch data for current iteration.")
        real_b = engine._images(batchdata)
        real_a = engine._images(engine._next_source())
        g_ab, g_ba, d_a, d_b = engine.generator_ab, engine.generator_ba, engine.discriminator_a, engine.discriminator_b
        for network in (g_ab, g_ba, d_a, d_b):
            network.train()

        # generators (the discriminators' gradients are not needed here)
        d_a.requires_grad_(False)
        d_b.requires_grad_(False)
        engine.g_optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        fake_b = g_ab(real_a)
        fake_a = g_ba(real_b)
        cycle_loss = F.l1_loss(g_ba(fake_b), real_a) + F.l1_loss(g_ab(fake_a), real_b)
        adv_loss = _lsgan(_patch_scores(d_b, fake_b), True) + _lsgan(_patch_scores(d_a, fake_a), True)
        g_loss = adv_loss + engine.lambda_cycle * cycle_loss
        identity_loss = torch.zeros((), device=real_b.device)
        if engine.lambda_identity > 0:
            identity_loss = F.l1_loss(g_ab(real_b), real_b) + F.l1_loss(g_ba(real_a), real_a)
            g_loss = g_loss + engine.lambda_identity * engine.lambda_cycle * identity_loss
        g_loss.backward()
        engine.g_optimizer.step()

        # discriminators, on real images and fakes from the history pools
        d_a.requires_grad_(True)
        d_b.requires_grad_(True)
        engine.d_optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        pooled_b = engine.pool_b.query(fake_b)
        pooled_a = engine.pool_a.query(fake_a)
        d_b_loss = 0.5 * (_lsgan(_patch_scores(d_b, real_b), True) + _lsgan(_patch_scores(d_b, pooled_b), False))
        d_a_loss = 0.5 * (_lsgan(_patch_scores(d_a, real_a), True) + _lsgan(_patch_scores(d_a, pooled_a), False))
        (d_a_loss + d_b_loss).backward()
        engine.d_optimizer.step()

        return {
            "g_loss": g_loss.item(),
            "adv_loss": adv_loss.item(),
            "cycle_loss": cycle_loss.item(),
            "identity_loss": identity_loss.item(),
            "d_loss": (d_a_loss + d_b_loss).item(),
            "d_a_loss": d_a_loss.item(),
            "d_b_loss": d_b_loss.item(),
        }


def _lsgan(scores: torch.Tensor, real: bool) -> torch.Tensor:
    """Least-squares GAN loss against the all-real (1) or all-fake (0) target."""
    return F.mse_loss(scores, torch.full_like(scores, 1.0 if real else 0.0))


# ------------------------------------------------------------------------------------------------- source subset
def select_source_subset(datalist_entries: Sequence[dict], fraction: float = 0.11, seed: int = 0) -> list[dict]:
    """``round(fraction * N)`` of the N source training slices, chosen by whole subjects.

    The subjects are taken in a seeded random order until at least that many slices are gathered; the last subject
    contributes only the slices still needed, evenly spread over its slices (not one slab of the head). Entries keep
    their order within a subject. Pass only training subjects' entries (the datalist's ``source_training`` key).
    """
    entries = list(datalist_entries)
    if not entries:
        raise ValueError("no source training entries: the datalist's 'source_training' list is empty.")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
    missing = [i for i, entry in enumerate(entries) if not isinstance(entry, dict) or "subject" not in entry]
    if missing:
        raise ValueError(
            f"source training entries {missing[:5]}{'...' if len(missing) > 5 else ''} have no 'subject' key: "
            "the source subset is chosen by subject (prepare the dataset with configs/prepare.json)."
        )
    count = round(fraction * len(entries))
    if count < 1:
        raise ValueError(f"fraction {fraction} of {len(entries)} source slices selects no slice.")
    by_subject: dict[str, list[dict]] = {}
    for entry in entries:
        by_subject.setdefault(str(entry["subject"]), []).append(entry)
    subjects = sorted(by_subject)
    order = [subjects[i] for i in np.random.default_rng(seed).permutation(len(subjects))]
    chosen: list[dict] = []
    used: list[tuple[str, int]] = []
    for subject in order:
        needed = count - len(chosen)
        if needed <= 0:
            break
        taken = by_subject[subject] if len(by_subject[subject]) <= needed else spread(by_subject[subject], needed)
        chosen += taken
        used.append((subject, len(taken)))
    logger.info(
        f"source subset: {len(chosen)} of {len(entries)} source training slices ({len(chosen) / len(entries):.1%}, "
        f"fraction {fraction}) from subjects {', '.join(f'{s} ({n})' for s, n in used)}"
    )
    return chosen


def load_source_subset(datalist: str | Path, dataset_dir: str | Path, fraction: float = 0.11, seed: int = 0):
    """:func:`select_source_subset` of the datalist's ``source_training`` entries, paths resolved under
    `dataset_dir`; a source entry of a test subject (``subjects.testing`` in the datalist) is an error."""
    from monai.data import load_decathlon_datalist

    with open(datalist) as f:
        content = json.load(f)
    if "source_training" not in content:
        raise ValueError(
            f"datalist {datalist} has no 'source_training' key: the CycleGAN baseline needs the training subjects' "
            "source slices (prepare the dataset with configs/prepare.json)."
        )
    entries = load_decathlon_datalist(datalist, data_list_key="source_training", base_dir=dataset_dir)
    test_subjects = set((content.get("subjects") or {}).get("testing", []))
    leaked = sorted({str(e.get("subject")) for e in entries} & test_subjects)
    if leaked:
        raise ValueError(f"datalist {datalist}: 'source_training' holds slices of test subjects {leaked}.")
    return select_source_subset(entries, fraction=fraction, seed=seed)


# -------------------------------------------------------------------------------------------------------- inferer
class CycleGANInferer(Inferer):
    """Translate (B, 1, H, W) source images in [0, 1] with a trained CycleGAN generator (source -> target).

    The input is checked like every source (``validate_source``), resized to `image_size` (the generator's working
    grid; None keeps the input size) and the result resized back; the output is a ``MetaTensor`` in [0, 1] with the
    input's meta data. Deterministic, no gradients; the network's train/eval mode is restored afterwards.
    """

    def __init__(self, image_size: Sequence[int] | None = None) -> None:
        super().__init__()
        self.image_size = tuple(int(s) for s in image_size) if image_size is not None else None

    @torch.no_grad()
    def translate(self, source: torch.Tensor, network: nn.Module) -> torch.Tensor:
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

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args, **kwargs) -> MetaTensor:  # type: ignore[override]
        validate_source(inputs)
        parameter = next(network.parameters(), None)
        device = parameter.device if parameter is not None else inputs.device
        source = plain(inputs).float().to(device)
        result = convert_to_dst_type(self.translate(source, network), dst=inputs)[0]
        return result if isinstance(result, MetaTensor) else MetaTensor(result)
