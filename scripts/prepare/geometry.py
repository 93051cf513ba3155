"""Slice geometry: volumes in RAS axis order, the 2D output grid, world/voxel maps, and which axial slices to cut.

Every written slice is an axial plane of its source volume, resampled in-plane onto ``SliceGrid`` (square pixels
centred on the brain) with a 4x4 affine mapping pixel (i, j, 0) to the world (RAS mm) position of that point, so
the slices of all sources share one convention: array axis 0 runs from the subject's left to right (R), axis 1 from
posterior to anterior (A). A training source may also cut coronal or sagittal planes (``to_canonical(plane=...)``;
in-plane axes (R, S) and (A, S)) or axial planes of a rotated head (``tilt``): more distinct 2D anatomy from the same
heads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

if TYPE_CHECKING:
    from scripts.prepare.preparer import DatasetPreparer

__all__ = [
    "PLANE_AXES",
    "Canonical",
    "SliceGrid",
    "plan_slices",
    "sample_slices",
    "select_slices",
    "tilt",
    "to_canonical",
    "voxel_to_world",
    "world_to_voxel",
]


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


# slicing plane -> order of the RAS axes in the returned array: the plane's normal comes last (axis 2)
PLANE_AXES: dict[str, tuple[int, int, int]] = {"axial": (0, 1, 2), "coronal": (0, 2, 1), "sagittal": (1, 2, 0)}


def tilt(canon: Canonical, pitch_deg: float, roll_deg: float, centre_vox: Sequence[float]) -> Canonical:
    """``canon`` rotated by ``pitch_deg`` about axis 0 and ``roll_deg`` about axis 1 (degrees in world space, so
    anisotropic voxels are fine) around the voxel ``centre_vox``: its slices along axis 2 are oblique planes of the
    original volume. Nearest neighbour, so label volumes stay labels; the affine follows, so every voxel keeps its
    exact world position. Slice indices of the result no longer name planes of the original array."""
    a, b = np.deg2rad([float(pitch_deg), float(roll_deg)])
    about_0 = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    about_1 = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    scale = np.linalg.norm(canon.affine[:3, :3], axis=0)
    rotation = (about_0 @ about_1) * scale[None, :] / scale[:, None]  # in voxels: S^-1 R S
    centre = np.asarray(centre_vox, dtype=np.float64)
    offset = centre - rotation @ centre
    data = ndi.affine_transform(canon.data, rotation, offset=offset, order=0, mode="constant", cval=0)
    to_source = np.eye(4)
    to_source[:3, :3], to_source[:3, 3] = rotation, offset
    return Canonical(data, canon.affine @ to_source, canon.axial_axis, canon.axial_flipped, canon.axial_length)


def to_canonical(data: np.ndarray, affine: np.ndarray, plane: str = "axial") -> Canonical:
    """Permute/flip the array to RAS+ axis order (no resampling); the affine follows exactly.

    ``plane`` other than "axial" permutes the RAS axes so that this plane's normal becomes axis 2 (the axis the
    slices are cut along): coronal -> (R, S, A), sagittal -> (A, S, R).
    """
    if plane not in PLANE_AXES:
        raise ValueError(f"slicing plane '{plane}': choose one of {', '.join(PLANE_AXES)}")
    order = PLANE_AXES[plane]
    ornt = nib.orientations.io_orientation(affine)
    data_c = np.transpose(nib.orientations.apply_orientation(data, ornt), order)
    affine_c = affine @ nib.orientations.inv_ornt_aff(ornt, data.shape)
    affine_c[:, :3] = affine_c[:, list(order)]
    axis = int(np.flatnonzero(ornt[:, 0] == order[2])[0])
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
