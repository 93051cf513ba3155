"""StyleGAN2-ADA training on target (T1w) images only, as a ``monai.engines.Trainer`` so that the bundle's handlers
(checkpoints, resume, stats, TensorBoard) work unchanged (``configs/train_stylegan.json``).

Commands (from the bundle root; both resume from the newest checkpoint in ``models/checkpoints_stylegan/`` and export
the EMA generator's state dict to ``models/stylegan_generator.pt``; costs: ``docs/README.md``, Baselines)::

    # CPU: 64 x 64, batch 8, 300 epochs; one thread (OpenMP barriers slow two threads down on a shared CPU)
    OMP_NUM_THREADS=1 python -m monai.bundle run \\
        --config_file "['configs/inference.json','configs/methods/stylegan.json','configs/train_stylegan.json']"
    # GPU: same config, bigger batch and more epochs
    python -m monai.bundle run --batch_size 32 --train#trainer#max_epochs 2000 --checkpoint_interval 20 \\
        --config_file "['configs/inference.json','configs/methods/stylegan.json','configs/train_stylegan.json']"

Validation (``validate`` in the config): every `val_interval` epochs the EMA generator translates `num_val_slices` PDw
slices of training subjects (``scripts.training.paired_training_slices``; the GAN never sees PDw, and no test subject
is among them) by GAN inversion with `val_steps` steps (fewer than the `stylegan_steps` of the evaluation, to keep
validation cheap), and ``scripts.training.TrainingLog`` appends val_dice / val_ssim / val_psnr with the iteration and
the campaign's wall time to ``models/training_log_stylegan.csv``. The wall clock is saved in the resume state; a resume
state written before it existed starts it at `previous_wall_s` (``--previous_wall_s 3780`` for the shipped 140-epoch
one, its 63 minutes).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from scripts.baselines.gan_trainer import GANTrainer
from scripts.baselines.stylegan.augment import AdaptiveAugment
from scripts.baselines.stylegan.networks import StyleGAN2Discriminator, StyleGAN2Generator
from scripts.tensors import plain, to_model_space

__all__ = ["StyleGAN2Trainer", "ema_copy"]


def ema_copy(network: nn.Module) -> nn.Module:
    """A frozen copy of `network` for the exponential moving average of its weights (eval mode, no gradients)."""
    return copy.deepcopy(network).eval().requires_grad_(False)


class StyleGAN2Trainer(GANTrainer):
    """StyleGAN2-ADA training as a MONAI ``Trainer`` (ignite engine; handlers, checkpoints and resume as usual).

    Each iteration, on a batch of target images in [0, 1] (mapped to [-1, 1]):

    1. discriminator: logistic loss ``softplus(D(A(fake))) + softplus(-D(A(real)))`` with A the ADA augmentation;
       its real logits feed ``augment.observe`` (the r_t heuristic);
    2. lazy R1 on iterations 1, 1 + r1_interval, ...: ``r1_gamma / 2 * |grad_y D(y)|^2 * r1_interval`` at the
       augmented reals y = A(x)
       (the interval factor keeps the effective strength of an every-iteration penalty);
    3. generator: non-saturating ``softplus(-D(A(G(z))))``, with style mixing (two z, random crossover layer) in
       `style_mixing_prob` of the iterations;
    4. EMA of the generator's weights and buffers: ``beta = min(ema_beta, (1 + i) / (10 + i))`` at iteration i.

    The output dict holds floats for StatsHandler / TensorBoardStatsHandler: 'g_loss', 'd_loss', 'r1' (the latest
    penalty, without its gamma factor), 'ada_p', 'ada_rt'.

    Args:
        device: device of the networks.
        max_epochs: epochs to run.
        train_data_loader: batches of dicts with `image_key` -> (B, 1, R, R) images in [0, 1].
        generator: :class:`StyleGAN2Generator`.
        discriminator: :class:`StyleGAN2Discriminator`.
        g_optimizer: optimizer of the generator.
        d_optimizer: optimizer of the discriminator.
        generator_ema: the EMA copy (e.g. :func:`ema_copy`); None disables the EMA.
        augment: :class:`AdaptiveAugment`; None trains without augmentation.
        r1_gamma: R1 weight (0 disables it).
        r1_interval: lazy regularisation interval.
        style_mixing_prob: probability of a style-mixing iteration.
        ema_beta: EMA decay per iteration.
        image_key: key of the images in the batch dict.
        epoch_length, non_blocking, iteration_update, train_handlers: as in ``monai.engines.Trainer``.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: DataLoader,
        generator: StyleGAN2Generator,
        discriminator: StyleGAN2Discriminator,
        g_optimizer: torch.optim.Optimizer,
        d_optimizer: torch.optim.Optimizer,
        generator_ema: nn.Module | None = None,
        augment: AdaptiveAugment | None = None,
        r1_gamma: float = 1.0,
        r1_interval: int = 16,
        style_mixing_prob: float = 0.9,
        ema_beta: float = 0.999,
        image_key: str = "image",
        epoch_length: int | None = None,
        non_blocking: bool = False,
        iteration_update=None,
        train_handlers: Sequence | None = None,
    ) -> None:
        if r1_interval < 1:
            raise ValueError(f"r1_interval must be >= 1, got {r1_interval}.")
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            g_optimizer=g_optimizer,
            d_optimizer=d_optimizer,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            iteration_update=iteration_update,
            train_handlers=train_handlers,
        )
        self.generator = generator
        self.discriminator = discriminator
        self.generator_ema = generator_ema
        self.augment = augment
        self.r1_gamma = float(r1_gamma)
        self.r1_interval = int(r1_interval)
        self.style_mixing_prob = float(style_mixing_prob)
        self.ema_beta = float(ema_beta)
        self.image_key = image_key
        self.last_r1 = 0.0

    def _augment(self, images: torch.Tensor) -> torch.Tensor:
        return images if self.augment is None else self.augment(images)

    def generate(self, batch: int) -> torch.Tensor:
        """Fakes from fresh latents, with style mixing in `style_mixing_prob` of the calls."""
        generator = getattr(self.generator, "module", self.generator)
        device = generator.synthesis.const.device
        w = generator.mapping(torch.randn(batch, generator.latent_dim, device=device))
        ws = w[:, None].repeat(1, generator.num_ws, 1)
        if self.style_mixing_prob > 0 and float(torch.rand(())) < self.style_mixing_prob:
            cutoff = int(torch.randint(1, generator.num_ws, ()))
            ws[:, cutoff:] = generator.mapping(torch.randn(batch, generator.latent_dim, device=device))[:, None]
        return self.generator(None, ws=ws)

    @torch.no_grad()
    def update_ema(self, iteration: int) -> None:
        if self.generator_ema is None:
            return
        beta = min(self.ema_beta, (1.0 + iteration) / (10.0 + iteration))
        source = getattr(self.generator, "module", self.generator)
        for ema, value in zip(self.generator_ema.parameters(), source.parameters(), strict=True):
            ema.lerp_(value.detach(), 1.0 - beta)
        for ema, value in zip(self.generator_ema.buffers(), source.buffers(), strict=True):
            ema.copy_(value)

    def _iteration(self, engine: StyleGAN2Trainer, batchdata) -> dict[str, float]:  # type: ignore[override]
        if batchdata is None:
            raise ValueError("must provide batch data for current iteration.")
        if isinstance(batchdata, dict):
            reals = batchdata[engine.image_key]
        elif isinstance(batchdata, (list, tuple)):
            reals = batchdata[0]
        else:
            reals = batchdata
        reals = to_model_space(plain(reals).to(engine.state.device, non_blocking=engine.non_blocking).float())
        batch = reals.shape[0]
        iteration = engine.state.iteration
        discriminator = engine.discriminator

        # discriminator: logistic loss on augmented fakes and reals
        with torch.no_grad():
            fakes = engine.generate(batch)
        real_logits = discriminator(engine._augment(reals))
        d_loss = F.softplus(discriminator(engine._augment(fakes))).mean() + F.softplus(-real_logits).mean()
        engine.d_optimizer.zero_grad(set_to_none=True)
        d_loss.backward()
        engine.d_optimizer.step()
        if engine.augment is not None:
            engine.augment.observe(real_logits)

        # lazy R1 on the augmented reals (the images D actually sees): the gradient is taken with respect to them,
        # not through the augmentation, because grid_sample has no double backward (a CUDA run failed on it)
        if engine.r1_gamma > 0 and (iteration - 1) % engine.r1_interval == 0:
            with torch.no_grad():
                reals_r1 = engine._augment(reals)
            reals_r1 = reals_r1.detach().requires_grad_(True)
            logits = discriminator(reals_r1)
            (gradient,) = torch.autograd.grad(logits.sum(), reals_r1, create_graph=True)
            penalty = gradient.square().sum(dim=(1, 2, 3)).mean()
            engine.d_optimizer.zero_grad(set_to_none=True)
            (penalty * (engine.r1_gamma / 2) * engine.r1_interval).backward()
            engine.d_optimizer.step()
            engine.last_r1 = float(penalty.detach())

        # generator: non-saturating loss
        with engine.frozen(discriminator):
            g_loss = F.softplus(-discriminator(engine._augment(engine.generate(batch)))).mean()
            engine.g_optimizer.zero_grad(set_to_none=True)
            g_loss.backward()
            engine.g_optimizer.step()
        engine.update_ema(iteration)

        return {
            "g_loss": float(g_loss.detach()),
            "d_loss": float(d_loss.detach()),
            "r1": engine.last_r1,
            "ada_p": engine.augment.probability if engine.augment is not None else 0.0,
            "ada_rt": float(engine.augment.r_t) if engine.augment is not None else 0.0,
        }
