"""CycleGAN training (Zhu et al., ICCV 2017) as a ``monai.engines.Trainer``, so that the bundle's handlers
(checkpoints, resume, stats, TensorBoard) work unchanged (``configs/train_cyclegan.json``).

The iteration is the standard CycleGAN update: LSGAN adversarial losses, cycle and identity L1 losses, and image
pools (Shrivastava et al.: a history of 50 generated images the discriminators are updated with, which damps the
oscillation of the adversarial game). Unpaired data: an epoch is one pass over the target (T1w) loader; source (PDw)
batches come from an endless cycle over the source loader.

Commands (from the bundle root, after ``configs/prepare.json --source labelmaps``; costs: ``docs/README.md``,
Baselines)::

    # CPU: the default config (50 epochs); resumes from models/checkpoints_cyclegan/ when a checkpoint is there
    python -m monai.bundle run \
        --config_file "['configs/inference.json','configs/methods/cyclegan.json','configs/train_cyclegan.json']"

    # GPU (device is cuda when available): the same networks (so models/cyclegan_generator.pt matches the
    # network_def of configs/methods/cyclegan.json), more epochs; a run stopped anywhere continues from its checkpoint
    python -m monai.bundle run --train#trainer#max_epochs 200 \
        --config_file "['configs/inference.json','configs/methods/cyclegan.json','configs/train_cyclegan.json']"

Other sizes (e.g. ``--generator_channels 32 --discriminator_channels 32``) train the same way, but then
every config that rebuilds ``network_def`` needs the same size overrides to load the exported weights. The generator
source -> target is exported to ``models/cyclegan_generator.pt`` after every epoch; translate with
``CycleGANInferer``.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.engines.utils import default_prepare_batch
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from scripts.baselines.gan_trainer import GANTrainer
from scripts.tensors import plain, to_model_space

__all__ = ["CycleGANTrainer", "ImagePool"]


def _patch_scores(network: nn.Module, images: torch.Tensor) -> torch.Tensor:
    out = network(images)
    return out[-1] if isinstance(out, (list, tuple)) else out


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

    def state_dict(self) -> dict:
        """The stored images and the random state, so that a resumed campaign continues with the same history (part
        of the CycleGAN resume state; tensors and ints only, as ``torch.load(weights_only=True)`` reads them)."""
        version, state, gauss = self.rng.getstate()
        images = torch.cat(self.images) if self.images else torch.zeros(0)
        return {"images": images, "rng_version": version, "rng_state": torch.tensor(state, dtype=torch.int64),
                "rng_gauss": gauss}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        images = state["images"]
        self.images = [image.unsqueeze(0).clone() for image in images][: self.pool_size] if images.numel() else []
        self.rng.setstate((int(state["rng_version"]), tuple(int(v) for v in state["rng_state"]), state["rng_gauss"]))

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


class CycleGANTrainer(GANTrainer):
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
            train_data_loader=train_data_loader,
            g_optimizer=g_optimizer,
            d_optimizer=d_optimizer,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch,
            train_handlers=train_handlers,
        )
        self.source_data_loader = source_data_loader
        self.generator_ab = generator_ab
        self.generator_ba = generator_ba
        self.discriminator_a = discriminator_a
        self.discriminator_b = discriminator_b
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
        with engine.frozen(d_a, d_b):
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
