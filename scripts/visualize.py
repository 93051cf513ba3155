"""Figures a person looks at: source | translated | target rows (written when an inference run completes) and the
training campaign's validation curve."""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from ignite.engine import Engine, Events  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from monai.data import MetaTensor  # noqa: E402

from scripts.io import write_bytes_atomic  # noqa: E402

logger = logging.getLogger(__name__)

__all__ = ["TranslationFigure", "middle_slice", "read_training_log", "save_rows", "save_training_curve"]


def middle_slice(array: np.ndarray) -> np.ndarray:
    """A 2D view: the array itself, or the middle slice of the last axis of a volume."""
    array = np.squeeze(np.asarray(array, dtype=np.float32))
    return array if array.ndim == 2 else array[..., array.shape[-1] // 2]


def _unit(array: np.ndarray) -> np.ndarray:
    top = float(np.percentile(array, 99.5)) if array.size else 1.0
    return np.clip(array / max(top, 1e-8), 0.0, 1.0)


def _save_figure(fig: plt.Figure, path: str | os.PathLike, title: str = "", bottom: float = 0.0) -> None:
    """Title, lay out (keeping the lowest `bottom` fraction free, e.g. for a figure legend) and write `fig` as a PNG
    through a temporary file renamed into place, then close it."""
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0.0, bottom, 1.0, 1.0))
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=110)
    finally:
        plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())


def save_rows(rows: list[dict[str, np.ndarray]], path: str | os.PathLike, title: str = "") -> None:
    """One row per case, one column per named image (display: each image scaled by its 99.5th percentile)."""
    if not rows:
        raise ValueError("no rows to draw.")
    columns = list(rows[0])
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(2.4 * len(columns), 2.4 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        for c, name in enumerate(columns):
            ax = axes[r][c]
            image = row.get(name)
            if image is not None:
                ax.imshow(np.rot90(_unit(image)), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            if r == 0:
                ax.set_title(name, fontsize=9)
            ax.axis("off")
    _save_figure(fig, path, title)


class TranslationFigure:
    """Ignite handler: collect up to `max_rows` (source, translated, target) triples and save a PNG at the end."""

    def __init__(self, path: str | os.PathLike, max_rows: int = 4, title: str = "") -> None:
        self.path = Path(path)
        self.max_rows = max_rows
        self.title = title
        self.rows: list[dict[str, np.ndarray]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def collect(self, engine: Engine) -> None:
        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        # The engine's output keeps image/label/pred only; the target path is in the (decollated) batch.
        batch = engine.state.batch
        if isinstance(batch, Mapping):
            targets = batch.get("target") or [None] * len(outputs)
        else:
            targets = [b.get("target") if isinstance(b, Mapping) else None for b in batch]
        for item, target in zip(outputs, targets, strict=False):
            if len(self.rows) >= self.max_rows or not isinstance(item, Mapping):
                continue
            row = {
                "source": middle_slice(torch.as_tensor(item["image"]).cpu().numpy()),
                "translated": middle_slice(torch.as_tensor(item["pred"]).cpu().numpy()),
            }
            if isinstance(target, str) and Path(target).is_file():
                row["target (not seen)"] = middle_slice(nib.load(target).get_fdata())
            elif isinstance(target, (torch.Tensor, MetaTensor)):
                row["target (not seen)"] = middle_slice(torch.as_tensor(target).cpu().numpy())
            self.rows.append(row)

    def write(self, engine: Engine) -> None:
        if self.rows:
            save_rows(self.rows, self.path, self.title)
            logger.info(f"wrote {self.path}")


def _number_or_text(value: str) -> float | str:
    try:
        return float(value)
    except ValueError:
        return value


def read_training_log(path: str | os.PathLike) -> list[dict[str, float | str]]:
    """The rows of a campaign log written by ``scripts.training.TrainingLog`` (numbers, and the validation set name)."""
    with open(path, newline="") as handle:
        rows = [
            {k: _number_or_text(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(handle)
        ]
    if not rows:
        raise ValueError(f"{path}: the training log has no rows.")
    return rows


def save_training_curve(
    rows: list[dict[str, float]],
    path: str | os.PathLike,
    title: str = "",
    metrics: tuple[str, ...] = (),
    markers: dict[int, str] | None = None,
) -> None:
    """Validation metrics against optimizer steps (bottom axis) and wall-clock hours (top axis), one panel each; a
    dashed line marks each change of validation set (the log's ``validation`` column), whose scores do not compare,
    and a dotted line each of `markers` (step -> label: a change of the recipe, such as the start of a decay)."""
    metrics = metrics or tuple(k for k in rows[0] if k.startswith("val_"))
    changes = [
        row["iteration"]
        for prev, row in zip(rows, rows[1:], strict=False)
        if prev.get("validation") != row.get("validation")
    ]
    steps = np.array([row["iteration"] for row in rows])
    hours = np.array([row["wall_s"] for row in rows]) / 3600.0
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.0), squeeze=False)
    for ax, name in zip(axes[0], metrics, strict=True):
        values = np.array([row.get(name, np.nan) for row in rows])
        ax.plot(steps, values, marker="o", markersize=3)
        for step in changes:
            ax.axvline(step, color="grey", linestyle="--", linewidth=0.8)
        for number, (step, label) in enumerate(sorted((markers or {}).items())):
            ax.axvline(step, color=f"C{number + 1}", linestyle=":", linewidth=1.0, label=label)
        ax.set_xlabel("optimizer steps")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
        top = ax.secondary_xaxis(
            "top", functions=(lambda s: np.interp(s, steps, hours), lambda h: np.interp(h, hours, steps))
        )
        # ticks only where the log has a wall time: the clamped map would stack the ticks before the first row
        ticks = MaxNLocator(6).tick_values(hours.min(), hours.max())
        top.set_xticks(ticks[(ticks >= hours.min()) & (ticks <= hours.max())])
        top.set_xlabel("wall-clock hours", fontsize=8)
    bottom = 0.0
    if markers:  # one legend under the panels, where it cannot hide the curves
        handles, labels = axes[0][0].get_legend_handles_labels()
        columns = min(len(labels), 3)
        fig.legend(handles, labels, loc="lower center", ncol=columns, fontsize=7, frameon=False)
        bottom = 0.02 + 0.045 * -(-len(labels) // columns)
    _save_figure(fig, path, title, bottom=bottom)
