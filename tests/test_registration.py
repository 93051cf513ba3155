"""ITK registration (rigid then affine, Mattes MI) on a small synthetic PD/T1 pair misaligned by a known rigid
transform (recovery within 1 mm and 1 degree), and the ``ixi`` source end to end on synthetic IXI-named files."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from helpers import TINY_IXI
from scipy import ndimage as ndi

from scripts.prepare import DatasetPreparer, IXISource, simulate_volume
from scripts.prepare.registration import register_rigid_affine, rotation_angle_deg

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # ITK physical space = RAS flipped in x and y


def _rotation(axis: int, deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(4)
    r[i, i] = r[j, j] = np.cos(a)
    r[i, j], r[j, i] = -np.sin(a), np.sin(a)
    return r


# the known misalignment (RAS): 6 deg about z, -4 deg about x, shifted (5, -4, 3) mm
MISALIGN = _rotation(2, 6.0) @ _rotation(0, -4.0)
MISALIGN[:3, 3] = [5.0, -4.0, 3.0]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """PD (fixed) and T1 (moving) from one simulated head, 4 mm voxels (48 x 48 x ~43), noisy, different bias
    fields; the T1 file's affine is the PD affine moved by MISALIGN (same voxels: the truth is exact)."""
    images, affine, label = simulate_volume(voxel_mm=4.0, size=48, subject="sub-01", seed=0)
    d = tmp_path_factory.mktemp("pair")
    nib.save(nib.Nifti1Image(images["PDw"], affine), str(d / "pd.nii.gz"))
    nib.save(nib.Nifti1Image(images["T1w"], MISALIGN @ affine), str(d / "t1.nii.gz"))
    return d, images, affine, label


def test_rigid_affine_recovers_known_transform(pair):
    d, images, affine, label = pair
    t1_on_pd, result = register_rigid_affine(d / "pd.nii.gz", d / "t1.nii.gz", sampling=0.5, iterations=100)
    truth = LPS @ MISALIGN @ LPS  # fixed -> moving physical points, LPS
    brain = np.argwhere(label > 0)
    pts = LPS @ affine @ np.c_[brain, np.ones(len(brain))].T
    for m in (result.rigid_matrix, result.matrix):
        err = np.linalg.norm((m @ pts - truth @ pts)[:3], axis=0)
        assert err.max() < 1.0, f"max error {err.max():.2f} mm"
        assert rotation_angle_deg(m[:3, :3] @ np.linalg.inv(truth[:3, :3])) < 1.0
    # the moving image resampled on the fixed grid is the aligned T1 again
    assert t1_on_pd.shape == images["T1w"].shape
    r = np.corrcoef(t1_on_pd[label > 0], images["T1w"][label > 0])[0, 1]
    assert r > 0.98


def test_ixi_source_end_to_end(tmp_path, pair):
    d, images, affine, _ = pair
    pd_dir, t1_dir = tmp_path / "IXI-PD", tmp_path / "IXI-T1"
    pd_dir.mkdir()
    t1_dir.mkdir()
    for sid in ("IXI900-Test-0001", "IXI901-Test-0002"):
        shutil.copy(d / "pd.nii.gz", pd_dir / f"{sid}-PD.nii.gz")
        shutil.copy(d / "t1.nii.gz", t1_dir / f"{sid}-T1.nii.gz")
    (pd_dir / "IXI902-Test-0003-PD.nii.gz").write_bytes((d / "pd.nii.gz").read_bytes())  # no T1: skipped
    source = IXISource(
        pd_dir=pd_dir, t1_dir=t1_dir, test_fraction=0.5, registration={"sampling": 0.5, "iterations": 100}
    )
    out = DatasetPreparer(source, tmp_path / "ds", **TINY_IXI).run()
    dl = json.loads((out / "datalist.json").read_text())
    assert dl["source"] == "ixi" and dl["mask_type"] == "head"
    assert dl["subjects"] == {"training": ["IXI900"], "testing": ["IXI901"]}
    assert len(dl["testing"]) == 3 and len(dl["training"]) == 3
    inv = np.linalg.inv(affine)
    for e in dl["testing"]:
        assert set(e) == {"image", "target", "mask", "subject", "slice"}  # no label, no t2 for IXI
        t1 = nib.load(out / e["target"])
        mask = np.asarray(nib.load(out / e["mask"]).dataobj)
        assert mask.dtype == np.uint8 and 0.1 < mask.mean() < 0.9
        # the written T1w slice is the *aligned* T1 at the slice's world positions
        ij = np.stack(np.meshgrid(np.arange(32), np.arange(32), indexing="ij"), -1).reshape(-1, 2)
        world = t1.affine @ np.c_[ij, np.zeros(len(ij)), np.ones(len(ij))].T
        ref = ndi.map_coordinates(images["T1w"], (inv @ world)[:3], order=1).reshape(32, 32)
        got = np.asarray(t1.dataobj)
        head = mask > 0
        assert np.corrcoef(got[head], ref[head])[0, 1] > 0.9
