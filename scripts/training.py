"""Training-campaign helpers: resumable checkpoints, the shipped EMA weights, distributed set-up.

Training on 2 CPU cores is measured in hours, so a run must be able to stop anywhere and continue later: the
CheckpointSaver writes one rolling full checkpoint (network, EMA network, optimizer, trainer state) and
:func:`resume_handlers` loads the newest one when the config starts. The EMA weights alone are exported as the small
inference model (``models/model.pt``).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader

logger = logging.getLogger(__name__)

__all__ = [
    "ExportWeights",
    "PruneCheckpoints",
    "distributed_backend",
    "latest_checkpoint",
    "load_weights",
    "resume_handlers",
    "spread",
]

_CHECKPOINT = re.compile(r"checkpoint_(?:epoch|iteration)=(\d+)\.pt$")


def latest_checkpoint(directory: str | os.PathLike, prefix: str = "checkpoint") -> str | None:
    """The newest ``<prefix>_epoch=N.pt`` / ``<prefix>_iteration=N.pt`` (or ``<prefix>_final_...``) in `directory`."""
    folder = Path(directory)
    if not folder.is_dir():
        return None
    candidates = []
    for path in folder.glob(f"{prefix}*.pt"):
        match = _CHECKPOINT.search(path.name.replace(prefix, "checkpoint", 1))
        if match:
            candidates.append((int(match.group(1)), path.stat().st_mtime, path))
    if not candidates:
        return None
    return str(max(candidates)[2])


def resume_handlers(directory: str | os.PathLike, load_dict: dict, map_location=None) -> list:
    """A CheckpointLoader for the newest checkpoint in `directory`, or nothing when training starts afresh."""
    path = latest_checkpoint(directory)
    if path is None:
        logger.info(f"no checkpoint in {directory}: training starts from scratch")
        return []
    logger.info(f"resuming from {path}")
    return [CheckpointLoader(load_path=path, load_dict=load_dict, map_location=map_location, strict=True)]


def load_weights(network: torch.nn.Module, path: str | os.PathLike, map_location=None) -> torch.nn.Module:
    """Load a state dict into `network`, with a clear error for a missing or mismatched model file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    try:
        state = torch.load(path, map_location=map_location or "cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file
        raise ValueError(f"cannot read model file {path}: {error}") from error
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        raise ValueError(f"model file {path} does not match the network in the config: {first}") from error
    return network


class ExportWeights:
    """Ignite handler: atomically write `network`'s state dict to `path` every `interval` epochs and at the end."""

    def __init__(self, network: torch.nn.Module, path: str | os.PathLike, interval: int = 1) -> None:
        self.network = network
        self.path = Path(path)
        self.interval = interval

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return
        network = getattr(self.network, "module", self.network)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(self.path.suffix + ".partial")
        torch.save(network.state_dict(), partial)
        os.replace(partial, self.path)


def distributed_backend() -> str:
    """NCCL on GPUs, gloo on CPUs: the same multi_gpu_train.json runs a 2-process CPU job too."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def spread(items: list, count: int) -> list:
    """`count` items evenly spread over `items` (all of them when there are fewer): a small, fixed monitoring set."""
    if count <= 0 or len(items) <= count:
        return list(items)
    step = len(items) / count
    return [items[int(i * step)] for i in range(count)]


class PruneCheckpoints:
    """Ignite handler: keep only the `keep` newest checkpoints in `directory` after each epoch.

    The CheckpointSaver of a resumed run does not know the files of the run before it, so without this the
    directory would gain one full checkpoint per interruption.
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 1) -> None:
        self.directory = Path(directory)
        self.keep = keep

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine | None = None) -> None:
        found = []
        for path in self.directory.glob("*.pt"):
            match = _CHECKPOINT.search(path.name)
            if match:
                found.append((int(match.group(1)), path))
        for _, path in sorted(found)[: -self.keep] if len(found) > self.keep else []:
            path.unlink(missing_ok=True)
