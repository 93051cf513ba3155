"""Data preparation never loses or overwrites what it did not write, reports every bad input in one line, and
leaves nothing behind (issue 13): guarded ``dataset_dir`` / ``output_dir``, ITK failures and the registration
quality gate of the ``ixi`` source, SIGTERM and leftovers of killed runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import BUNDLE_ROOT, TINY_IXI, bundle_command, bundle_env, bundle_run, ended_pid

from scripts.io.publishing import MARKER
from scripts.prepare import (
    DataPreparationError,
    DatasetPreparer,
    IXISource,
    MNISource,
    make_demo_input,
    prepare_dataset,
    simulate_volume,
)
from scripts.prepare.registration import RegistrationError, register_rigid_affine

TINY_MNI = {"spatial_size": (32, 32), "max_slices_per_subject": 2}
TINY_MNI_ARGS = ["--spatial_size", "[32, 32]", "--max_slices_per_subject", "2"]
TINY_MNI_ARGS += ["--mni#num_training", "1", "--mni#num_testing", "1"]


def assert_one_line_refusal(proc: subprocess.CompletedProcess, *names: str) -> str:
    """Exit status 1, no traceback, and a last stderr line that names every one of `names`."""
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    for name in names:
        assert name in line, line
    return line


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _mni(out: Path, **kw) -> DatasetPreparer:
    return DatasetPreparer(MNISource(num_training=1, num_testing=1), out, **{**TINY_MNI, **kw})


# ----------------------------------------------------------------------------------------------------------------
# dataset_dir and output_dir: only a folder this bundle wrote is replaced


@pytest.mark.slow
def test_prepare_overwrite_refuses_a_foreign_dataset_dir(tmp_path):
    """``--overwrite True`` on a folder holding a user's file: one line, exit 1, the file is untouched."""
    folder = tmp_path / "X"
    folder.mkdir()
    (folder / "thesis.txt").write_text("four years of work")
    proc = bundle_run(
        "configs/prepare.json", "--overwrite", "True", "--dataset_dir", str(folder), *TINY_MNI_ARGS, check=False
    )
    line = assert_one_line_refusal(proc, str(folder), "thesis.txt", "nothing was changed")
    assert line.startswith("data preparation failed: ")
    assert (folder / "thesis.txt").read_text() == "four years of work"
    assert sorted(p.name for p in folder.iterdir()) == ["thesis.txt"]
    assert hidden(tmp_path) == []


@pytest.mark.parametrize("case", ["foreign_file", "dataset_plus_file", "file", "symlink"])
def test_prepare_refuses_what_it_did_not_write(tmp_path, case):
    out = tmp_path / "ds"
    if case == "foreign_file":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        name = "notes.txt"
    elif case == "dataset_plus_file":  # a dataset of this bundle to which the user added a file
        _mni(out).run()
        (out / "notes.txt").write_text("mine")
        name = "notes.txt"
    elif case == "file":
        out.write_text("mine")
        name = "is a file"
    else:
        (tmp_path / "elsewhere").mkdir()
        out.symlink_to(tmp_path / "elsewhere")
        name = "symbolic link"
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(DataPreparationError) as err:
        _mni(out, overwrite=True).run()
    msg = str(err.value)
    assert "\n" not in msg and str(out) in msg and name in msg
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert hidden(tmp_path) == []


def test_prepare_replaces_its_own_dataset(tmp_path):
    """A marked dataset, an unmarked one of the bundle's layout (written before the marker existed) and an empty
    folder are replaced; the new dataset carries the marker."""
    out = tmp_path / "ds"
    _mni(out).run()
    marker = json.loads((out / MARKER).read_text())
    assert marker["written_by"] == "brain_mri_zero_shot_translation" and marker["kind"] == "dataset"
    (out / MARKER).unlink()  # as written by an earlier version of the bundle
    _mni(out, seed=1, overwrite=True).run()
    assert json.loads((out / "datalist.json").read_text())["seed"] == 1 and (out / MARKER).is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    _mni(empty).run()
    assert (empty / "datalist.json").is_file()
    assert hidden(tmp_path) == []


@pytest.fixture
def demo_datalist(tmp_path) -> Path:
    """A prepared-dataset-like datalist with four tiny test slices (make_demo only copies files)."""
    root = tmp_path / "dataset"
    (root / "slices").mkdir(parents=True)
    testing = []
    for i in range(4):
        entry = {"subject": f"sub-0{i // 2 + 1}", "slice": i}
        for key, kind in (("image", "PDw"), ("target", "T1w"), ("label", "dseg"), ("mask", "mask")):
            rel = f"slices/sub_{i}_{kind}.nii.gz"
            nib.save(nib.Nifti1Image(np.full((4, 4), i, np.float32), np.eye(4)), str(root / rel))
            entry[key] = rel
        testing.append(entry)
    (root / "datalist.json").write_text(json.dumps({"testing": testing}))
    return root / "datalist.json"


@pytest.mark.slow
def test_make_demo_refuses_a_foreign_output_dir(tmp_path, demo_datalist):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    proc = bundle_run("configs/make_demo.json", "--datalist", str(demo_datalist), "--output_dir", str(out), check=False)
    line = assert_one_line_refusal(proc, str(out), "notes.txt", "nothing was changed")
    assert line.startswith("making the demo input failed: ")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    assert hidden(tmp_path) == []


def test_make_demo_replaces_its_own_output(tmp_path, demo_datalist):
    """Its own folder (marked, or the unmarked layout of the shipped demo/) is replaced by a rename; a user's
    ``demo.partial`` next to it is left alone."""
    out = tmp_path / "demo"
    (tmp_path / "demo.partial").mkdir()
    (tmp_path / "demo.partial" / "keep.txt").write_text("mine")
    make_demo_input(demo_datalist, out, count=2)
    first = sorted(p.name for p in out.iterdir())
    assert MARKER in first and "datalist.json" in first and len(first) == 2 + 2 * 4
    (out / MARKER).unlink()  # the shipped demo/ has no marker
    make_demo_input(demo_datalist, out, count=4)
    assert len(json.loads((out / "datalist.json").read_text())["testing"]) == 4 and (out / MARKER).is_file()
    assert (tmp_path / "demo.partial" / "keep.txt").read_text() == "mine"
    assert hidden(tmp_path) == []


# ----------------------------------------------------------------------------------------------------------------
# the ixi source: ITK failures and the registration quality gate, one line naming the subject

SUBJECT = "IXI900-Test-0001"


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A simulated head (PD and T1, 4 mm voxels, 48 x 48 x ~43) and its affine."""
    images, affine, _ = simulate_volume(voxel_mm=4.0, size=48, subject="sub-01", seed=0)
    return images, affine


def _ixi(tmp_path: Path, head, t1: np.ndarray | None = None) -> DatasetPreparer:
    """A one-subject IXI layout (the T1's file affine shifted by 6 mm) and a tiny preparer for it."""
    images, affine = head
    pd_dir, t1_dir = tmp_path / "IXI-PD", tmp_path / "IXI-T1"
    pd_dir.mkdir()
    t1_dir.mkdir()
    moved = affine.copy()
    moved[:3, 3] += [6.0, -4.0, 2.0]
    t1 = images["T1w"] if t1 is None else t1
    nib.save(nib.Nifti1Image(images["PDw"], affine), str(pd_dir / f"{SUBJECT}-PD.nii.gz"))
    nib.save(nib.Nifti1Image(np.ascontiguousarray(t1, dtype=np.float32), moved), str(t1_dir / f"{SUBJECT}-T1.nii.gz"))
    source = IXISource(pd_dir=pd_dir, t1_dir=t1_dir, registration={"sampling": 0.5, "iterations": 100})
    return DatasetPreparer(source, tmp_path / "ds", **TINY_IXI)


def _refused(preparer: DatasetPreparer, *names: str) -> str:
    with pytest.raises(DataPreparationError) as err:
        preparer.run()
    msg = str(err.value)
    assert "\n" not in msg
    for name in names:
        assert name in msg, msg
    assert not preparer.dataset_dir.exists() and hidden(preparer.dataset_dir.parent) == []
    return msg


@pytest.mark.slow
def test_ixi_all_zero_t1_is_one_line_through_the_runner(tmp_path, head):
    _ixi(tmp_path, head, t1=np.zeros_like(head[0]["T1w"]))
    t1 = tmp_path / "IXI-T1" / f"{SUBJECT}-T1.nii.gz"
    proc = bundle_run(
        "configs/prepare.json",
        "--source",
        "ixi",
        "--dataset_dir",
        str(tmp_path / "ds"),
        "--ixi#pd_dir",
        str(tmp_path / "IXI-PD"),
        "--ixi#t1_dir",
        str(t1.parent),
        "--spatial_size",
        "[32, 32]",
        check=False,
    )
    assert_one_line_refusal(proc, str(t1), "every voxel is 0")
    assert not (tmp_path / "ds").exists() and hidden(tmp_path) == []


def test_ixi_itk_failure_is_one_line(tmp_path, head):
    """A T1 of two slices passes the file checks, then ITK's smoothing refuses it."""
    t1 = np.ascontiguousarray(head[0]["T1w"][:, :, 20:22])
    preparer = _ixi(tmp_path, head, t1=t1)
    msg = _refused(preparer, "IXI subject IXI900", f"{SUBJECT}-T1.nii.gz", "ITK could not register", "less than 4")
    with pytest.raises(SystemExit) as err:
        prepare_dataset(preparer)
    assert str(err.value) == f"data preparation failed: {msg}"


def test_itk_failure_is_a_one_line_registration_error(tmp_path, head):
    images, affine = head
    nib.save(nib.Nifti1Image(images["PDw"], affine), str(tmp_path / "pd.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros_like(images["T1w"]), affine), str(tmp_path / "t1.nii.gz"))
    with pytest.raises(RegistrationError) as err:
        register_rigid_affine(tmp_path / "pd.nii.gz", tmp_path / "t1.nii.gz", iterations=10)
    assert str(err.value).startswith("ImageMomentsCalculator: Compute(): Total Mass of the image was zero")
    assert "\n" not in str(err.value) and "0x" not in str(err.value)


def test_ixi_noise_t1_is_refused_by_the_quality_gate(tmp_path, head):
    rng = np.random.default_rng(0)
    noise = rng.uniform(0, float(head[0]["T1w"].max()), head[0]["T1w"].shape)
    msg = _refused(
        _ixi(tmp_path, head, t1=noise), "IXI subject IXI900", "not aligned", "head-mask Dice", "Mattes metric"
    )
    assert f"{SUBJECT}-T1.nii.gz" in msg


@pytest.mark.parametrize("axis", [0, 2])
def test_ixi_flipped_t1_is_refused(tmp_path, head, axis):
    """A T1 whose array is mirrored (a wrong orientation header) fits better mirrored back: refused."""
    flipped = np.flip(head[0]["T1w"], axis=axis)
    msg = _refused(_ixi(tmp_path, head, t1=flipped), "IXI subject IXI900", f"mirrored along its voxel axis {axis}")
    assert "orientation header" in msg


def test_ixi_good_pair_passes_the_quality_gate(tmp_path, head, caplog):
    caplog.set_level("INFO", logger="scripts.prepare")
    out = _ixi(tmp_path, head).run()
    assert json.loads((out / "datalist.json").read_text())["subjects"]["training"] == ["IXI900"]
    assert any("head-mask Dice" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------------------------------------------
# SIGTERM and leftovers of killed runs


@pytest.mark.slow
def test_sigterm_removes_the_staging_folder(tmp_path):
    out = tmp_path / "ds"
    args = ["--dataset_dir", str(out), "--spatial_size", "[64, 64]", "--max_slices_per_subject", "2"]
    args += ["--mni#num_training", "5", "--mni#num_testing", "1"]
    proc = subprocess.Popen(
        bundle_command("configs/prepare.json", *args),
        cwd=BUNDLE_ROOT,
        env=bundle_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not list(tmp_path.glob(".ds.tmp-*")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None and list(tmp_path.glob(".ds.tmp-*")), "no staging folder seen"
        time.sleep(0.5)  # inside the first subjects
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert "stopped by SIGTERM" in stderr.strip().splitlines()[-1]
    assert hidden(tmp_path) == [] and not out.exists()


def test_next_run_removes_staging_folders_of_killed_runs(tmp_path):
    """Marked ``.ds.tmp-*`` of an ended process are removed; a running one's and an unmarked one are kept."""
    ended = ended_pid()
    host = __import__("socket").gethostname()

    def staging(name: str, pid: int | None) -> Path:
        folder = tmp_path / name
        (folder / "slices").mkdir(parents=True)
        if pid is not None:
            info = {"written_by": "brain_mri_zero_shot_translation", "kind": "dataset", "pid": pid, "host": host}
            (folder / MARKER).write_text(json.dumps(info))
        return folder

    killed = staging(".ds.tmp-0123456789abcdef", ended)
    running = staging(".ds.tmp-fedcba9876543210", os.getppid())
    foreign = staging(".ds.tmp-mine", None)
    other = staging(".other.tmp-0123456789abcdef", ended)
    _mni(tmp_path / "ds").run()
    assert not killed.exists()
    assert running.is_dir() and foreign.is_dir() and other.is_dir()
    # a replaced dataset moved aside (``.ds.old-*``) by a run killed before removing it goes once ``ds`` exists,
    # unless something else was put into it
    aside = staging(".ds.old-0123456789abcdef", ended)
    kept = staging(".ds.old-fedcba9876543210", ended)
    (kept / "notes.txt").write_text("mine")
    _mni(tmp_path / "ds", overwrite=True).run()
    assert not aside.exists() and (kept / "notes.txt").is_file()


@pytest.mark.parametrize(
    "ixi, match",
    [
        ({"registration": {"bogus": 1}}, "ixi registration: unknown option 'bogus'"),
        ({"quality": {"min_dice": 0.9}}, "ixi quality: unknown option 'min_dice'"),
    ],
)
def test_bad_ixi_options(tmp_path, ixi, match):
    with pytest.raises(DataPreparationError, match=match):
        IXISource(pd_dir=tmp_path, t1_dir=tmp_path, **ixi)
