"""The up-front check of an evaluation datalist: a bad entry fails with one line naming it, before anything is
written."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from scripts.io import InputError
from scripts.training import spread

logger = logging.getLogger(__name__)


EVALUATION_KEYS = ("image", "target", "label", "mask")


NUM_TISSUE_LABELS = 3  # CSF, GM, WM; 0 is background


def _read(path: Path, entry_name: str, key: str) -> nib.Nifti1Image:
    if not path.is_file():
        raise InputError(f"{entry_name}: '{key}' file not found: {path}")
    try:
        return nib.load(str(path))
    except Exception as error:  # nibabel raises several types for unreadable files
        raise InputError(f"{entry_name}: '{key}' file {path} is not a readable NIfTI image ({error})") from None


def _check_content(item: dict, keys: list[str], source_key: str, name: str) -> None:
    """Refuse images that would crash the run or be scored silently into the means: a non-finite or blank source
    or target, a blank mask."""
    for key in keys:
        if key == "label":
            continue
        data = np.asarray(nib.load(item[key]).dataobj, dtype=np.float32)
        if not np.isfinite(data).all():
            raise InputError(f"{name}: '{key}' file {item[key]} contains NaN or Inf values.")
        if not np.any(data):
            what = "mask is empty (no head)" if key == "mask" else "image is all zero"
            raise InputError(f"{name}: '{key}' file {item[key]}: {what}; remove the entry or fix the file.")


def load_evaluation_datalist(
    datalist: str | os.PathLike,
    dataset_dir: str | os.PathLike | None = None,
    data_list_key: str = "testing",
    num_slices: int | None = None,
    required_keys: Sequence[str] = EVALUATION_KEYS,
    source_key: str = "image",
) -> list[dict]:
    """The datalist's `data_list_key` entries with paths resolved under `dataset_dir`, checked before any work.

    `source_key` names the entry key holding the image to translate (``"image"``, the PDw slice, by default; e.g.
    ``"t2"`` for the T2w slice of the same entry). Its file is returned under ``"image"``, the key the evaluator
    reads, and the entry's own ``"image"`` (if any) under ``"source_image"``; ``"source_key"`` records the choice.
    Every entry must have `required_keys` (with ``"image"`` standing for `source_key`); every file must exist and be
    a readable NIfTI image of the same shape as the entry's source image; label maps must hold tissue labels 0-3
    only. `num_slices` keeps that many entries spread evenly over the list (the quick mode); None keeps all. Errors
    name the entry and the file.
    """
    if not isinstance(source_key, str) or not source_key:
        raise InputError(f"source_key must be the name of a datalist key (e.g. 'image' or 't2'), got {source_key!r}.")
    keys = [source_key if key == "image" else key for key in required_keys]
    if source_key not in keys:
        keys.insert(0, source_key)
    path = Path(datalist)
    if not path.is_file():
        raise InputError(f"evaluation datalist not found: {path}")
    try:
        content = json.loads(path.read_text())
    except ValueError as error:
        raise InputError(f"evaluation datalist {path} is not valid JSON ({error})") from None
    entries = content.get(data_list_key) if isinstance(content, dict) else None
    if not entries:
        raise InputError(f"evaluation datalist {path} has no '{data_list_key}' entries.")
    if num_slices is not None:
        if int(num_slices) < 1:
            raise InputError(f"num_slices must be at least 1, got {num_slices}.")
        entries = spread(entries, int(num_slices))
    base = Path(dataset_dir) if dataset_dir is not None else path.parent
    resolved = []
    for index, entry in enumerate(entries):
        shown = entry.get(source_key, entry.get("image", "?")) if isinstance(entry, dict) else entry
        name = f"{path.name} '{data_list_key}' entry {index} ({shown})"
        if not isinstance(entry, dict):
            raise InputError(f"{name}: an entry must be an object with keys {keys}.")
        missing = [key for key in keys if key not in entry]
        if missing:
            raise InputError(f"{name}: missing key(s) {missing}; an evaluation entry needs {keys}.")
        item = dict(entry)
        shapes = {}
        for key in keys:
            file = base / entry[key]
            image = _read(file, name, key)
            shapes[key] = tuple(image.shape)
            item[key] = str(file)
        if len(set(shapes.values())) > 1:
            raise InputError(f"{name}: {', '.join(keys)} shapes differ: {shapes}.")
        _check_content(item, keys, source_key, name)
        if "label" in keys:
            labels = np.unique(np.asarray(nib.load(item["label"]).dataobj))
            bad = [v for v in labels.tolist() if v not in range(NUM_TISSUE_LABELS + 1)]
            if bad:
                raise InputError(
                    f"{name}: label map {item['label']} holds values {bad[:5]} outside 0-3 "
                    "(0 background, 1 CSF, 2 GM, 3 WM)."
                )
        if source_key != "image":
            if "image" in entry:
                item["source_image"] = str(base / entry["image"])
            item["image"] = item[source_key]
        item["source_key"] = source_key
        resolved.append(item)
    logger.info(f"evaluating {len(resolved)} '{data_list_key}' entries of {path} (source: '{source_key}')")
    return resolved
