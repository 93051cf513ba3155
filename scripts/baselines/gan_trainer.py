"""The training loop both GAN baselines share, as a MONAI ``Trainer``.

One iteration (a subclass's ``_iteration``) takes a batch, updates the discriminator(s) with `d_optimizer` and the
generator(s) with `g_optimizer`, keeping the networks it does not update frozen (:meth:`GANTrainer.frozen`), and
returns a dict of float losses for ``StatsHandler`` / ``TensorBoardStatsHandler``. Outputs are not decollated (they
are scalars). Checkpoints, resume, validation and progress bars attach as to any ignite engine.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn as nn
from monai.engines import Trainer
from monai.engines.utils import default_prepare_batch
from torch.optim import Optimizer
from torch.utils.data import DataLoader

__all__ = ["GANTrainer"]


class GANTrainer(Trainer):
    """Adversarial training: the optimizers of both sides and the engine settings (see the module docstring).

    Args:
        device, max_epochs, epoch_length, non_blocking, prepare_batch, iteration_update: as in
            ``monai.engines.Trainer``.
        train_data_loader: the batches an epoch walks through.
        g_optimizer: optimizer of the generator(s).
        d_optimizer: optimizer of the discriminator(s).
        train_handlers: ignite handlers with ``attach`` (checkpoints, stats, validation, ...).
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: DataLoader,
        g_optimizer: Optimizer,
        d_optimizer: Optimizer,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_batch=default_prepare_batch,
        iteration_update=None,
        train_handlers: Sequence | None = None,
    ) -> None:
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch,
            iteration_update=iteration_update,
            handlers=train_handlers,
            decollate=False,
        )
        self.g_optimizer = g_optimizer
        self.d_optimizer = d_optimizer

    @staticmethod
    @contextmanager
    def frozen(*networks: nn.Module) -> Iterator[None]:
        """No parameter gradients for `networks` inside the block (the other side's update), restored after it."""
        for network in networks:
            network.requires_grad_(False)
        try:
            yield
        finally:
            for network in networks:
                network.requires_grad_(True)
