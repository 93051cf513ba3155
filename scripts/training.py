"""Training-campaign helpers: resumable checkpoints, the shipped EMA weights, distributed set-up.

A training campaign on a CPU runs for hours over several sessions (docs/method.md, "Training the default
translator"), so a run must be able to stop anywhere and continue later: the SafeCheckpointSaver writes one rolling
full checkpoint (network, EMA network, optimizer, trainer state) and :func:`resume_handlers` loads the newest one
when the config starts. The EMA weights alone are exported as the small inference model (``models/model.pt``).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import time
from pathlib import Path

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents
from monai.handlers import CheckpointLoader

from scripts.io import write_text_atomic, write_torch_atomic

logger = logging.getLogger(__name__)

__all__ = [
    "ClipGradients",
    "ExportWeights",
    "EpochLengthFromData",
    "SafeCheckpointSaver",
    "SetLearningRate",
    "paired_slices",
    "paired_training_slices",
    "slice_sibling",
    "SourceLeakError",
    "TrainingLog",
    "WallClock",
    "distributed_backend",
    "checkpoints",
    "latest_checkpoint",
    "load_weights",
    "resume_handlers",
    "spread",
    "target_only",
    "with_tissue_labels",
]

# File-name tags of source-modality images written by the prepare workflow (and common in user datasets).
SOURCE_TAGS = ("pdw", "_pd", "-pd", "t2w", "_t2", "-t2", "source_", "flair")

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
        logger.info(f"no checkpoint in {directory}: training starts from scratch")
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


class WallClock:
    """Training wall time that survives resumes: put it in the checkpoint dict and it is saved and restored with
    the trainer, so the campaign log's wall time sums every run, including the time after the last validation."""

    def __init__(self) -> None:
        self.offset = 0.0
        self.started = time.monotonic()

    def seconds(self) -> float:
        return self.offset + time.monotonic() - self.started

    def state_dict(self) -> dict:
        return {"wall_s": torch.tensor(self.seconds(), dtype=torch.float64)}

    def load_state_dict(self, state: dict) -> None:
        self.offset = float(state["wall_s"])
        self.started = time.monotonic()


def load_weights(network: torch.nn.Module, path: str | os.PathLike, map_location=None) -> torch.nn.Module:
    """Load a state dict into `network`, with one clear line for a missing, unreadable or mismatched model file."""
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
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"model file {path} holds a {type(state).__name__}, not a state dict of tensors")
    expected = network.state_dict()
    missing = [k for k in expected if k not in state]
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
    network.load_state_dict(state, strict=True)
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
        if not _is_writer():
            return
        network = getattr(self.network, "module", self.network)
        write_torch_atomic(network.state_dict(), self.path)


def distributed_backend() -> str:
    """NCCL on GPUs, gloo on CPUs: the same multi_gpu_train.json runs a 2-process CPU job too."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def spread(items: list, count: int) -> list:
    """`count` items evenly spread over `items` (all of them when there are fewer): a small, fixed monitoring set."""
    if count <= 0 or len(items) <= count:
        return list(items)
    step = len(items) / count
    return [items[int(i * step)] for i in range(count)]


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
        if _is_writer() and self.save_dir.is_dir():
            for path in self.save_dir.glob(".checkpoint_*.tmp"):
                logger.warning(f"removing {path}, left by an interrupted checkpoint save")
                path.unlink(missing_ok=True)

    def __call__(self, engine: Engine) -> None:
        if not _is_writer():
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


def _is_writer() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def slice_sibling(path: str | os.PathLike, kind: str) -> Path | None:
    """The file the prepare workflow wrote beside `path` for another contrast or map of the same slice.

    It names every file of a slice ``<stem>_<kind>.nii.gz`` (kinds ``PDw``, ``T1w``, ``T2w``, ``dseg``, ``mask``);
    None when `path` does not follow that pattern.
    """
    name = str(path)
    if not name.endswith(".nii.gz") or "_" not in Path(name).name:
        return None
    return Path(name.rsplit("_", 1)[0] + f"_{kind}.nii.gz")


def paired_training_slices(datalist: str | os.PathLike, count: int, key: str = "source_training") -> list[dict]:
    """Validation entries from the training subjects' source slices: `count` of them, spread over the list.

    These source images never reach the diffusion training (only the target images of these subjects do), and no
    test subject is among them, so settings can be chosen on them. See :func:`paired_slices` for the entries.
    """
    datalist = Path(datalist).resolve()
    entries = json.loads(datalist.read_text()).get(key, [])
    if not entries:
        raise ValueError(f"{datalist}: no '{key}' entries to validate on.")
    return paired_slices([{**e, "image": str(datalist.parent / e["image"])} for e in entries], count)


def paired_slices(entries: list[dict], count: int) -> list[dict]:
    """`count` of the source slices `entries` (resolved ``image`` paths), spread over the list, each paired with
    its target, labels and mask in the layout of a ``testing`` entry.

    The prepare workflow writes every contrast of a slice side by side (``<stem>_PDw.nii.gz``, ``_T1w``, ``_dseg``,
    ``_mask``).
    """
    paired = []
    for entry in spread(entries, count):
        source = Path(entry["image"])
        if not source.name.endswith("_PDw.nii.gz"):
            raise ValueError(f"{source}: not a source slice written by the prepare workflow (<stem>_PDw.nii.gz).")
        item = {"image": str(source)}
        for name, kind in (("target", "T1w"), ("label", "dseg"), ("mask", "mask")):
            path = slice_sibling(source, kind)
            if not path.is_file():
                raise FileNotFoundError(f"{path}: the {name} of validation slice {source} is missing.")
            item[name] = str(path)
        paired.append(item)
    return paired


def with_tissue_labels(entries: list[dict], key: str = "label") -> list[dict]:
    """Add each target slice's tissue label map under `key` where the prepare workflow wrote one beside it.

    ``<stem>_T1w.nii.gz`` -> ``<stem>_dseg.nii.gz`` (the target anatomy's labels, no source image involved); the
    contrast randomisation puts its knots at those tissues' intensities. Entries without one (e.g. real IXI T1w)
    are returned as they are, and the randomisation falls back to k-means clusters.
    """
    labelled = []
    for entry in entries:
        item = dict(entry)
        image = str(item.get("image", ""))
        if key not in item and image.endswith("_T1w.nii.gz"):
            label = slice_sibling(image, "dseg")
            if label.is_file():
                item[key] = str(label)
        labelled.append(item)
    return labelled


class SourceLeakError(ValueError):
    """A training entry points at a source-modality image: the translator must see target images only."""


def target_only(entries: list[dict], keys: tuple[str, ...] = ("image",)) -> list[dict]:
    """Return `entries` unchanged after checking that no file under `keys` is a source-modality image.

    The zero-shot claim rests on this: the translator's training set holds target (T1w) images only. A datalist
    whose ``training`` key names a PDw, T2w, FLAIR or ``source_*`` file stops training with one line.
    """
    if not entries:
        raise ValueError("the training datalist is empty.")
    for entry in entries:
        for key in keys:
            name = Path(str(entry.get(key, ""))).name.lower()
            if any(tag in name for tag in SOURCE_TAGS):
                raise SourceLeakError(
                    f"training entry {entry.get(key)!r} looks like a source-modality image; the translator is "
                    "trained on target (T1w) images only."
                )
    return entries


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
        if not _is_writer():
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
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
        write_text_atomic(self.path, text.getvalue())
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


class SetLearningRate:
    """Trainer handler: set every parameter group's learning rate to `lr` when a run starts.

    A resumed run loads the optimizer state of its checkpoint, learning rate included; attach this after the
    checkpoint loader so that the configured rate wins (a campaign may lower it between runs).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float) -> None:
        self.optimizer = optimizer
        self.lr = float(lr)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
