"""Data preparation: datalist schema and MONAI loading, split disjointness, affines, bad input, atomic output,
and one end-to-end ``monai.bundle run`` of configs/prepare.json (tiny mni configuration)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import BUNDLE_ROOT, bundle_run
from monai.bundle import ConfigParser
from monai.data import load_decathlon_datalist
from monai.transforms import LoadImage

from scripts.prepare import (
    DataPreparationError,
    DatasetPreparer,
    InputNotFoundError,
    IXISource,
    LabelMapSource,
    MNISource,
    prepare_dataset,
)

TINY = {"spatial_size": (32, 32), "fov_mm": 96.0, "slice_step_mm": 4.0, "max_slices_per_subject": 3}
TINY_MNI = {"spatial_size": (64, 64), "max_slices_per_subject": 3}
TEST_KEYS = {"image", "target", "t2", "label", "mask", "subject", "slice"}


def _mni(out, **kw) -> DatasetPreparer:
    return DatasetPreparer(MNISource(num_training=2, num_testing=1), out, **{**TINY_MNI, **kw})


def _config_preparer(**overrides) -> DatasetPreparer:
    """The preparer of configs/prepare.json, as ``monai.bundle run`` builds it, with `overrides` (``--key value``)."""
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "prepare.json"))
    parser["bundle_root"] = str(BUNDLE_ROOT)
    for key, value in overrides.items():
        parser[key] = value
    return parser.get_parsed_content("preparer")


@pytest.fixture(scope="module")
def mni_dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mni") / "dataset"
    return _mni(out, seed=0).run()


@pytest.fixture
def labelmap_dir(tmp_path, label_map_factory) -> Path:
    d = tmp_path / "maps"
    d.mkdir()
    for i in (1, 2, 3):
        label_map_factory(d / f"seg_{i:02d}.nii.gz")
    (d / "labels_table.txt").write_text("not a label map, ignored\n")
    return d


def _labelmaps(directory, out, training=("01", "02"), testing=("03",), **kw):
    source = LabelMapSource(directory=str(directory), training=list(training), testing=list(testing))
    return DatasetPreparer(source, out, **{**TINY, **kw})


def test_datalist_schema_and_splits(mni_dataset):
    dl = json.loads((mni_dataset / "datalist.json").read_text())
    assert dl["source"] == "mni" and dl["source_modality"] == "PDw" and dl["target_modality"] == "T1w"
    assert dl["spatial_size"] == [64, 64] and dl["seed"] == 0 and dl["mask_type"] == "brain"
    assert dl["labels"] == {"0": "background", "1": "CSF", "2": "GM", "3": "WM"}
    train, test = dl["subjects"]["training"], dl["subjects"]["testing"]
    assert train == ["sub-01", "sub-02"] and test == ["sub-03"] and not set(train) & set(test)
    assert {e["subject"] for e in dl["training"]} == set(train)
    assert {e["subject"] for e in dl["source_training"]} == set(train)
    assert {e["subject"] for e in dl["testing"]} == set(test)
    assert all(set(e) == {"image", "subject", "slice"} for e in dl["training"] + dl["source_training"])
    assert all(e["image"].endswith("_T1w.nii.gz") for e in dl["training"])
    assert all(e["image"].endswith("_PDw.nii.gz") for e in dl["source_training"])
    for e in dl["testing"]:
        assert set(e) == TEST_KEYS
        assert e["image"].endswith("_PDw.nii.gz") and e["target"].endswith("_T1w.nii.gz")
        assert e["t2"].endswith("_T2w.nii.gz") and e["label"].endswith("_dseg.nii.gz")
    assert len(dl["training"]) == 6 and len(dl["testing"]) == 3
    assert not any(p.name.startswith(".") for p in mni_dataset.parent.iterdir())  # no temporary folder left


def test_datalist_loads_with_monai(mni_dataset):
    path = str(mni_dataset / "datalist.json")
    for key in ("training", "source_training", "testing"):
        items = load_decathlon_datalist(path, data_list_key=key, base_dir=str(mni_dataset))
        assert items
        for it in items:
            assert it["subject"].startswith("sub-")  # not mistaken for a path
            for k in ("image", "target", "t2", "label", "mask"):
                if k in it:
                    assert Path(it[k]).is_file(), it[k]
    it = load_decathlon_datalist(path, data_list_key="testing", base_dir=str(mni_dataset))[0]
    img = LoadImage(image_only=True)(it["image"])
    assert tuple(img.shape) == (64, 64)
    pd = np.asarray(img)
    lab = np.asarray(nib.load(it["label"]).dataobj)
    mask = np.asarray(nib.load(it["mask"]).dataobj)
    assert pd.dtype == np.float32 and pd.min() >= 0
    assert lab.dtype == np.uint8 and set(np.unique(lab)) <= {0, 1, 2, 3} and {1, 2, 3} <= set(np.unique(lab))
    assert np.array_equal(mask, (lab > 0).astype(np.uint8))


def test_mni_slice_geometry(mni_dataset):
    dl = json.loads((mni_dataset / "datalist.json").read_text())
    e = dl["testing"][0]
    aff = nib.load(mni_dataset / e["image"]).affine
    pixel = 256.0 / 64
    assert np.allclose(np.abs(aff[:3, :2]), np.diag([pixel, pixel, 0])[:, :2])  # axial plane, 4 mm pixels
    assert np.allclose(aff[:3, 2], [0, 0, 1])
    # slice numbers refer to the template array: world z = -72 mm + index (MNI152 2009a, 1 mm)
    assert aff[2, 3] == pytest.approx(-72.0 + e["slice"])


def _source_voxels(label_slice: nib.Nifti1Image, source: nib.Nifti1Image) -> np.ndarray:
    """Voxel coordinates ``(3, H * W)`` in `source`'s array of every pixel of a written slice (through both affines)."""
    h, w = label_slice.shape[:2]
    ij = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), -1).reshape(-1, 2)
    world = label_slice.affine @ np.c_[ij, np.zeros(len(ij)), np.ones(len(ij))].T
    return (np.linalg.inv(source.affine) @ world)[:3]


def _label_agreement(label_slice: nib.Nifti1Image, source: nib.Nifti1Image, vox: np.ndarray) -> float:
    """Fraction of the slice's pixels inside the source whose class equals the source label map's class there
    (the factory's labels: 24/4 CSF, 3/10 GM, 2 WM)."""
    src_lab = np.asarray(source.dataobj)
    classes = np.select([np.isin(src_lab, [24, 4]), np.isin(src_lab, [3, 10]), src_lab == 2], [1, 2, 3], 0)
    vox = np.rint(vox).astype(int)
    inside = np.all((vox >= 0) & (vox < np.array(src_lab.shape)[:, None]), axis=0)
    return float(np.mean(np.asarray(label_slice.dataobj).reshape(-1)[inside] == classes[tuple(vox[:, inside])]))


def test_labelmap_affines_match_volume(tmp_path, labelmap_dir):
    out = _labelmaps(labelmap_dir, tmp_path / "ds", max_slices_per_subject=None, min_brain_fraction=0.5).run()
    dl = json.loads((out / "datalist.json").read_text())
    src = nib.load(labelmap_dir / "seg_03.nii.gz")
    agree = []
    for e in dl["testing"]:
        img = nib.load(out / e["label"])
        vox = _source_voxels(img, src)
        assert np.all(np.rint(vox[1]) == e["slice"])  # the source's axial axis is array axis 1 (L, I, A)
        agree.append(_label_agreement(img, src, vox))
    assert len(agree) >= 3 and np.mean(agree) > 0.85


@pytest.mark.parametrize("plane, source_axis", [("coronal", 2), ("sagittal", 0)])
def test_labelmap_training_planes(tmp_path, labelmap_dir, plane, source_axis):
    """`training_planes` cuts the training subjects along other planes too, as pseudo-subjects; each slice is the
    plane it claims (constant along the source's axis normal to it; LIA: A is array axis 2, L axis 0), its labels
    agree with the source's, and the test subjects stay axial."""
    source = LabelMapSource(
        directory=str(labelmap_dir), training=["01"], testing=["03"], training_planes=["axial", plane]
    )
    assert source.subjects() == {"training": ["sub-01", f"sub-01-{plane}"], "testing": ["sub-03"]}
    out = DatasetPreparer(source, tmp_path / "ds", **{**TINY, "max_slices_per_subject": None}).run()
    dl = json.loads((out / "datalist.json").read_text())
    assert {e["subject"] for e in dl["training"]} == {"sub-01", f"sub-01-{plane}"}
    assert {e["subject"] for e in dl["testing"]} == {"sub-03"}
    src = nib.load(labelmap_dir / "seg_01.nii.gz")
    planar = [e for e in dl["training"] if e["subject"] == f"sub-01-{plane}"]
    agree = []
    for e in planar:
        img = nib.load(out / e["image"].replace("_T1w.nii.gz", "_dseg.nii.gz"))
        vox = _source_voxels(img, src)
        assert np.all(np.rint(vox[source_axis]) == e["slice"])
        agree.append(_label_agreement(img, src, vox))
    assert len(planar) >= 3 and np.mean(agree) > 0.85


def test_labelmap_training_tilts(tmp_path, labelmap_dir):
    """`training_tilts_deg` adds axial cuts of the rotated head: oblique planes of the source (its axial axis, LIA
    array axis 1, varies across each slice) whose labels still agree with the source's at every world position."""
    source = LabelMapSource(directory=str(labelmap_dir), training=["01"], testing=[], training_tilts_deg=[[20, 0]])
    assert source.subjects() == {"training": ["sub-01", "sub-01-tilt1"], "testing": []}
    out = DatasetPreparer(source, tmp_path / "ds", **{**TINY, "max_slices_per_subject": None}).run()
    dl = json.loads((out / "datalist.json").read_text())
    src = nib.load(labelmap_dir / "seg_01.nii.gz")
    tilted = [e for e in dl["training"] if e["subject"] == "sub-01-tilt1"]
    agree = []
    for e in tilted:
        img = nib.load(out / e["image"].replace("_T1w.nii.gz", "_dseg.nii.gz"))
        vox = _source_voxels(img, src)
        axial = vox[1].reshape(img.shape[:2])
        assert np.ptp(axial[16, :]) > 8  # oblique: the source's axial position changes from back to front...
        assert np.ptp(axial[:, 16]) < 1e-6  # ... not from left to right (a pitch is about the left-right axis)
        agree.append(_label_agreement(img, src, vox))
    assert len(tilted) >= 3 and np.mean(agree) > 0.85


@pytest.mark.parametrize(
    "option, match",
    [
        ({"training_planes": ["axial", "oblique"]}, "training_planes"),
        ({"training_planes": []}, "training_planes"),
        ({"training_planes": ["axial", "axial"]}, "training_planes"),
        ({"training_tilts_deg": [[20]]}, "training_tilts_deg .*pitch, roll"),
        ({"training_tilts_deg": [["a", 1]]}, "training_tilts_deg .*pitch, roll"),
        ({"training_tilts_deg": [[60, 0]]}, "training_tilts_deg .*at most 45"),
    ],
)
def test_labelmap_bad_training_variants(labelmap_dir, option, match):
    with pytest.raises(DataPreparationError, match=match) as err:
        LabelMapSource(directory=str(labelmap_dir), training=["01"], testing=["03"], **option)
    assert "\n" not in str(err.value)


def test_determinism_and_seeds(tmp_path):
    a = _mni(tmp_path / "a", seed=3)
    b = _mni(tmp_path / "b", seed=3)
    c = _mni(tmp_path / "c", seed=4)
    ra, rb, rc = (p.source.prepare("sub-02", p) for p in (a, b, c))
    for k in ("PDw", "T1w", "T2w"):
        assert np.array_equal(ra.images[k], rb.images[k])
        assert not np.allclose(ra.images[k], rc.images[k])
    assert np.array_equal(ra.label, rb.label) and not np.array_equal(ra.label, rc.label)
    # subjects differ from each other too
    r1 = a.source.prepare("sub-01", a)
    assert not np.array_equal(r1.label, ra.label)


def test_existing_dataset_dir_and_overwrite(tmp_path, labelmap_dir):
    out = tmp_path / "ds"
    _labelmaps(labelmap_dir, out).run()
    with pytest.raises(DataPreparationError, match="already exists") as err:
        _labelmaps(labelmap_dir, out).run()
    assert str(out) in str(err.value)
    _labelmaps(labelmap_dir, out, overwrite=True, seed=5).run()
    assert json.loads((out / "datalist.json").read_text())["seed"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "maps"]
    # a folder holding anything this bundle did not write is never replaced (tests/test_prepare_safety.py)
    (out / "old.txt").write_text("x")
    with pytest.raises(DataPreparationError, match="old.txt, which this bundle did not write"):
        _labelmaps(labelmap_dir, out, overwrite=True).run()
    assert (out / "old.txt").read_text() == "x"


def test_failed_run_leaves_nothing(tmp_path, labelmap_dir, label_map_factory):
    label_map_factory(labelmap_dir / "seg_03.nii.gz", extra_label=999)  # the test subject, written last
    out = tmp_path / "ds"
    with pytest.raises(DataPreparationError, match="999"):
        _labelmaps(labelmap_dir, out).run()
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["maps"]


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing_dir", "does not exist"),
        ("empty_dir", "empty"),
        ("only_text", "no NIfTI"),
        ("non_nifti", "not a NIfTI file"),
        ("corrupt", "not a readable NIfTI"),
        ("unknown_label", "unknown label value 999"),
        ("non_integer", "non-integer label"),
        ("two_d", "expected a 3D volume"),
        ("four_d", "expected a 3D volume"),
        ("missing_subject", "no label map for subject '07'"),
        ("both_splits", "in both splits"),
    ],
)
def test_bad_labelmap_input(tmp_path, label_map_factory, case, match):
    d = tmp_path / "maps"
    d.mkdir()
    training, testing = ["01"], ["02"]
    named = d / "seg_02.nii.gz"  # the file the message must name
    if case == "missing_dir":
        d.rmdir()
        named = d
    elif case == "empty_dir":
        named = d
    else:
        label_map_factory(d / "seg_01.nii.gz")
    if case == "only_text":
        (d / "seg_01.nii.gz").unlink()
        (d / "notes.txt").write_text("hello")
        named = d
    elif case == "non_nifti":
        named = d / "seg_02.png"
        named.write_bytes(b"\x89PNG not really")
    elif case == "corrupt":
        named.write_bytes(b"this is not gzip")
    elif case == "unknown_label":
        label_map_factory(named, extra_label=999)
    elif case == "non_integer":
        nib.save(nib.Nifti1Image(np.full((8, 8, 8), 2.5, np.float32), np.eye(4)), str(named))
    elif case == "two_d":
        nib.save(nib.Nifti1Image(np.zeros((8, 8), np.int16), np.eye(4)), str(named))
    elif case == "four_d":
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 2), np.int16), np.eye(4)), str(named))
    elif case == "missing_subject":
        testing = ["07"]
        named = d
    elif case == "both_splits":
        training, testing = ["01", "02"], ["02"]
        named = None
    out = tmp_path / "ds"
    with pytest.raises(DataPreparationError, match=match) as err:
        _labelmaps(d, out, training=training, testing=testing).run()
    msg = str(err.value)
    assert "\n" not in msg
    if named is not None:
        assert str(named) in msg
    if case in ("missing_dir", "empty_dir", "only_text", "missing_subject"):
        assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, InputNotFoundError)
    assert not out.exists()


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"source": "brainweb"}, "source 'brainweb' is not one of: mni, labelmaps, ixi"),
        ({"spatial_size": [64]}, "spatial_size"),
        ({"min_brain_fraction": 2}, "min_brain_fraction"),
        ({"mni#num_training": 0}, "num_training"),
        ({"mni#bogus": 1}, "mni options: .*bogus"),
        ({"mni": {"num_training": 2}}, "source 'mni': expected a Source or a callable that builds one"),
    ],
)
def test_bad_arguments(tmp_path, overrides, match):
    """Bad arguments in configs/prepare.json (as ``--key value`` sets them) fail at ``run``, in one line."""
    preparer = _config_preparer(dataset_dir=str(tmp_path / "ds"), **overrides)
    with pytest.raises(DataPreparationError, match=match) as err:
        preparer.run()
    assert "\n" not in str(err.value)
    assert not (tmp_path / "ds").exists()


def test_sources_are_config_targets(tmp_path):
    """configs/prepare.json picks the source by name among ``_target_`` entries, built only when used."""
    missing = tmp_path / "maps"
    overrides = {"source": "labelmaps", "dataset_dir": str(tmp_path / "ds"), "labelmaps#directory": str(missing)}
    preparer = _config_preparer(**overrides)
    assert list(preparer.sources) == ["mni", "labelmaps", "ixi"] and preparer.source_name == "labelmaps"
    with pytest.raises(InputNotFoundError, match=f"label map directory {missing}: directory does not exist"):
        preparer.run()
    assert not (tmp_path / "ds").exists()
    preparer = _config_preparer(**{"mni#num_training": 1, "mni#num_testing": 1})
    assert isinstance(preparer.source, MNISource) and preparer.source.subjects()["testing"] == ["sub-02"]
    # a Source object works without any config
    assert _mni("unused").source_name == "mni" and _mni("unused").name == "brain_mri_zero_shot_translation-mni"


def test_config_entry_point_reports_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        prepare_dataset(_config_preparer(source="nope", dataset_dir=str(tmp_path / "ds")))
    assert str(err.value) == "data preparation failed: source 'nope' is not one of: mni, labelmaps, ixi"


def test_ixi_bad_input(tmp_path):
    pd, t1 = tmp_path / "pd", tmp_path / "t1"
    with pytest.raises(InputNotFoundError, match="IXI PD directory .* does not exist"):
        IXISource(pd_dir=pd, t1_dir=t1)
    pd.mkdir()
    t1.mkdir()
    (pd / "IXI002-Guys-0828-PD.png").write_bytes(b"png")
    with pytest.raises(DataPreparationError, match="IXI002-Guys-0828-PD.png: not a NIfTI file"):
        IXISource(pd_dir=pd, t1_dir=t1)
    (pd / "IXI002-Guys-0828-PD.png").unlink()
    with pytest.raises(InputNotFoundError, match=f"IXI PD directory {pd}: no IXI PD NIfTI volumes"):
        IXISource(pd_dir=pd, t1_dir=t1)


@pytest.mark.slow
def test_bundle_run_end_to_end(tmp_path):
    """``python -m monai.bundle run --config_file configs/prepare.json`` on a tiny mni configuration."""
    out = tmp_path / "mni"
    tiny = ["--spatial_size", "[48, 48]", "--max_slices_per_subject", "2"]
    tiny += ["--mni#num_training", "1", "--mni#num_testing", "1"]
    bundle_run("configs/prepare.json", "--dataset_dir", str(out), *tiny)
    dl = load_decathlon_datalist(str(out / "datalist.json"), data_list_key="testing", base_dir=str(out))
    assert len(dl) == 2 and Path(dl[0]["target"]).is_file()
    # a wrong source name fails with one clear line and writes nothing
    bad = ["--source", "nope", "--dataset_dir", str(tmp_path / "x")]
    proc = bundle_run("configs/prepare.json", *bad, check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == (
        "data preparation failed: source 'nope' is not one of: mni, labelmaps, ixi"
    )
    assert not (tmp_path / "x").exists()
