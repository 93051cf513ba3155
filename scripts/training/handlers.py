"""Trainer handlers of the campaign: its wall clock and log, gradient clipping and the learning-rate schedule."""

from __future__ import annotations

import csv
import io
import itertools
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents

from scripts.io import write_text_atomic
from scripts.training.campaign import is_writer

logger = logging.getLogger(__name__)


class WallClock:
    """Training wall time that survives resumes: put it in the checkpoint dict and it is saved and restored with
    the trainer, so the campaign log's wall time sums every run, including the time after the last validation.
    `offset` counts runs before the clock existed (a checkpoint that holds a clock replaces it)."""

    def __init__(self, offset: float = 0.0) -> None:
        if offset < 0:
            raise ValueError(f"the wall-clock offset must be >= 0 seconds, got {offset}.")
        self.offset = float(offset)
        self.started = time.monotonic()

    def seconds(self) -> float:
        return self.offset + time.monotonic() - self.started

    def state_dict(self) -> dict:
        return {"wall_s": torch.tensor(self.seconds(), dtype=torch.float64)}

    def load_state_dict(self, state: dict) -> None:
        self.offset = float(state["wall_s"])
        self.started = time.monotonic()


def write_log_rows(path: str | os.PathLike, rows: list[dict]) -> None:
    """Write a campaign log's rows atomically as CSV, with every column any row has (a kill never leaves half a row)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, text.getvalue())


class TrainingLog:
    """Validation handler: append one CSV row per validation to `path` (the training campaign's log).

    Columns: ``iteration`` (optimizer steps so far), ``epoch``, ``wall_s`` (training wall time summed over every
    run of the campaign, resumes included), ``images_seen``, each validation metric and ``validation`` (what the
    metrics were measured on, so that a campaign that changes its validation set stays readable). The file is rewritten
    atomically, so a kill never leaves half a row.
    """

    def __init__(
        self, path: str | os.PathLike, trainer: Engine, validation: str = "", clock: WallClock | None = None
    ) -> None:
        self.path = Path(path)
        self.trainer = trainer
        self.validation = validation
        self.clock = clock
        self.offset = self._last_wall_time()
        self.started = time.monotonic()

    def wall_seconds(self) -> float:
        """The campaign's wall time: the checkpointed clock when it was restored, else the log's last row plus
        this run's time (a run resumed from a checkpoint without a clock)."""
        if self.clock is None:
            return self.offset + time.monotonic() - self.started
        if self.clock.offset == 0 and self.offset > 0:  # resumed from a checkpoint saved before the clock existed
            self.clock.offset = self.offset
        return self.clock.seconds()

    def _rows(self) -> list[dict]:
        if not self.path.is_file():
            return []
        with open(self.path, newline="") as handle:
            return list(csv.DictReader(handle))

    def _last_wall_time(self) -> float:
        rows = self._rows()
        return float(rows[-1]["wall_s"]) if rows else 0.0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if not is_writer():
            return
        state = self.trainer.state
        batch_size = getattr(self.trainer.data_loader, "batch_size", None) or 1
        row = {
            "iteration": int(state.iteration),
            "epoch": int(state.epoch),
            "wall_s": round(self.wall_seconds(), 1),
            "images_seen": int(state.iteration) * int(batch_size),
        }
        row.update({k: round(float(v), 5) for k, v in engine.state.metrics.items()})
        if self.validation:
            row["validation"] = self.validation
        rows = [r for r in self._rows() if int(r["iteration"]) < row["iteration"]] + [row]
        write_log_rows(self.path, rows)
        logger.info("training log: %s", ", ".join(f"{k}={v}" for k, v in row.items()))


class ClipGradients:
    """Trainer handler: clip the global gradient norm to `max_norm` between backward and the optimizer step.

    A single bad batch can throw the weights far off (a loss spike), and the EMA model then carries the damage for
    about ``1 / ema_momentum`` steps; clipping bounds what one step can do.
    """

    def __init__(self, network: torch.nn.Module, max_norm: float = 1.0) -> None:
        if max_norm <= 0:
            raise ValueError(f"max_norm must be positive, got {max_norm}.")
        self.network = network
        self.max_norm = float(max_norm)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.max_norm)


class LearningRateSchedule:
    """Trainer handler: set every parameter group's learning rate from the trainer's iteration, before each step.

    The rate is `lr` up to iteration `decay_start`, then falls linearly to `final_lr` over `decay_steps` iterations
    and stays there; `decay_steps` 0 keeps `lr` throughout. Each later `(iteration, rate)` of `milestones` (config
    ``lr_milestones``) continues the schedule linearly from the point before it, so that one config holds a whole
    campaign's schedule, the later stages included. The rate is a function of ``engine.state.iteration``,
    which the checkpoint restores, so a resumed run continues the schedule with no state of its own, and the
    configured schedule wins over the rate stored in the optimizer's checkpoint (a campaign may change it between
    runs).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        lr: float,
        decay_start: int = 0,
        decay_steps: int = 0,
        final_lr: float | None = None,
        milestones: Sequence[Sequence[float]] = (),
    ) -> None:
        if lr <= 0:
            raise ValueError(f"the learning rate must be positive, got {lr}.")
        if decay_start < 0 or decay_steps < 0:
            raise ValueError(f"lr_decay_start and lr_decay_steps must be >= 0, got {decay_start} and {decay_steps}.")
        final_lr = lr if final_lr is None else float(final_lr)
        if not 0 < final_lr <= lr:
            raise ValueError(f"final_learning_rate must be in (0, learning_rate={lr}], got {final_lr}.")
        self.optimizer = optimizer
        start, end = int(decay_start), int(decay_start) + int(decay_steps)
        self.points = [(start, float(lr)), (end, final_lr if decay_steps else float(lr))]  # (iteration, rate)
        rule = (
            "lr_milestones must be [iteration, rate] pairs with positive rates, each iteration after the one before "
            f"(the first after lr_decay_start + lr_decay_steps = {self.points[1][0]})"
        )
        try:
            pairs = [(int(iteration), float(rate)) for iteration, rate in milestones or ()]
        except (TypeError, ValueError):
            raise ValueError(f"{rule}, got {milestones}.") from None
        for iteration, rate in pairs:
            if not iteration > self.points[-1][0] or not rate > 0:
                raise ValueError(f"{rule}, got {[iteration, rate]}.")
            self.points.append((iteration, rate))

    def rate(self, iteration: int) -> float:
        """The learning rate of the step numbered `iteration` (1 for the first step)."""
        for (start, start_lr), (end, end_lr) in itertools.pairwise(self.points):
            if iteration <= start:
                return start_lr
            if iteration <= end:
                return start_lr + (iteration - start) / (end - start) * (end_lr - start_lr)
        return self.points[-1][1]

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        lr = self.rate(engine.state.iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
