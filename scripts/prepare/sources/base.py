"""What every source of subjects shares: the ``Source`` interface, its per-subject result, and input checks.

A source (``configs/prepare.json`` picks one by its ``_target_``) lists its subjects per split and turns one subject
into paired axial slices; ``DatasetPreparer`` does everything else (geometry, writing, the datalist).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np

from scripts.io import is_nifti
from scripts.prepare.errors import DataPreparationError, InputNotFoundError
from scripts.prepare.geometry import Canonical
from scripts.prepare.simulation import CONTRASTS, MRSimulator

if TYPE_CHECKING:
    from scripts.prepare.preparer import DatasetPreparer

__all__ = ["Source", "SubjectSlices", "check_dir", "finish_simulated", "load_volume"]


class Source:
    """A source of subjects: ``subjects()`` -> {"training": [...], "testing": [...]} subject ids, and
    ``prepare(subject, preparer)`` -> that subject's ``SubjectSlices`` on ``preparer.grid``.

    ``name`` is written to the datalist (``source``); ``mask_type`` says what the written ``mask`` is ("brain", or
    "head" for real data without a tissue segmentation). Input files are checked in ``__init__`` with one-line
    ``DataPreparationError``s.
    """

    name = ""
    mask_type = "brain"

    def subjects(self) -> dict[str, list[str]]:
        raise NotImplementedError

    def prepare(self, subject: str, preparer: DatasetPreparer) -> SubjectSlices:
        raise NotImplementedError


@dataclass
class SubjectSlices:
    """All output slices of one subject."""

    subject: str
    indices: list[int]  # index along the source volume's own axial axis
    affines: np.ndarray  # (N, 4, 4)
    images: dict[str, np.ndarray]  # contrast -> (N, H, W) float32
    mask: np.ndarray  # (N, H, W) uint8
    label: np.ndarray | None  # (N, H, W) uint8 or None (real data)


def finish_simulated(
    subject: str,
    canon: Canonical,
    ks: np.ndarray,
    affines: np.ndarray,
    clean: np.ndarray,
    class_fractions: np.ndarray,
    world: np.ndarray,
    wm_signal: np.ndarray,
    simulator: MRSimulator,
    rng: np.random.Generator,
) -> SubjectSlices:
    """Bias, noise, labels (argmax of class fractions) and brain mask of a simulated subject."""
    images = simulator.finish(clean, world, wm_signal, rng)
    np.maximum(images, 0, out=images)
    label = np.argmax(class_fractions, axis=0).astype(np.uint8)
    return SubjectSlices(
        subject=subject,
        indices=[canon.original_index(k) for k in ks],
        affines=affines,
        images={c: images[i].astype(np.float32) for i, c in enumerate(CONTRASTS)},
        mask=(label > 0).astype(np.uint8),
        label=label,
    )


def check_dir(path: str | os.PathLike | None, what: str) -> Path:
    """An existing input directory, or a one-line ``InputNotFoundError`` naming it."""
    if path is None or str(path) == "":
        raise InputNotFoundError(f"{what}: no directory given")
    p = Path(path)
    if not p.exists():
        raise InputNotFoundError(f"{what} {p}: directory does not exist")
    if not p.is_dir():
        raise InputNotFoundError(f"{what} {p}: not a directory")
    return p


def load_volume(path: Path, what: str = "volume") -> tuple[np.ndarray, np.ndarray]:
    """Read a 3D NIfTI volume: (array, affine). Errors name the file and the problem in one line."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"{what} {path}: file does not exist")
    if not is_nifti(path):
        raise DataPreparationError(f"{what} {path}: not a NIfTI file (expected .nii or .nii.gz)")
    try:
        img = nib.load(str(path))
        if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
            raise TypeError(f"{type(img).__name__} is not NIfTI")
        data = np.asarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for bad files
        raise DataPreparationError(f"{what} {path}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from exc
    shape = data.shape
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3 or min(data.shape) < 2:
        raise DataPreparationError(f"{what} {path}: expected a 3D volume, got an array of shape {shape}")
    return data, img.affine.astype(np.float64)
