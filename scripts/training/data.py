"""What reaches training and validation: target images only, and validation pairs that are never test slices."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)


# File-name tags of source-modality images written by the prepare workflow (and common in user datasets).
SOURCE_TAGS = ("pdw", "_pd", "-pd", "t2w", "_t2", "-t2", "source_", "flair")


def spread(items: list, count: int) -> list:
    """`count` items evenly spread over `items` (all of them when there are fewer): a small, fixed monitoring set."""
    if count <= 0 or len(items) <= count:
        return list(items)
    step = len(items) / count
    return [items[int(i * step)] for i in range(count)]


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


def require_tissue_labels(entries: list[dict], required: bool = True, key: str = "label") -> list[dict]:
    """Return `entries` unchanged after checking that each has a tissue label map under `key` when `required`
    (the tissue-aware loss reads the target's labels; a datalist without them stops training with one line)."""
    if required:
        for entry in entries:
            if key not in entry:
                raise ValueError(
                    f"training entry {entry.get('image')!r} has no tissue label map (<stem>_dseg.nii.gz beside it), "
                    "which the tissue-aware loss needs; prepare the data with label maps or pass "
                    "--tissue_loss_weight 0."
                )
    return entries


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
