"""A resumable training campaign: the rolling checkpoint, resuming from it, and the exported EMA weights.

A training campaign on a CPU runs for hours over several sessions (docs/method.md, "Training the default
translator"), so a run must be able to stop anywhere and continue later: the SafeCheckpointSaver writes one rolling
full checkpoint (network, EMA network, optimizer, trainer state) and :func:`resume_handlers` loads the newest one
when the config starts. The EMA weights alone are exported as the small inference model (``models/model.pt``).
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

from scripts.io import write_torch_atomic
from scripts.lmidiffusion.networks import deepen_state_dict

logger = logging.getLogger(__name__)


_CHECKPOINT = re.compile(r"checkpoint_(?:epoch|iteration)[=_](\d+)\.pt$")


def checkpoints(directory: str | os.PathLike, prefix: str = "checkpoint") -> list[Path]:
    """The ``<prefix>_epoch_N.pt`` (or ignite's ``<prefix>_epoch=N.pt``) files in `directory`, newest first."""
    folder = Path(directory)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.glob(f"{prefix}*.pt"):
        match = _CHECKPOINT.search(path.name.replace(prefix, "checkpoint", 1))
        if match:
            found.append((int(match.group(1)), path.stat().st_mtime, path))
    return [path for *_, path in sorted(found, reverse=True)]


def latest_checkpoint(directory: str | os.PathLike, prefix: str = "checkpoint") -> str | None:
    """The newest checkpoint in `directory` (see :func:`checkpoints`), or None."""
    found = checkpoints(directory, prefix)
    return str(found[0]) if found else None


def resume_handlers(
    directory: str | os.PathLike, load_dict: dict, map_location=None, max_epochs: int | None = None
) -> list:
    """Handlers that resume from the newest loadable checkpoint in `directory`, or none when training starts afresh.

    A checkpoint that does not load (a kill mid-write on a file system without atomic rename, a foreign file) is
    skipped with a warning in favour of the next older one; when none loads the run stops with one line rather
    than silently starting afresh, which would overwrite the exported weights after one epoch. Objects of
    `load_dict` that the checkpoint does not hold (added to the campaign later, such as the :class:`WallClock`)
    keep their fresh state. A checkpoint past `max_epochs` stops the run with one line, and after loading the
    epoch length follows the data loader, not the checkpoint (other data or batch size).
    """
    found = checkpoints(directory)
    if not found:
        logger.info(f"no checkpoint in {directory}: a new campaign starts")
        return []
    for path in found:
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
            break
        except Exception as error:  # truncated or foreign file
            logger.warning(f"skipping checkpoint {path}: cannot be read ({type(error).__name__})")
    else:
        raise ValueError(
            f"no checkpoint in {directory} can be read; move them away to start afresh (the exported weights "
            "would be overwritten after one epoch)"
        )
    epoch = _stored_epoch(stored.get("trainer") if isinstance(stored, dict) else None)
    if max_epochs is not None and epoch > max_epochs:
        raise ValueError(
            f"checkpoint {path} is at epoch {epoch}, past max_epochs {max_epochs}: set --max_epochs above {epoch} "
            "to continue training"
        )
    missing = sorted(set(load_dict) - set(stored))
    if missing:
        logger.info(f"{path} holds no {missing}: they start fresh")
    logger.info(f"resuming from {path}")
    present = {k: v for k, v in load_dict.items() if k in stored}
    loader = CheckpointLoader(load_path=str(path), load_dict=present, map_location=map_location, strict=True)
    return [loader, EpochLengthFromData()]


def _stored_epoch(trainer_state: dict | None) -> int:
    """The epoch of an ignite trainer state dict, which holds either the epoch or the iteration and epoch length."""
    if not isinstance(trainer_state, dict):
        return 0
    if "epoch" in trainer_state:
        return int(trainer_state["epoch"])
    length = int(trainer_state.get("epoch_length") or 0)
    return int(trainer_state.get("iteration", 0)) // length if length else 0


class EpochLengthFromData:
    """Ignite handler, after the checkpoint loader: an epoch is one pass over today's data loader.

    The trainer state in a checkpoint carries the epoch length of the run that wrote it; resumed with other data or
    another batch size, ignite would keep that length (83 iterations over a loader of 6 batches).
    """

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        try:
            length = len(engine.state.dataloader)
        except TypeError:  # an iterable without a length keeps the stored epoch length
            return
        if engine.state.epoch_length != length:
            logger.warning(f"the data gives {length} iterations per epoch, the checkpoint {engine.state.epoch_length}")
            engine.state.epoch_length = length


def read_state_dict(path: str | os.PathLike, map_location=None, entry: str = "model") -> dict[str, torch.Tensor]:
    """The state dict stored at `path` (or a resume state's `entry`, ``model`` by default), with one clear line for a
    missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    try:
        state = torch.load(path, map_location=map_location or "cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file; torch's own advice (weights_only=False) is unsafe
        raise ValueError(
            f"cannot read model file {path}: not a state dict saved with torch.save ({type(error).__name__}); "
            "give the bundle's weights (models/*.pt)"
        ) from None
    if isinstance(state, dict) and entry in state and isinstance(state[entry], dict):
        state = state[entry]
    elif entry != "model":  # a plain weights file would load one generator's weights into the other
        raise ValueError(f"{path} is not a resume state with a '{entry}' entry; give a checkpoint_epoch_*.pt")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"model file {path} holds a {type(state).__name__}, not a state dict of tensors")
    return state


def load_weights(
    network: torch.nn.Module,
    path: str | os.PathLike,
    map_location=None,
    fresh_modules: tuple[str, ...] = (),
    entry: str = "model",
) -> torch.nn.Module:
    """Load a state dict into `network`, with one clear line for a missing, unreadable or mismatched model file.

    Parameters of the submodules named in `fresh_modules` may be absent from the file; they keep their initial
    values (a head added to a trained network, see :func:`warm_start`). `entry` names the network in a resume state
    that holds several (``generator_ab`` of a CycleGAN checkpoint).
    """
    path = Path(path)
    state = read_state_dict(path, map_location, entry)
    expected = network.state_dict()
    missing = [k for k in expected if k not in state and k.split(".", 1)[0] not in fresh_modules]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        details = "; ".join(
            f"{what} {len(keys)} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatches", shapes))
            if keys
        )
        raise ValueError(f"model file {path} does not match the network in the config: {details}")
    network.load_state_dict(state, strict=not fresh_modules)
    return network


def warm_start(
    network: torch.nn.Module,
    path: str | os.PathLike | None,
    checkpoint_dir: str | os.PathLike,
    fresh_modules: tuple[str, ...] = ("refine",),
    source_num_res_blocks: int | list[int] | None = None,
    entry: str = "model",
) -> torch.nn.Module:
    """Start a new campaign from trained weights at `path` (None: from scratch), unless it is resuming.

    A checkpoint in `checkpoint_dir` wins: the resume handlers load it over these weights, so a warm-started
    campaign resumes like any other. The submodules in `fresh_modules` (a full-resolution head added to a trained
    denoiser) may be missing from the file and start from their initial values. With `source_num_res_blocks`, the
    file holds a shallower denoiser (that many residual blocks per level) and `network` starts as its exact
    deepened copy (``scripts.lmidiffusion.networks.deepen_state_dict``). `entry` picks one network of a resume state
    that holds several (a CycleGAN stage that keeps the generators and starts new discriminators).
    """
    if path is None or checkpoints(checkpoint_dir):
        return network
    source = f"{path}" if entry == "model" else f"{path} ({entry})"
    if source_num_res_blocks is not None:
        state = deepen_state_dict(read_state_dict(path, entry=entry), network, source_num_res_blocks)
        network.load_state_dict(state)
        logger.info(f"warm start from {source}, deepened from {source_num_res_blocks} residual blocks per level")
        return network
    load_weights(network, path, fresh_modules=fresh_modules, entry=entry)
    fresh = f" (parameters of {', '.join(fresh_modules)} it lacks start fresh)" if fresh_modules else ""
    logger.info(f"warm start from {source}{fresh}")
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
        if not is_writer():
            return
        network = getattr(self.network, "module", self.network)
        write_torch_atomic(network.state_dict(), self.path)


def distributed_backend() -> str:
    """NCCL on GPUs, gloo on CPUs: the same multi_gpu_train.json runs a 2-process CPU job too."""
    return "nccl" if torch.cuda.is_available() else "gloo"


class SafeCheckpointSaver:
    """Ignite handler: the rolling resume state, written so that a kill at any moment leaves a loadable checkpoint.

    Every `interval` epochs the state dicts of `save_dict` (DDP modules unwrapped) go to an unpredictable temporary
    file in `save_dir` (fsync), which is renamed to ``checkpoint_epoch_<N>.pt`` and loaded back; only then are older
    checkpoints beyond `keep` deleted, including those of earlier runs, which a fresh saver would not know about.
    Stale temporary files of a killed save are removed when training starts. Only rank 0 writes.
    """

    def __init__(self, save_dir: str | os.PathLike, save_dict: dict, interval: int = 1, keep: int = 1) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.save_dir = Path(save_dir)
        self.save_dict = save_dict
        self.interval = interval
        self.keep = keep

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.remove_stale_temporaries)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)

    def remove_stale_temporaries(self, engine: Engine | None = None) -> None:
        if is_writer() and self.save_dir.is_dir():
            for path in self.save_dir.glob(".checkpoint_*.tmp"):
                logger.warning(f"removing {path}, left by an interrupted checkpoint save")
                path.unlink(missing_ok=True)

    def __call__(self, engine: Engine) -> None:
        if not is_writer():
            return
        state = {}
        for name, obj in self.save_dict.items():
            obj = getattr(obj, "module", obj) if isinstance(obj, torch.nn.parallel.DistributedDataParallel) else obj
            state[name] = obj.state_dict()
        path = self.save_dir / f"checkpoint_epoch_{engine.state.epoch}.pt"
        write_torch_atomic(state, path)
        torch.load(path, map_location="cpu", weights_only=True)  # raises, keeping the older ones, if unreadable
        for old in checkpoints(self.save_dir)[self.keep :]:
            old.unlink(missing_ok=True)


def is_writer() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
