"""Data preparation: paired PDw / T1w / T2w 2D slices, tissue labels, brain masks and a MONAI datalist.

Three sources (``configs/prepare.json``, ``--source``):

- ``mni`` (default, offline): pseudo-subjects from the MNI152 2009a GM/WM probability maps and brain mask that
  ship inside the ``nilearn`` wheel (CSF = mask - GM - WM, clipped at 0). The shipped T1 template is skull
  stripped, so the head around the brain is built from the brain mask's distance map: thin CSF and dura,
  skull (inner table, diploe marrow, outer table), muscle (thicker over the temporal fossa), subcutaneous fat
  and skin, each layer's thickness varying smoothly per subject; concavities of the brain envelope (the gaps
  between the lobes at the skull base) are filled with a bone/marrow/CSF mix (``MNI_SKULL_BASE``); there is no
  face, neck or eyes. Each subject is the template seen through a
  random affine and a smooth random deformation, with its own jittered tissue parameters.
- ``labelmaps``: FreeSurfer-convention label maps (``FREESURFER_LABELS``; e.g. SynthSeg's 16 training maps
  with extra-cerebral labels), simulated with partial volume, each label map file one subject.
- ``ixi``: real IXI PD and T1 (and optionally T2) volumes. T1 is registered to PD with ITK (rigid then
  affine, Mattes mutual information, ``scripts.registration``) and resampled onto PD's grid. There is no
  ground truth tissue segmentation: ``testing`` entries have no ``"label"`` and their ``"mask"`` is a *head*
  mask computed from PD (datalist key ``mask_type: "head"``).

Output (``DatasetPreparer.run``): ``dataset_dir/slices/<subject>/<subject>_slice-<k>_<kind>.nii.gz`` with kind
``PDw``, ``T1w``, ``T2w`` (float32 >= 0, raw signal), ``dseg`` (uint8 tissue classes 0 background/non-brain,
1 CSF, 2 GM, 3 WM) and ``mask`` (uint8 brain mask, = dseg > 0), and ``dataset_dir/datalist.json``:

- ``training``: ``{"image": T1w, "subject", "slice"}`` of training subjects only (target modality only);
- ``source_training``: ``{"image": PDw, "subject", "slice"}`` of training subjects (for baselines that may
  see some source data, e.g. CycleGAN);
- ``testing``: ``{"image": PDw, "target": T1w, "t2": T2w, "label": dseg, "mask": mask, "subject", "slice"}``;
- metadata: ``name``, ``description``, ``source``, ``source_modality`` ("PDw"), ``target_modality`` ("T1w"),
  ``spatial_size``, ``pixel_mm``, ``seed``, ``mask_type``, ``subjects`` {training, testing}, ``labels``.

Paths are relative to ``dataset_dir`` (``monai.data.load_decathlon_datalist(path, data_list_key=...,
base_dir=dataset_dir)``). ``slice`` is the index along the source volume's own axial array axis. Every slice is
an axial plane of the source volume resampled in-plane to ``spatial_size`` pixels of ``fov_mm / max(size)`` mm
centred on the brain; its 4x4 affine maps pixel (i, j, 0) to the world (RAS mm) position of that point in the
source volume; array axis 0 runs from the subject's left to right (R), axis 1 from posterior to anterior (A).
The dataset is written to a staging folder next to ``dataset_dir`` and renamed onto it at the end, so a failed or
terminated (SIGTERM) run leaves nothing behind; an existing ``dataset_dir`` (or ``make_demo``'s ``output_dir``) is
only replaced when it is empty or holds nothing but what this bundle wrote there (``scripts.publishing``). Bad input
raises ``DataPreparationError`` (a ``ValueError``; ``InputNotFoundError`` is also a ``FileNotFoundError``) with
one line naming the file or argument; the config entry points ``prepare_dataset`` and ``make_demo`` turn it into
that one line on stderr and exit status 1.

The example figure ``docs/images/simulated_examples.png`` is made by ``save_examples_figure`` (called by
``benchmarks/bench_prepare.py --figure``).
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import re
import shutil
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi
from tqdm import tqdm

from scripts.io import is_nifti, nifti_stem
from scripts.publishing import check_replaceable, sigterm_exits, write_staged
from scripts.registration import RegistrationError, register_rigid_affine
from scripts.simulation import CONTRASTS, MRSimulator, eval_smooth

logger = logging.getLogger(__name__)

__all__ = [
    "DataPreparationError",
    "InputNotFoundError",
    "FREESURFER_LABELS",
    "CLASS_NAMES",
    "SOURCES",
    "DatasetPreparer",
    "SliceGrid",
    "MNISource",
    "LabelMapSource",
    "IXISource",
    "save_examples_figure",
    "simulate_volume",
    "prepare_dataset",
    "make_demo",
    "make_demo_input",
    "IXI_QUALITY",
]

CLASS_NAMES = {0: "background", 1: "CSF", 2: "GM", 3: "WM"}
SOURCES = ("mni", "labelmaps", "ixi")
# registration-quality limits of the ixi source (see IXISource)
IXI_QUALITY = {"max_metric": -0.2, "min_head_dice": 0.85, "max_mirror_gain": 0.05}


class DataPreparationError(ValueError):
    """Bad input for data preparation; the message is one line naming the file or argument and the problem."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class InputNotFoundError(DataPreparationError, FileNotFoundError):
    """A required input file or directory does not exist (or holds nothing usable)."""


# FreeSurfer label -> (tissue of scripts.simulation.TISSUES or a mixture below, class 0-3).
# Classes: 1 CSF (ventricles, CSF), 2 GM (cortex, deep grey nuclei, hippocampus, amygdala, cerebellar cortex,
# ventral DC), 3 WM (cerebral and cerebellar WM, brain stem, WM lesions, optic chiasm).
FREESURFER_LABELS: dict[int, tuple[str, int]] = {
    0: ("air", 0),
    # CSF
    **{lab: ("csf", 1) for lab in (4, 5, 14, 15, 24, 43, 44, 72)},
    31: ("choroid_plexus", 1),
    63: ("choroid_plexus", 1),
    # In SynthSeg's training maps 136/137/163/164 line the lateral ventricles and their temporal horns (their
    # neighbours are labels 4/5/43/44, thalamus, hippocampus): choroid plexus, i.e. the ventricular compartment.
    **{lab: ("choroid_plexus", 1) for lab in (136, 137, 163, 164)},
    # GM
    **{lab: ("gm", 2) for lab in (3, 42, 8, 47, 17, 53, 18, 54, 19, 55, 20, 56, 80, 96, 97)},
    **{lab: ("deep_gm", 2) for lab in (9, 48, 10, 49, 11, 50, 12, 51, 13, 52, 26, 58, 28, 60)},
    30: ("blood", 2),
    62: ("blood", 2),
    # WM
    **{lab: ("wm", 3) for lab in (2, 41, 7, 46, 16, 251, 252, 253, 254, 255)},
    **{lab: ("lesion", 3) for lab in (25, 57, 77, 78, 79)},
    85: ("nerve", 3),
    # Extra-cerebral labels of SynthSeg's training maps, identified by where they lie: 502 large vessels (carotid/
    # jugular), 506 eyes, 507 scalp/face soft tissue, 508 extra-ocular muscles, 509 nasal mucosa, 511 skin and
    # subcutaneous fat, 512 spinal cord, 514 venous sinuses, 515 skull, 516 other bone (marrow), 530 optic nerve.
    502: ("blood", 0),
    506: ("vitreous", 0),
    507: ("soft_tissue", 0),
    508: ("muscle", 0),
    509: ("mucosa", 0),
    511: ("scalp", 0),
    512: ("nerve", 0),
    514: ("blood", 0),
    515: ("skull", 0),
    516: ("marrow", 0),
    530: ("nerve", 0),
}

# Fixed mixtures of pure tissues; "soft_tissue" and "skull" additionally vary in space (see LabelMapSource).
MIXTURES: dict[str, dict[str, float]] = {
    "scalp": {"fat": 0.7, "skin": 0.3},
    "soft_tissue": {"muscle": 1.0},  # plus a smooth random fat fraction
    "skull": {"bone": 1.0},  # voxels deeper than the tables become marrow (diploe)
}


# ----------------------------------------------------------------------------------------------------------------
# input checks


def _check_dir(path: str | os.PathLike | None, what: str) -> Path:
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


# ----------------------------------------------------------------------------------------------------------------
# folders this bundle writes (marked, staged, published by renaming: scripts.publishing)

DEMO_KEYS = ("image", "target", "label", "mask")


def _refusal(what: str, folder: Path):
    """The one-line error for a `what` folder (dataset_dir, output_dir) that must not be replaced."""
    fix = f"nothing was changed (give a new or empty {what}, or move that content elsewhere first)"
    return lambda problem: DataPreparationError(f"{what} {folder}: {problem}; {fix}")


def _one_line(what: str, function, *args, **kwargs):
    """Call `function` with SIGTERM as ``SystemExit``; a ``DataPreparationError`` becomes one line, exit status 1."""
    with sigterm_exits(f"{what} stopped by SIGTERM; its temporary folder was removed, earlier results are unchanged"):
        try:
            return function(*args, **kwargs)
        except DataPreparationError as exc:
            logger.error("%s", exc)
            raise SystemExit(f"{what} failed: {exc}") from None


# ----------------------------------------------------------------------------------------------------------------
# geometry


@dataclass(frozen=True)
class Canonical:
    """A volume reoriented to the closest RAS orientation, plus what is needed to name slices in the original."""

    data: np.ndarray
    affine: np.ndarray
    axial_axis: int  # the original array axis that became canonical axis 2 (S)
    axial_flipped: bool
    axial_length: int

    def original_index(self, k: int) -> int:
        return self.axial_length - 1 - int(k) if self.axial_flipped else int(k)


def to_canonical(data: np.ndarray, affine: np.ndarray) -> Canonical:
    """Permute/flip the array to RAS+ axis order (no resampling); the affine follows exactly."""
    ornt = nib.orientations.io_orientation(affine)
    data_c = nib.orientations.apply_orientation(data, ornt)
    affine_c = affine @ nib.orientations.inv_ornt_aff(ornt, data.shape)
    axis = int(np.flatnonzero(ornt[:, 0] == 2)[0])
    return Canonical(np.ascontiguousarray(data_c), affine_c, axis, bool(ornt[axis, 1] < 0), int(data.shape[axis]))


@dataclass(frozen=True)
class SliceGrid:
    """The 2D output grid: ``size`` pixels of ``pixel_mm`` (isotropic) in the axial plane of a canonical volume."""

    size: tuple[int, int]
    pixel_mm: float

    def steps(self, affine: np.ndarray) -> np.ndarray:
        """Output pixel size in voxels of the canonical volume along its axes 0 and 1."""
        return self.pixel_mm / np.linalg.norm(affine[:3, :2], axis=0)

    def antialias_sigma(self, affine: np.ndarray) -> np.ndarray:
        """In-plane Gaussian anti-aliasing sigma (voxels) before sampling: (step - 1) / 2 (skimage's choice)."""
        return np.maximum(0.0, (self.steps(affine) - 1.0) / 2.0)

    def origin(self, affine: np.ndarray, center_vox: Sequence[float]) -> np.ndarray:
        """Voxel coordinates (axes 0, 1) of output pixel (0, 0), the grid centred on ``center_vox``.

        The first output pixel covers a block of ``step`` voxels starting at an integer voxel, so that with a
        step of 2 every pixel is the centre of a 2 x 2 voxel block.
        """
        step = self.steps(affine)
        size = np.asarray(self.size, dtype=np.float64)
        start = np.round(np.asarray(center_vox[:2], dtype=np.float64) - size * step / 2.0)
        return start + (step - 1.0) / 2.0

    def slice_affine(self, affine: np.ndarray, center_vox: Sequence[float], k: float) -> np.ndarray:
        """4x4 affine of the output slice at canonical axial voxel index ``k``: pixel (i, j, 0) -> world mm."""
        step = self.steps(affine)
        o = self.origin(affine, center_vox)
        m = np.array([[step[0], 0, 0, o[0]], [0, step[1], 0, o[1]], [0, 0, 1, k], [0, 0, 0, 1]], dtype=np.float64)
        return affine @ m

    def axes(self, affine: np.ndarray, center_vox: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
        """Voxel coordinates of the output pixels along canonical axes 0 (length H) and 1 (length W)."""
        step = self.steps(affine)
        o = self.origin(affine, center_vox)
        return o[0] + step[0] * np.arange(self.size[0]), o[1] + step[1] * np.arange(self.size[1])

    def voxel_points(self, affine: np.ndarray, center_vox: Sequence[float], ks: Sequence[float]) -> np.ndarray:
        """Voxel coordinates ``(3, len(ks), H, W)`` of every output pixel of the slices ``ks``."""
        i, j = self.axes(affine, center_vox)
        ks = np.asarray(ks, dtype=np.float64)
        pts = np.empty((3, len(ks), self.size[0], self.size[1]), dtype=np.float64)
        pts[0] = i[None, :, None]
        pts[1] = j[None, None, :]
        pts[2] = ks[:, None, None]
        return pts


def voxel_to_world(affine: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """``(3, ...)`` voxel coordinates -> ``(..., 3)`` world coordinates."""
    flat = pts.reshape(3, -1)
    world = affine[:3, :3] @ flat + affine[:3, 3:4]
    return np.moveaxis(world.reshape(pts.shape), 0, -1)


def world_to_voxel(affine: np.ndarray, world: np.ndarray) -> np.ndarray:
    """``(..., 3)`` world coordinates -> ``(3, ...)`` voxel coordinates."""
    inv = np.linalg.inv(affine)
    flat = np.moveaxis(world, -1, 0).reshape(3, -1)
    vox = inv[:3, :3] @ flat + inv[:3, 3:4]
    return vox.reshape((3,) + world.shape[:-1])


def _lerp_axis(a: np.ndarray, coords: np.ndarray, axis: int) -> np.ndarray:
    """Linear interpolation of ``a`` at (fractional) indices ``coords`` along one axis, zero outside."""
    n = a.shape[axis]
    pad = [(0, 0)] * a.ndim
    pad[axis] = (1, 1)
    a = np.pad(a, pad)
    c = np.clip(np.asarray(coords, dtype=np.float64) + 1.0, 0.0, n + 1.0)
    i0 = np.minimum(np.floor(c).astype(int), n)
    shape = [1] * a.ndim
    shape[axis] = len(c)
    w = (c - i0).reshape(shape).astype(a.dtype)
    lo = np.take(a, i0, axis=axis)
    return lo + (np.take(a, i0 + 1, axis=axis) - lo) * w


def sample_slices(
    vol: np.ndarray,
    ks: np.ndarray,
    icoords: np.ndarray,
    jcoords: np.ndarray,
    sigma: Sequence[float] = (0, 0, 0),
    z_first: bool = False,
) -> np.ndarray:
    """Blur a canonical volume with a Gaussian (``sigma`` in voxels along x, y, z; zero outside) and sample its
    axial slices ``ks`` on the in-plane grid ``icoords x jcoords`` (linear interpolation): ``(len(ks), H, W)``.

    Equivalent to ``gaussian_filter`` + ``map_coordinates(order=1)`` for an axis-aligned grid, but only the
    needed slices are filtered and the interpolation is separable (several times faster). ``z_first``: ``vol``
    is stored as (z, x, y) (faster: each slice is contiguous)."""
    ks = np.asarray(ks, dtype=int)
    if not z_first:
        vol = np.moveaxis(vol, 2, 0)
    sz = float(sigma[2])
    if sz > 0:
        r = int(4.0 * sz + 0.5)
        offsets = np.arange(-r, r + 1)
        weights = np.exp(-0.5 * (offsets / sz) ** 2)
        weights /= weights.sum()
    else:
        offsets, weights = np.zeros(1, dtype=int), np.ones(1)
    slab = np.zeros((len(ks),) + vol.shape[1:], dtype=np.float32)
    for d, w in zip(offsets, weights, strict=True):
        idx = ks + d
        ok = (idx >= 0) & (idx < vol.shape[0])
        slab[ok] += np.float32(w) * vol[idx[ok]]
    if sigma[0] > 0 or sigma[1] > 0:
        slab = ndi.gaussian_filter(slab, (0.0, float(sigma[0]), float(sigma[1])), mode="constant")
    return _lerp_axis(_lerp_axis(slab, icoords, 1), jcoords, 2)


def select_slices(area: np.ndarray, step: int, min_fraction: float, max_slices: int | None) -> np.ndarray:
    """Axial indices every ``step`` slices whose brain (or head) area is at least ``min_fraction`` of the largest."""
    area = np.asarray(area, dtype=np.float64)
    if area.max() <= 0:
        return np.zeros(0, dtype=int)
    ok = np.flatnonzero(area >= min_fraction * area.max())
    lo, hi = ok.min(), ok.max()
    centre = int(np.argmax(area))
    ks = np.arange(centre - ((centre - lo) // step) * step, hi + 1, step)
    ks = ks[area[ks] >= min_fraction * area.max()]
    if max_slices is not None and len(ks) > max_slices:
        ks = ks[np.round(np.linspace(0, len(ks) - 1, max_slices)).astype(int)]
    return ks


def plan_slices(mask: np.ndarray, affine: np.ndarray, preparer: DatasetPreparer) -> tuple[np.ndarray, np.ndarray]:
    """Axial slices to cut from a canonical volume (every `slice_step_mm`, enough of `mask` in each) and the
    in-plane centre of `mask`'s bounding box, on which the output grid is centred."""
    vox = np.linalg.norm(affine[:3, :3], axis=0)
    step = max(1, int(round(preparer.slice_step_mm / vox[2])))
    ks = select_slices(mask.sum((0, 1)), step, preparer.min_brain_fraction, preparer.max_slices_per_subject)
    nz = np.argwhere(mask.any(2))
    return ks, (nz.min(0) + nz.max(0)) / 2.0


def smooth_random_field(points_mm: np.ndarray, rng: np.random.Generator, wavelength_mm: float, n: int = 24):
    """A smooth random field (about unit variance) at world points ``(..., 3)``: random Fourier features."""
    direction = rng.standard_normal((n, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    freq = direction * (2 * np.pi / wavelength_mm) * rng.uniform(0.5, 1.5, size=(n, 1))
    phase = rng.uniform(0, 2 * np.pi, size=n)
    out = np.zeros(points_mm.shape[:-1])
    for f, ph in zip(freq, phase, strict=True):
        out += np.cos(points_mm @ f + ph)
    return out * np.sqrt(2.0 / n)


def subject_rng(seed: int, subject: str) -> np.random.Generator:
    """Per-subject generator: depends only on the seed and the subject id (not on the other subjects)."""
    return np.random.default_rng([int(seed), zlib.crc32(subject.encode())])


# ----------------------------------------------------------------------------------------------------------------
# per-subject result


@dataclass
class SubjectSlices:
    """All output slices of one subject."""

    subject: str
    indices: list[int]  # index along the source volume's own axial axis
    affines: np.ndarray  # (N, 4, 4)
    images: dict[str, np.ndarray]  # contrast -> (N, H, W) float32
    mask: np.ndarray  # (N, H, W) uint8
    label: np.ndarray | None  # (N, H, W) uint8 or None (real data)


def _finish_simulated(
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


# ----------------------------------------------------------------------------------------------------------------
# sources


class _Source:
    name = ""
    mask_type = "brain"

    def subjects(self) -> dict[str, list[str]]:
        raise NotImplementedError

    def prepare(self, subject: str, preparer: DatasetPreparer) -> SubjectSlices:
        raise NotImplementedError


class LabelMapSource(_Source):
    """FreeSurfer-convention label maps, one file per subject (``*.nii`` / ``*.nii.gz``).

    A file's subject id is ``sub-<digits>`` from the trailing digits of its name (``training_seg_07.nii.gz`` ->
    ``sub-07``), or ``sub-<name>`` when there are none. ``training`` / ``testing`` list the ids (the digits, or
    the names) per split; ``None`` puts every file not listed in the other split there. Other files in the
    directory (text, licence) are ignored, unless their name carries a listed subject id without being NIfTI.
    Label maps must be 3D with integer labels of ``FREESURFER_LABELS`` (plus ``extra_labels``:
    {label: [tissue, class]}); the axial axis is found from the affine.
    """

    name = "labelmaps"

    def __init__(
        self,
        directory: str,
        training: Sequence[str] | None = None,
        testing: Sequence[str] | None = None,
        extra_labels: Mapping | None = None,
        skull_table_mm: float = 1.5,
        fat_fraction: Sequence[float] = (0.15, 0.6),
    ):
        self.directory = _check_dir(directory, "label map directory")
        self.labels = dict(FREESURFER_LABELS)
        for k, v in dict(extra_labels or {}).items():
            self.labels[int(k)] = (str(v[0]), int(v[1]))
        self.skull_table_mm = float(skull_table_mm)
        self.fat_fraction = tuple(float(f) for f in fat_fraction)
        files = sorted(p for p in self.directory.iterdir() if p.is_file() and not p.name.startswith("."))
        nifti = [p for p in files if is_nifti(p)]
        if not nifti:
            raise InputNotFoundError(
                f"label map directory {self.directory}: no NIfTI (.nii/.nii.gz) label maps in it"
                + (f" (found {len(files)} other files, e.g. {files[0].name})" if files else " (it is empty)")
            )
        self.files: dict[str, Path] = {}
        for p in nifti:
            key = self._key(p)
            if key in self.files:
                raise DataPreparationError(f"label map {p}: same subject id '{key}' as {self.files[key]}")
            self.files[key] = p
        self.others = {self._key(p): p for p in files if not is_nifti(p)}
        train = [str(s) for s in training] if training is not None else None
        test = [str(s) for s in testing] if testing is not None else None
        if train is not None and test is not None and set(train) & set(test):
            raise DataPreparationError(
                f"labelmaps training/testing: subjects {sorted(set(train) & set(test))} are in both splits"
            )
        if train is None:
            train = [k for k in self.files if k not in set(test or [])]
        if test is None:
            test = [k for k in self.files if k not in set(train)]
        for key in train + test:
            self._file(key)
        self.split = {"training": train, "testing": test}

    @staticmethod
    def _key(p: Path) -> str:
        m = re.search(r"(\d+)$", nifti_stem(p))
        return m.group(1) if m else nifti_stem(p)

    def _file(self, key: str) -> Path:
        if key in self.files:
            return self.files[key]
        if key in self.others:
            raise DataPreparationError(
                f"label map {self.others[key]}: not a NIfTI file (expected .nii or .nii.gz) for subject '{key}'"
            )
        raise InputNotFoundError(f"label map directory {self.directory}: no label map for subject '{key}'")

    def subjects(self) -> dict[str, list[str]]:
        return {split: [f"sub-{k}" for k in keys] for split, keys in self.split.items()}

    def _lookup(self, data: np.ndarray, path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Tissue index and class volumes (uint8) from the labels; unknown labels are an error."""
        if not np.issubdtype(data.dtype, np.integer):
            rounded = np.rint(data)
            if not np.array_equal(rounded, data):
                bad = data[rounded != data].flat[0]
                raise DataPreparationError(f"label map {path}: non-integer label value {bad}")
            data = rounded
        lo, hi = int(data.min()), int(data.max())
        if lo < 0:
            raise DataPreparationError(f"label map {path}: unknown label value {lo} (negative)")
        if hi > 100000:
            raise DataPreparationError(f"label map {path}: unknown label value {hi}")
        data = data.astype(np.int32, copy=False)
        present = np.flatnonzero(np.bincount(data.ravel(order="K"), minlength=hi + 1))
        unknown = [int(v) for v in present if int(v) not in self.labels]
        if unknown:
            raise DataPreparationError(
                f"label map {path}: unknown label value{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(map(str, unknown[:10]))} (not a FreeSurfer label of scripts.data.FREESURFER_LABELS)"
            )
        tissue_names = sorted({self.labels[int(v)][0] for v in present} | {"air", "marrow", "fat"})
        t_lut = np.zeros(hi + 1, dtype=np.uint8)
        c_lut = np.zeros(hi + 1, dtype=np.uint8)
        for v in present:
            t, c = self.labels[int(v)]
            t_lut[v] = tissue_names.index(t)
            c_lut[v] = c
        return t_lut[data], c_lut[data], tissue_names

    def prepare(self, subject: str, preparer: DatasetPreparer) -> SubjectSlices:
        key = subject[len("sub-") :]
        path = self._file(key)
        data, affine = load_volume(path, "label map")
        tissue, classes, names = self._lookup(data, path)
        del data
        canon_t = to_canonical(tissue, affine)
        canon_c = to_canonical(classes, affine)
        tissue, classes, aff = canon_t.data, canon_c.data, canon_t.affine
        brain = classes > 0
        if not brain.any():
            raise DataPreparationError(f"label map {path}: no brain labels (all voxels are background)")
        vox = np.linalg.norm(aff[:3, :3], axis=0)
        ks, center = plan_slices(brain, aff, preparer)
        grid = preparer.grid
        affines = np.stack([grid.slice_affine(aff, center, k) for k in ks])
        world = voxel_to_world(aff, grid.voxel_points(aff, center, ks))

        # blur = partial volume (pv_sigma) combined with in-plane anti-aliasing
        sim = preparer.simulator
        sigma = np.sqrt(np.r_[grid.antialias_sigma(aff), 0.0] ** 2 + (sim.pv_sigma_mm / vox) ** 2)
        icoords, jcoords = grid.axes(aff, center)

        rng = preparer.rng(subject)
        pure = sorted({n for n in names if n not in MIXTURES} | {t for n in names for t in MIXTURES.get(n, {})})
        pure = sorted(set(pure) | {"fat", "muscle", "marrow", "wm"})
        signals = sim.subject_signals(rng, pure)  # (3, len(pure))
        mix = self._mixtures(names, pure, signals)  # (3, len(names))
        # only the slab of slices that the blur reaches matters
        r = int(4.0 * sigma[2] + 0.5)
        z0, z1 = max(int(ks.min()) - r, 0), min(int(ks.max()) + r + 1, tissue.shape[2])
        tissue = np.ascontiguousarray(np.moveaxis(tissue[:, :, z0:z1], 2, 0))  # (z, x, y): contiguous slices
        classes = np.ascontiguousarray(np.moveaxis(classes[:, :, z0:z1], 2, 0))
        ks_slab = ks - z0
        # diploe: skull voxels deeper than the tables (erosion by ``skull_table_mm``) are marrow
        if "skull" in names:
            skull = tissue == names.index("skull")
            n_erode = int(round(self.skull_table_mm / float(vox.min())))
            if skull.any() and n_erode > 0:
                inner = ndi.binary_erosion(skull, ndi.generate_binary_structure(3, 2), iterations=n_erode)
                tissue[inner] = names.index("marrow")

        def blur_sample(vol: np.ndarray) -> np.ndarray:
            return sample_slices(vol, ks_slab, icoords, jcoords, sigma, z_first=True)

        clean = np.stack([blur_sample(mix[c][tissue]) for c in range(len(CONTRASTS))])
        if "soft_tissue" in names and np.any(soft := tissue == names.index("soft_tissue")):
            # soft tissue: muscle with a smooth random fat fraction (fat pads, fascia) for a realistic texture
            lo_f, hi_f = self.fat_fraction
            field = eval_smooth(lambda p: smooth_random_field(p, rng, 40.0), world)
            fat = lo_f + (hi_f - lo_f) / (1 + np.exp(-1.5 * field))
            d = signals[:, pure.index("fat")] - signals[:, pure.index("muscle")]
            clean += blur_sample(soft.astype(np.float32))[None] * fat[None] * d[:, None, None, None]
        fractions = np.stack([blur_sample((classes == c).astype(np.float32)) for c in (1, 2, 3)])
        fractions = np.concatenate([1.0 - fractions.sum(0, keepdims=True), fractions])
        wm = signals[:, pure.index("wm")]
        return _finish_simulated(subject, canon_t, ks, affines, clean, fractions, world, wm, sim, rng)

    @staticmethod
    def _mixtures(names: list[str], pure: list[str], signals: np.ndarray) -> np.ndarray:
        """Signal of every tissue index (pure tissues and the fixed mixtures): ``(3, len(names))`` float32."""
        out = np.zeros((signals.shape[0], len(names)), dtype=np.float64)
        for i, n in enumerate(names):
            for t, w in MIXTURES.get(n, {n: 1.0}).items():
                out[:, i] += w * signals[:, pure.index(t)]
        return out.astype(np.float32)


# MNI pseudo-subject head: layers outside the brain mask (tissue, base thickness in mm), inside to outside.
MNI_HEAD_LAYERS: tuple[tuple[str, float], ...] = (
    ("csf", 1.0),
    ("dura", 1.0),
    ("bone", 2.0),
    ("marrow", 2.0),
    ("bone", 2.0),
    ("muscle", 1.5),
    ("fat", 3.5),
    ("skin", 1.2),
)


# tissue filling the concavities of the brain envelope (mostly the skull base between the lobes)
MNI_SKULL_BASE: dict[str, float] = {"bone": 0.5, "marrow": 0.3, "csf": 0.2}


@functools.lru_cache(maxsize=2)
def _mni_template(pad: tuple[int, int, int] = (16, 16, 4)) -> dict:
    """GM, WM, brain mask (padded with ``pad`` voxels of air, room for the head around the brain) and the
    distance (mm) outside the brain envelope."""
    from nilearn import datasets

    mask_img = datasets.load_mni152_brain_mask(resolution=1)
    maps = {
        "gm": datasets.load_mni152_gm_template(resolution=1),
        "wm": datasets.load_mni152_wm_template(resolution=1),
        "mask": mask_img,
    }
    out = {}
    for k, img in maps.items():
        canon = to_canonical(np.asarray(img.dataobj, dtype=np.float32), img.affine)
        out[k] = np.pad(canon.data, [(p, p) for p in pad])
        affine = canon.affine.copy()
        affine[:3, 3] -= canon.affine[:3, :3] @ np.asarray(pad, dtype=np.float64)
    mask = out["mask"] > 0.5
    # brain envelope: the mask with its concavities (up to ~1 cm: gaps between the lobes at the skull base)
    # filled, so that the skull follows the outer surface; the filled gaps become skull base (bone, marrow)
    envelope = (ndi.gaussian_filter(mask.astype(np.float32), 5.0) > 0.5) | mask
    out["envelope"] = envelope.astype(np.float32)
    out["distance"] = ndi.distance_transform_edt(~envelope).astype(np.float32)
    out["affine"] = affine
    out["canonical"] = canon
    out["pad"] = pad
    return out


@functools.lru_cache(maxsize=4)
def _mni_blurred(sigma: tuple[float, float, float]) -> dict:
    t = _mni_template()
    keys = ("gm", "wm", "mask", "envelope")
    out = {k: ndi.gaussian_filter(t[k], sigma) if max(sigma) > 0 else t[k] for k in keys}
    out["distance"] = t["distance"]
    return out


class MNISource(_Source):
    """Pseudo-subjects from the MNI152 2009a maps in the nilearn wheel (offline): ``sub-01`` ... ``sub-NN``.

    Subject ``i`` is the template resampled through a random affine (rotations ``rotation_deg``, per-axis
    scaling ``1 +- scale``, shifts ``shift_mm``, all standard deviations) and a smooth random displacement
    (cubic B-spline on a ``control_spacing_mm`` grid, standard deviation ``deformation_mm``); its head layers
    (``MNI_HEAD_LAYERS``) get per-subject thickness factors and a smooth spatial variation. The first
    ``num_training`` subjects are the training split, the next ``num_testing`` the test split.
    """

    name = "mni"

    def __init__(
        self,
        num_training: int = 4,
        num_testing: int = 2,
        rotation_deg: float = 3.0,
        scale: float = 0.04,
        shift_mm: float = 2.0,
        deformation_mm: float = 2.5,
        control_spacing_mm: float = 32.0,
        layer_jitter: float = 0.2,
    ):
        if int(num_training) < 1 or int(num_testing) < 1:
            raise DataPreparationError(
                f"mni num_training={num_training} / num_testing={num_testing}: each split needs at least 1 subject"
            )
        n = int(num_training) + int(num_testing)
        ids = [f"sub-{i + 1:02d}" for i in range(n)]
        self.split = {"training": ids[: int(num_training)], "testing": ids[int(num_training) :]}
        self.rotation_deg, self.scale, self.shift_mm = float(rotation_deg), float(scale), float(shift_mm)
        self.deformation_mm, self.control_spacing_mm = float(deformation_mm), float(control_spacing_mm)
        self.layer_jitter = float(layer_jitter)

    def subjects(self) -> dict[str, list[str]]:
        return dict(self.split)

    def _draw_warp(self, rng: np.random.Generator, t: dict):
        """Draw one subject's transform: a function from subject world points ``(..., 3)`` to template voxels."""
        ang = np.deg2rad(self.rotation_deg * np.clip(rng.standard_normal(3), -2.5, 2.5))
        cx, cy, cz = np.cos(ang)
        sx, sy, sz = np.sin(ang)
        rot = (
            np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
            @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
            @ np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
        )
        lin = rot @ np.diag(1.0 + self.scale * np.clip(rng.standard_normal(3), -2.5, 2.5))
        shift = self.shift_mm * np.clip(rng.standard_normal(3), -2.5, 2.5)
        centre = np.array([0.0, -18.0, 18.0])  # near the middle of the MNI brain
        # smooth displacement: random control points over the template box, cubic B-spline interpolation
        affine, shape = t["affine"], np.array(t["mask"].shape)
        lo = affine[:3, 3]
        extent = np.abs(affine[:3, :3]).sum(1) * (shape - 1)
        n_ctrl = np.maximum(4, np.ceil(extent / self.control_spacing_mm).astype(int) + 1)
        ctrl = [ndi.spline_filter(c) for c in rng.standard_normal((3, *n_ctrl)) * self.deformation_mm]

        def warp(world: np.ndarray) -> np.ndarray:
            moved = (world - centre) @ lin.T + centre + shift
            c = np.moveaxis((moved - lo) / extent * (n_ctrl - 1), -1, 0)
            disp = [ndi.map_coordinates(ctrl[a], c, order=3, mode="nearest", prefilter=False) for a in range(3)]
            return world_to_voxel(affine, moved + np.stack(disp, axis=-1))

        return warp

    def prepare(self, subject: str, preparer: DatasetPreparer) -> SubjectSlices:
        t = _mni_template()
        aff, pad = t["affine"], t["pad"]
        grid, sim = preparer.grid, preparer.simulator
        vox = np.linalg.norm(aff[:3, :3], axis=0)
        maps = _mni_blurred(tuple(float(s) for s in np.r_[grid.antialias_sigma(aff), 0.0]))
        rng = preparer.rng(subject)
        warp = self._draw_warp(rng, t)
        nz = np.argwhere(t["mask"].any(2))
        center = (nz.min(0) + nz.max(0)) / 2.0
        # choose slices by brain area, measured on a coarse grid over every candidate slice
        step = max(1, int(round(preparer.slice_step_mm / vox[2])))
        zs = np.flatnonzero(t["mask"].any((0, 1)))
        cand = np.arange(zs.min() - 8, zs.max() + 9)
        coarse = SliceGrid((max(8, grid.size[0] // 4), max(8, grid.size[1] // 4)), grid.pixel_mm * 4)
        area_pts = warp(voxel_to_world(aff, coarse.voxel_points(aff, center, cand)))
        area = (ndi.map_coordinates(t["mask"], area_pts, order=1) > 0.5).sum((1, 2))
        ks = cand[select_slices(area, step, preparer.min_brain_fraction, preparer.max_slices_per_subject)]

        pts = grid.voxel_points(aff, center, ks)
        world = voxel_to_world(aff, pts)
        tv = eval_smooth(warp, world)
        gm = ndi.map_coordinates(maps["gm"], tv, order=1)
        wm = ndi.map_coordinates(maps["wm"], tv, order=1)
        mask = np.clip(ndi.map_coordinates(maps["mask"], tv, order=1), 0, 1)
        envelope = np.clip(ndi.map_coordinates(maps["envelope"], tv, order=1), 0, 1)
        # distance (mm) from the brain envelope's surface (voxel centres just outside are 1 voxel away)
        dist = np.maximum(ndi.map_coordinates(t["distance"], tv, order=1, cval=1e3) - 0.5, 0)
        csf = np.clip(mask - gm - wm, 0, None)
        total = gm + wm + csf
        norm = np.where(total > 1, 1 / np.maximum(total, 1e-6), 1.0)
        gm, wm, csf = gm * norm, wm * norm, csf * norm
        nonbrain = 1.0 - (gm + wm + csf)
        skull_base = np.clip(envelope - (gm + wm + csf), 0, None)  # filled gaps inside the envelope
        nonbrain = nonbrain - skull_base

        # head layers: cumulative outer boundaries with per-subject, smoothly varying thicknesses; a linear ramp
        # one output pixel wide gives partial volume at every boundary; beyond the last layer is air
        names = ["gm", "wm", "csf"] + sorted({n for n, _ in MNI_HEAD_LAYERS} - {"csf"})
        fractions = {n: np.zeros_like(gm) for n in names}
        fractions.update(gm=gm, wm=wm)
        for n, w in MNI_SKULL_BASE.items():
            fractions[n] += w * skull_base
        lateral = np.clip((np.abs(world[..., 0]) - 45.0) / 20.0, 0, 1)
        temporal = np.clip((50.0 - world[..., 2]) / 25.0, 0, 1) * np.clip((world[..., 2] + 40.0) / 20.0, 0, 1)
        temporal *= np.clip((world[..., 1] + 75.0) / 25.0, 0, 1) * np.clip((45.0 - world[..., 1]) / 20.0, 0, 1)
        boundary = np.zeros_like(gm)
        inner = np.zeros_like(gm)
        for n, base in MNI_HEAD_LAYERS:
            factor = 1.0 + self.layer_jitter * np.clip(rng.standard_normal(), -2, 2)
            local = 1.0 + self.layer_jitter * eval_smooth(lambda p: smooth_random_field(p, rng, 80.0), world)
            thick = np.maximum(base * factor * local, 0.3)
            if n == "muscle":
                thick = thick + 7.0 * lateral * temporal  # temporalis
            boundary = boundary + thick
            outer = np.clip((boundary - dist) / grid.pixel_mm + 0.5, 0, 1)
            fractions[n] += nonbrain * np.clip(outer - inner, 0, 1)
            inner = outer
        fractions["csf"] += csf

        signals = sim.subject_signals(rng, names)
        clean = np.einsum("ct,t...->c...", signals, np.stack([fractions[n] for n in names]))
        # CSF class: the brain mask's CSF and the thin CSF layer outside it (not the skull base's CSF share)
        brain = np.stack([fractions["csf"] - MNI_SKULL_BASE.get("csf", 0.0) * skull_base, gm, wm])
        class_fractions = np.concatenate([1.0 - brain.sum(0, keepdims=True), brain])
        affines = np.stack([grid.slice_affine(aff, center, k) for k in ks])
        wm_signal = signals[:, names.index("wm")]
        # slice numbers refer to the (unpadded) template array
        return _finish_simulated(
            subject, t["canonical"], ks - pad[2], affines, clean, class_fractions, world, wm_signal, sim, rng
        )


class IXISource(_Source):
    """Real IXI data: PD and T1 (and optionally T2) NIfTI volumes named like ``IXI002-Guys-0828-PD.nii.gz``.

    Subjects are matched by the name before the modality suffix; a PD without its T1 is skipped with a warning.
    T1 is registered to PD (``scripts.registration.register_rigid_affine``) and resampled onto PD's grid; T2
    is assumed to share PD's grid (same dual-echo acquisition; checked). Slices are chosen by *head* area
    (there is no brain segmentation) and the ``mask`` written is a head mask computed from PD; no ``label`` is
    written. Test subjects are ``testing`` (subject ids like ``IXI002``) or else the last ``test_fraction``
    of the sorted ids.

    A subject whose registration looks wrong is refused (``DataPreparationError`` naming it), by the ``quality``
    limits (``IXI_QUALITY``): the final Mattes metric (``max_metric``), the Dice overlap of the head masks of PD
    and registered T1 (``min_head_dice``), and how much better a mirrored T1 fits (``max_mirror_gain``: a wrong
    orientation header); ``None`` switches a check off.
    """

    name = "ixi"
    mask_type = "head"
    _pattern = re.compile(r"^(IXI\d+)(-.*)?-(PD|T1|T2)$")

    def __init__(
        self,
        pd_dir: str,
        t1_dir: str,
        t2_dir: str | None = None,
        testing: Sequence[str] | None = None,
        test_fraction: float = 0.25,
        registration: Mapping | None = None,
        quality: Mapping | None = None,
    ):
        self.registration = dict(registration or {})
        allowed = set(inspect.signature(register_rigid_affine).parameters) - {
            "fixed_path",
            "moving_path",
            "mirror_check",
        }
        unknown = sorted(set(self.registration) - allowed)
        if unknown:
            raise DataPreparationError(
                f"ixi registration: unknown option '{unknown[0]}' (known: {', '.join(sorted(allowed))})"
            )
        self.quality = dict(IXI_QUALITY)
        for key, value in dict(quality or {}).items():
            if key not in IXI_QUALITY:
                raise DataPreparationError(f"ixi quality: unknown option '{key}' (known: {', '.join(IXI_QUALITY)})")
            self.quality[key] = None if value is None else float(value)
        self.dirs = {"PD": _check_dir(pd_dir, "IXI PD directory"), "T1": _check_dir(t1_dir, "IXI T1 directory")}
        if t2_dir:
            self.dirs["T2"] = _check_dir(t2_dir, "IXI T2 directory")
        self.files: dict[str, dict[str, Path]] = {m: self._scan(d, m) for m, d in self.dirs.items()}
        ids = sorted(set(self.files["PD"]) & set(self.files["T1"]))
        for s in sorted(set(self.files["PD"]) ^ set(self.files["T1"])):
            logger.warning("IXI subject %s has only one of PD/T1: skipped", s)
        if "T2" in self.files:
            missing = [s for s in ids if s not in self.files["T2"]]
            if missing:
                raise InputNotFoundError(f"IXI T2 directory {self.dirs['T2']}: no T2 volume for {missing[0]}")
        if not ids:
            raise InputNotFoundError(f"IXI PD directory {self.dirs['PD']}: no subject has both a PD and a T1 volume")
        if testing is not None:
            test = [str(s) for s in testing]
            unknown = [s for s in test if s not in ids]
            if unknown:
                raise DataPreparationError(f"ixi testing: subject {unknown[0]} has no PD/T1 pair")
        else:
            n_test = max(1, int(round(len(ids) * float(test_fraction)))) if len(ids) > 1 else 0
            test = ids[len(ids) - n_test :]
        self.split = {"training": [s for s in ids if s not in test], "testing": test}

    def _scan(self, directory: Path, modality: str) -> dict[str, Path]:
        out = {}
        files = sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))
        for p in files:
            m = self._pattern.match(nifti_stem(p))
            if not m or m.group(3) != modality:
                continue
            if not is_nifti(p):
                raise DataPreparationError(f"IXI {modality} file {p}: not a NIfTI file (expected .nii or .nii.gz)")
            out[m.group(1)] = p
        if not out:
            raise InputNotFoundError(
                f"IXI {modality} directory {directory}: no IXI {modality} NIfTI volumes "
                f"(IXI<id>-...-{modality}.nii.gz) in it"
            )
        return out

    def subjects(self) -> dict[str, list[str]]:
        return dict(self.split)

    def prepare(self, subject: str, preparer: DatasetPreparer) -> SubjectSlices:
        pd_path, t1_path = self.files["PD"][subject], self.files["T1"][subject]
        pd, pd_aff = load_volume(pd_path, "IXI PD volume")
        _check_image(pd, pd_path, "IXI PD volume")
        _check_image(load_volume(t1_path, "IXI T1 volume")[0], t1_path, "IXI T1 volume")  # before the slow part
        pd_canon = to_canonical(pd.astype(np.float32), pd_aff)
        head = head_mask(pd_canon.data)
        if not head.any():
            raise DataPreparationError(f"IXI PD volume {pd_path}: no head found (empty image)")
        mirror = self.quality["max_mirror_gain"] is not None
        try:
            t1_on_pd, reg = register_rigid_affine(pd_path, t1_path, mirror_check=mirror, **self.registration)
        except RegistrationError as exc:
            raise DataPreparationError(
                f"IXI subject {subject}: ITK could not register T1 {t1_path} to PD {pd_path} ({exc}); check that "
                "both are 3D head volumes, or move that T1 out of the T1 directory to leave the subject out"
            ) from None
        vols = {"PDw": pd.astype(np.float32), "T1w": t1_on_pd.astype(np.float32)}
        if "T2" in self.files:
            t2, t2_aff = load_volume(self.files["T2"][subject], "IXI T2 volume")
            if t2.shape != pd.shape or not np.allclose(t2_aff, pd_aff, atol=1e-3):
                raise DataPreparationError(f"IXI T2 volume {self.files['T2'][subject]}: not on its PD volume's grid")
            vols["T2w"] = t2.astype(np.float32)
        canon = {k: pd_canon if k == "PDw" else to_canonical(v, pd_aff) for k, v in vols.items()}
        aff = canon["PDw"].affine
        self._check_registration(subject, pd_path, t1_path, reg, head, canon["T1w"].data)
        ks, center = plan_slices(head, aff, preparer)
        grid = preparer.grid
        icoords, jcoords = grid.axes(aff, center)
        sigma = np.r_[grid.antialias_sigma(aff), 0.0]
        images = {k: np.maximum(sample_slices(c.data, ks, icoords, jcoords, sigma), 0) for k, c in canon.items()}
        mask = sample_slices(head.astype(np.float32), ks, icoords, jcoords) > 0.5
        return SubjectSlices(
            subject=subject,
            indices=[canon["PDw"].original_index(k) for k in ks],
            affines=np.stack([grid.slice_affine(aff, center, k) for k in ks]),
            images=images,
            mask=mask.astype(np.uint8),
            label=None,
        )

    def _check_registration(self, subject, pd_path, t1_path, reg, head: np.ndarray, t1: np.ndarray) -> None:
        """Refuse a subject whose registered T1 is not aligned with its PD (limits ``self.quality``)."""
        q = self.quality
        t1_head = head_mask(t1)
        dice = 2.0 * np.logical_and(head, t1_head).sum() / max(1, int(head.sum()) + int(t1_head.sum()))
        gains = reg.mirror_gain
        logger.info(
            "%s: registration metric %.3f, head-mask Dice %.3f, mirror gains %s",
            subject,
            reg.affine_metric,
            dice,
            ", ".join(f"{v:+.3f}" for v in gains.values()) or "not checked",
        )
        bad = []
        if q["max_metric"] is not None and not reg.affine_metric <= q["max_metric"]:
            bad.append(f"final Mattes metric {reg.affine_metric:.3f}, limit {q['max_metric']:g}")
        if q["min_head_dice"] is not None and not dice >= q["min_head_dice"]:
            bad.append(f"head-mask Dice {dice:.3f}, limit {q['min_head_dice']:g}")
        if bad:
            raise DataPreparationError(
                f"IXI subject {subject}: T1 {t1_path} is not aligned with PD {pd_path} after registration "
                f"({'; '.join(bad)}); check that both are this subject's head volumes, or move that T1 out of the "
                "T1 directory to leave the subject out"
            )
        if q["max_mirror_gain"] is not None and gains:
            axis, gain = max(gains.items(), key=lambda item: item[1])
            if gain > q["max_mirror_gain"]:
                raise DataPreparationError(
                    f"IXI subject {subject}: T1 {t1_path} fits PD {pd_path} better mirrored along its voxel axis "
                    f"{axis} (metric gain {gain:.3f}, limit {q['max_mirror_gain']:g}): its orientation header is "
                    "probably wrong; fix that file's affine, or move it out of the T1 directory to leave the subject "
                    "out"
                )


def _check_image(volume: np.ndarray, path: Path, what: str) -> None:
    """One line for an image with nothing to register: non-finite values, or the same value everywhere."""
    if not np.all(np.isfinite(volume)):
        raise DataPreparationError(
            f"{what} {path}: has NaN or infinite values; replace it, or move it out of its folder to leave the "
            "subject out"
        )
    lo, hi = float(np.min(volume)), float(np.max(volume))
    if lo == hi:
        raise DataPreparationError(
            f"{what} {path}: every voxel is {hi:g} (an empty image, nothing to register); replace it, or move it "
            "out of its folder to leave the subject out"
        )


def simulate_volume(
    voxel_mm: float = 4.0,
    size: int = 48,
    subject: str = "sub-01",
    seed: int = 0,
    simulator: MRSimulator | Mapping | None = None,
    mni: Mapping | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """A small 3D simulated head (``mni`` pseudo-subject) with isotropic ``voxel_mm`` voxels.

    Stacks every axial slice of a ``size x size`` grid (``size * voxel_mm`` mm field of view) that holds brain.
    Returns ({contrast: (size, size, n) float32}, 4x4 RAS affine, tissue labels (size, size, n) uint8).
    Used to make synthetic registration problems (and handy for quick 3D experiments).
    """
    preparer = DatasetPreparer(
        "mni",
        dataset_dir="unused",
        seed=seed,
        spatial_size=(size, size),
        fov_mm=size * voxel_mm,
        slice_step_mm=voxel_mm,
        min_brain_fraction=0.0,
        simulator=simulator,
        mni=mni,
    )
    result = preparer.source.prepare(subject, preparer)
    affine = result.affines[0].copy()
    affine[:3, 2] = result.affines[1][:3, 3] - result.affines[0][:3, 3]
    images = {c: np.ascontiguousarray(np.moveaxis(v, 0, -1)) for c, v in result.images.items()}
    return images, affine, np.ascontiguousarray(np.moveaxis(result.label, 0, -1))


def head_mask(volume: np.ndarray) -> np.ndarray:
    """Head (foreground) mask of an MR volume: threshold above the noise, fill holes slice by slice, keep the
    largest connected component."""
    v = np.asarray(volume, dtype=np.float32)
    hi = float(np.percentile(v, 99.5))
    if hi <= 0:
        return np.zeros(v.shape, dtype=bool)
    fg = v > 0.1 * hi
    fg = ndi.binary_opening(fg, iterations=1)
    lab, n = ndi.label(fg)
    if n == 0:
        return fg
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    fg = lab == int(np.argmax(sizes))
    fg = ndi.binary_closing(fg, iterations=2)
    for k in range(fg.shape[2]):
        fg[:, :, k] = ndi.binary_fill_holes(fg[:, :, k])
    return fg


# ----------------------------------------------------------------------------------------------------------------
# the workflow


class DatasetPreparer:
    """Prepare one dataset (``run``) from one source; see the module docstring for the output layout.

    Args:
        source: "mni", "labelmaps" or "ixi".
        dataset_dir: output folder; must not exist unless ``overwrite``.
        seed: the whole dataset is a deterministic function of the inputs and this seed.
        spatial_size: output slice size (pixels).
        fov_mm: field of view of the larger side (pixel size = fov_mm / max(spatial_size)).
        slice_step_mm: distance between chosen axial slices.
        min_brain_fraction: keep slices whose brain area (head area for ixi) is at least this fraction of the
            subject's largest.
        max_slices_per_subject: evenly thin the chosen slices to at most this many (None: no limit).
        simulator: ``scripts.simulation.MRSimulator`` (or its keyword arguments).
        mni / labelmaps / ixi: keyword arguments of ``MNISource`` / ``LabelMapSource`` / ``IXISource``; only the
            chosen source's are used.
        overwrite: replace an existing ``dataset_dir``.
        name: dataset name in the datalist.
    """

    def __init__(
        self,
        source: str,
        dataset_dir: str,
        seed: int = 0,
        spatial_size: Sequence[int] = (128, 128),
        fov_mm: float = 256.0,
        slice_step_mm: float = 2.0,
        min_brain_fraction: float = 0.3,
        max_slices_per_subject: int | None = None,
        simulator: MRSimulator | Mapping | None = None,
        mni: Mapping | None = None,
        labelmaps: Mapping | None = None,
        ixi: Mapping | None = None,
        overwrite: bool = False,
        name: str | None = None,
    ):
        # nothing is checked here (a config parser would bury the message): ``run`` checks everything first
        self.source_name = source
        self.dataset_dir = dataset_dir
        self.seed = seed
        self.spatial_size = spatial_size
        self.fov_mm = fov_mm
        self.slice_step_mm = slice_step_mm
        self.min_brain_fraction = min_brain_fraction
        self.max_slices_per_subject = max_slices_per_subject
        self.simulator = simulator
        self.overwrite = bool(overwrite)
        self.name = name or f"brain_mri_zero_shot_translation-{source}"
        self._options = {"mni": mni, "labelmaps": labelmaps, "ixi": ixi}
        self._source: _Source | None = None
        self._checked = False

    def check(self) -> None:
        """Check the arguments (not yet the input files); errors are one-line ``DataPreparationError``."""
        if self._checked:
            return
        if self.source_name not in SOURCES:
            raise DataPreparationError(f"source '{self.source_name}' is not one of: {', '.join(SOURCES)}")
        if self.dataset_dir is None or str(self.dataset_dir) == "":
            raise DataPreparationError("dataset_dir: no output directory given")
        try:
            size = tuple(int(s) for s in self.spatial_size)
        except (TypeError, ValueError):
            size = ()
        if len(size) != 2 or min(size) < 8:
            raise DataPreparationError(f"spatial_size {self.spatial_size}: expected two sizes of at least 8 pixels")
        if not 0 <= float(self.min_brain_fraction) <= 1:
            raise DataPreparationError(f"min_brain_fraction {self.min_brain_fraction}: expected a value in [0, 1]")
        if float(self.fov_mm) <= 0 or float(self.slice_step_mm) <= 0:
            raise DataPreparationError(f"fov_mm {self.fov_mm} / slice_step_mm {self.slice_step_mm}: must be positive")
        self.dataset_dir = Path(self.dataset_dir)
        self.seed = int(self.seed)
        self.grid = SliceGrid(size, float(self.fov_mm) / max(size))
        self.slice_step_mm = float(self.slice_step_mm)
        self.min_brain_fraction = float(self.min_brain_fraction)
        if self.max_slices_per_subject is not None:
            self.max_slices_per_subject = int(self.max_slices_per_subject)
        if self.simulator is None or isinstance(self.simulator, Mapping):
            try:
                self.simulator = MRSimulator(**dict(self.simulator or {}))
            except (TypeError, ValueError) as exc:
                raise DataPreparationError(f"simulator: {exc}") from exc
        self._checked = True

    @property
    def source(self) -> _Source:
        """The source object (built, and its inputs checked, on first use)."""
        if self._source is None:
            self.check()
            opts = dict(self._options[self.source_name] or {})
            cls = {"mni": MNISource, "labelmaps": LabelMapSource, "ixi": IXISource}[self.source_name]
            try:
                self._source = cls(**opts)
            except TypeError as exc:
                raise DataPreparationError(f"{self.source_name} options: {exc}") from exc
        return self._source

    def rng(self, subject: str) -> np.random.Generator:
        return subject_rng(self.seed, subject)

    def run(self) -> Path:
        """Write the dataset atomically; returns ``dataset_dir``.

        An existing ``dataset_dir`` is only replaced when it is empty or holds nothing but a dataset this bundle
        wrote (and then only with ``overwrite``); anything else is refused and left unchanged.
        """
        self.check()
        out = self.dataset_dir
        check_replaceable(out, "dataset", _refusal("dataset_dir", out))
        if out.is_dir() and any(out.iterdir()) and not self.overwrite:
            raise DataPreparationError(f"dataset_dir {out}: already exists (set overwrite to true to replace it)")
        source = self.source  # checks the inputs before anything is written
        split = source.subjects()
        both = set(split["training"]) & set(split["testing"])
        if both:
            raise DataPreparationError(f"{self.source_name}: subjects {sorted(both)} are in both splits")
        result = {}

        def write(staging: Path) -> None:
            result["datalist"] = self._write(staging, source, split)
            with open(staging / "datalist.json", "w") as f:
                json.dump(result["datalist"], f, indent=2)

        write_staged(out, "dataset", write, _refusal("dataset_dir", out))
        n = {k: len(result["datalist"][k]) for k in ("training", "source_training", "testing")}
        logger.info("wrote %s: %s", out, ", ".join(f"{v} {k}" for k, v in n.items()))
        return out

    def _write(self, root: Path, source: _Source, split: dict[str, list[str]]) -> dict:
        entries: dict[str, list[dict]] = {"training": [], "source_training": [], "testing": []}
        subjects = [(s, "training") for s in split["training"]] + [(s, "testing") for s in split["testing"]]
        for subject, part in tqdm(subjects, desc=f"prepare {self.source_name}", unit="subject"):
            result = source.prepare(subject, self)
            if not result.indices:
                logger.warning("%s: no slice with enough brain/head, subject left out", subject)
                continue
            for e in self._write_subject(root, result):
                if part == "training":
                    entries["training"].append({"image": e["T1w"], "subject": subject, "slice": e["slice"]})
                    entries["source_training"].append({"image": e["PDw"], "subject": subject, "slice": e["slice"]})
                else:
                    item = {"image": e["PDw"], "target": e["T1w"]}
                    if "T2w" in e:
                        item["t2"] = e["T2w"]
                    if "dseg" in e:
                        item["label"] = e["dseg"]
                    item.update({"mask": e["mask"], "subject": subject, "slice": e["slice"]})
                    entries["testing"].append(item)
            logger.info("%s (%s): %d slices", subject, part, len(result.indices))
        return {
            "name": self.name,
            "description": (
                f"Paired 2D axial brain MR slices (PDw source, T1w target, T2w) from the '{self.source_name}' "
                "source; 'training' holds target (T1w) images of training subjects only, 'source_training' their "
                "PDw slices, 'testing' paired slices of the test subjects."
            ),
            "source": self.source_name,
            "source_modality": "PDw",
            "target_modality": "T1w",
            "spatial_size": list(self.grid.size),
            "pixel_mm": self.grid.pixel_mm,
            "seed": self.seed,
            "mask_type": source.mask_type,
            "subjects": {k: list(v) for k, v in split.items()},
            "labels": {str(k): v for k, v in CLASS_NAMES.items()},
            **entries,
        }

    @staticmethod
    def _write_subject(root: Path, result: SubjectSlices) -> list[dict]:
        folder = root / "slices" / result.subject
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for n, k in enumerate(result.indices):
            stem = f"{result.subject}_slice-{k:03d}"
            arrays = {c: img[n] for c, img in result.images.items()}
            if result.label is not None:
                arrays["dseg"] = result.label[n]
            arrays["mask"] = result.mask[n]
            row = {"slice": int(k)}
            for kind, arr in arrays.items():
                rel = f"slices/{result.subject}/{stem}_{kind}.nii.gz"
                save_slice(root / rel, arr, result.affines[n])
                row[kind] = rel
            rows.append(row)
        return rows


def prepare_dataset(preparer: DatasetPreparer) -> Path:
    """Entry point of ``configs/prepare.json``: ``preparer.run()``, with bad input reported as one line.

    A ``DataPreparationError`` is logged and turned into ``SystemExit`` with its message (exit status 1, no
    traceback: the message names the file or argument and the problem); other errors propagate unchanged. SIGTERM
    also ends in ``SystemExit`` after the staging folder is removed. Call ``DatasetPreparer.run`` directly to get
    the exception instead.
    """
    return _one_line("data preparation", preparer.run)


def save_slice(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    """Write a 2D slice as NIfTI with its 4x4 world affine (sform and qform, mm)."""
    img = nib.Nifti1Image(np.ascontiguousarray(array), affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))


# ----------------------------------------------------------------------------------------------------------------
# figure


def save_examples_figure(
    out_path: str | os.PathLike,
    datasets: Mapping[str, str | os.PathLike],
    rows_per_dataset: Mapping[str, int] | None = None,
    split: str = "testing",
) -> Path:
    """Plot PDw, T1w, T2w and tissue labels of a few slices from several subjects of written datasets.

    Args:
        out_path: PNG to write.
        datasets: title -> dataset_dir (written by ``DatasetPreparer``).
        rows_per_dataset: title -> number of rows (slices; each row a different subject where possible).
        split: "testing" (paired entries with labels) is the split that has every image.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    rows = []
    for title, ddir in datasets.items():
        ddir = Path(ddir)
        with open(ddir / "datalist.json") as f:
            dl = json.load(f)
        items = dl[split]
        n_rows = (rows_per_dataset or {}).get(title, 2)
        by_subject: dict[str, list[dict]] = {}
        for it in items:
            by_subject.setdefault(it["subject"], []).append(it)
        subj = sorted(by_subject)
        for r in range(n_rows):
            its = by_subject[subj[r % len(subj)]]
            frac = (0.35, 0.6, 0.8, 0.5, 0.7)[r % 5]
            it = its[int(frac * (len(its) - 1))]
            rows.append((title, it, ddir))
    cmap = ListedColormap([[0, 0, 0], [0.2, 0.4, 1.0], [0.6, 0.6, 0.6], [1.0, 1.0, 0.85]])
    fig, axes = plt.subplots(len(rows), 4, figsize=(8, 2.1 * len(rows)), squeeze=False)
    for r, (title, it, ddir) in enumerate(rows):
        for c, (key, name) in enumerate((("image", "PDw"), ("target", "T1w"), ("t2", "T2w"), ("label", "labels"))):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if key not in it:
                ax.set_facecolor("k")
                continue
            a = np.asarray(nib.load(str(ddir / it[key])).dataobj)
            img = np.rot90(a)  # canonical RAS array -> anterior up, subject's right on the right
            if key == "label":
                ax.imshow(img, cmap=cmap, vmin=0, vmax=3, interpolation="nearest")
            else:
                ax.imshow(img, cmap="gray", vmin=0, vmax=float(np.percentile(a, 99.5)), interpolation="nearest")
            if r == 0:
                ax.set_title(name, fontsize=10)
            if c == 0:
                ax.set_ylabel(f"{title}\n{it['subject']} z{it['slice']}", fontsize=8)
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=80)
    plt.close(fig)
    return out_path


def make_demo_input(datalist: str | os.PathLike, output_dir: str | os.PathLike, count: int = 4) -> Path:
    """Copy `count` test slices of a prepared dataset into `output_dir`: the source, and for the figure and the
    quick evaluation only, the target, the tissue labels and the brain mask.

    This is how the shipped demo input (``demo/``) was made from the offline ``mni`` source; the translation never
    reads the target. The folder is written next to `output_dir` and renamed onto it; an existing `output_dir` is
    only replaced when it is empty or holds nothing but a demo input this function wrote (else
    ``DataPreparationError``, nothing changed).
    """
    datalist = Path(datalist)
    if not datalist.is_file():
        raise InputNotFoundError(f"datalist {datalist}: file does not exist")
    try:
        content = json.loads(datalist.read_text())
    except (OSError, ValueError):
        content = None
    testing = content.get("testing") if isinstance(content, dict) else None
    if not isinstance(testing, list):
        raise DataPreparationError(f"datalist {datalist}: not a JSON datalist with a 'testing' list")
    count = int(count)
    if count < 1 or len(testing) < count:
        raise DataPreparationError(f"datalist {datalist}: {len(testing)} testing entries, {count} asked for")
    for i, entry in enumerate(testing):
        if not isinstance(entry, dict) or not {"image", "subject", "slice"} <= set(entry):
            raise DataPreparationError(f"datalist {datalist}: testing entry {i} lacks 'image', 'subject' or 'slice'")
    output = Path(output_dir)
    check_replaceable(output, "demo", _refusal("output_dir", output))
    by_subject: dict[str, list[dict]] = {}
    for entry in testing:
        by_subject.setdefault(entry["subject"], []).append(entry)
    per_subject = max(1, -(-count // len(by_subject)))  # mid-brain slices of each subject, not the skull base
    fractions = [0.45 + 0.25 * i / max(1, per_subject - 1) for i in range(per_subject)]
    picked = [
        sorted(entries, key=lambda e: e["slice"])[int(f * (len(entries) - 1))]
        for entries in by_subject.values()
        for f in fractions
    ][:count]
    for entry in picked:
        for key in DEMO_KEYS:
            if key in entry and not (datalist.parent / entry[key]).is_file():
                raise InputNotFoundError(f"datalist {datalist}: {key} {datalist.parent / entry[key]} does not exist")
    entries = []

    def write(staging: Path) -> None:
        for entry in picked:
            names = {}
            for key in DEMO_KEYS:
                if key in entry:
                    source = datalist.parent / entry[key]
                    shutil.copyfile(source, staging / source.name)
                    names[key] = source.name
            entries.append({**names, "subject": entry["subject"], "slice": entry["slice"]})
        demo = {"name": "demo input (PDw slices simulated from the MNI152 2009a template)", "testing": entries}
        (staging / "datalist.json").write_text(json.dumps(demo, indent=2))

    write_staged(output, "demo", write, _refusal("output_dir", output))
    logger.info(f"wrote {len(entries)} demo slices to {output}")
    return output


def make_demo(datalist: str | os.PathLike, output_dir: str | os.PathLike, count: int = 4) -> Path:
    """Entry point of ``configs/make_demo.json``: ``make_demo_input`` with bad input reported as one line (exit
    status 1) and SIGTERM as ``SystemExit`` after clean-up."""
    return _one_line("making the demo input", make_demo_input, datalist, output_dir, count)
