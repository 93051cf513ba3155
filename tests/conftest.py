"""Fixtures shared by the test modules: where ``../shared/data`` is (skip cleanly when it is absent), synthetic label
maps, and the tiny dataset and tiny trained translator of the workflow tests. Plain helpers (``bundle_run``, the tiny
settings, ...) are in helpers.py; test modules import those, never another test module."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import BUNDLE_ROOT, TRAIN, bundle_run, save_slice, train_overrides
from phantoms import phantom

SHARED_DIR = BUNDLE_ROOT.parent / "shared"
# benchmarks/ (compare.py, training_report.py) is importable by the tests, as the bundle runs it: as scripts
sys.path.insert(0, str(BUNDLE_ROOT / "benchmarks"))


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


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """Six target-only training slices and two paired test slices, in the prepare workflow's datalist layout."""
    root = tmp_path_factory.mktemp("tiny_dataset")
    datalist = {"training": [], "source_training": [], "testing": []}
    for i in range(6):
        t1 = phantom(32, seed=i)[0, 0].numpy()
        labels = np.digitize(t1, [0.05, 0.3, 0.7]).astype(np.float32)
        datalist["training"].append({"image": save_slice(t1 * 800, root / f"train_{i}_T1w.nii.gz"), "subject": "s1"})
        # the training subjects' source slices with their siblings, as the prepare workflow writes them (validation)
        pd = save_slice(np.where(t1 > 0, 1.1 - t1, 0) * 900, root / f"train_{i}_PDw.nii.gz")
        save_slice(labels, root / f"train_{i}_dseg.nii.gz")
        save_slice((labels > 0).astype(np.float32), root / f"train_{i}_mask.nii.gz")
        datalist["source_training"].append({"image": pd, "subject": "s1"})
    for i in range(2):
        t1 = phantom(32, seed=10 + i)[0, 0].numpy()
        pd = np.where(t1 > 0, 1.1 - t1, 0)
        labels = np.digitize(t1, [0.05, 0.3, 0.7]).astype(np.float32)
        datalist["testing"].append(
            {
                "image": save_slice(pd * 900, root / f"test_{i}_pd.nii.gz"),
                "target": save_slice(t1 * 800, root / f"test_{i}_t1.nii.gz"),
                "label": save_slice(labels, root / f"test_{i}_label.nii.gz"),
                "mask": save_slice((labels > 0).astype(np.float32), root / f"test_{i}_mask.nii.gz"),
                "subject": "s2",
            }
        )
    (root / "datalist.json").write_text(json.dumps(datalist))
    return root


@pytest.fixture(scope="session")
def tiny_model(tiny_dataset, tmp_path_factory) -> Path:
    """The tiny translator (helpers.TINY) trained one epoch on `tiny_dataset` through configs/train.json, once per
    session: the weights every inference test translates with."""
    models = tmp_path_factory.mktemp("tiny_models")
    bundle_run(TRAIN, *train_overrides(tiny_dataset, models, epochs=1), "--val_interval", "100")
    return models / "model.pt"
