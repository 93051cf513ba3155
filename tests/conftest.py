"""Shared test fixtures: where ``../shared/data`` is (skip cleanly when it is absent) and small helpers."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(__file__).parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """``../shared/data`` next to the bundle; tests that need it skip with a reason when it is absent."""
    path = SHARED_DIR / "data"
    if not path.is_dir():
        pytest.skip(f"{path} is absent (real fixtures and label maps live outside the repo)")
    return path


# an oblique-free but non-RAS orientation like SynthSeg's maps (L, I, A), 2 mm voxels
LIA_AFFINE = np.array([[-2.0, 0, 0, 40], [0, 0, 2.0, -40], [0, -2.0, 0, 50], [0, 0, 0, 1]])


def make_label_map(path: Path, shape=(40, 44, 40), affine=LIA_AFFINE, extra_label: int | None = None) -> Path:
    """A small synthetic FreeSurfer-style head: nested ellipsoids (scalp, skull, CSF, cortex, WM), a ventricle
    and a grey blob off-centre so that flips and axis swaps are visible. Centred in world coordinates."""
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(float)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    centre = world.reshape(-1, 3).mean(0)
    x, y, z = np.moveaxis(world - centre, -1, 0)

    def ell(ax, ay, az, cx=0.0, cy=0.0, cz=0.0):
        return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 + ((z - cz) / az) ** 2 <= 1

    lab = np.zeros(shape, dtype=np.int16)
    lab[ell(34, 40, 34)] = 511
    lab[ell(30, 36, 30)] = 515
    lab[ell(25, 31, 25)] = 24
    lab[ell(23, 29, 23)] = 3
    lab[ell(17, 23, 17, cx=2)] = 2
    lab[ell(4, 10, 6, cx=5, cz=4)] = 4
    lab[ell(5, 5, 5, cx=-8, cy=12, cz=-6)] = 10
    if extra_label is not None:
        lab[tuple(s // 2 for s in shape)] = extra_label
    nib.save(nib.Nifti1Image(lab, affine), str(path))
    return path


@pytest.fixture(scope="session")
def label_map_factory():
    """``make_label_map(path, shape=..., affine=..., extra_label=None)``: write a synthetic label map."""
    return make_label_map
