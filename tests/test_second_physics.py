"""The second-physics test set (``configs/prepare_second_physics.json`` merged on top of ``configs/prepare.json``):
3 T tissue table, spin-echo T1w, other TR/TE, noise, bias and geometry; and the default (1.5 T) preparation
left as it was."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import BUNDLE_ROOT, EVALUATE, bundle_run
from monai.bundle import ConfigParser

from scripts.prepare import DataPreparationError, DatasetPreparer, MNISource
from scripts.prepare.simulation import (
    DEFAULT_SEQUENCES,
    TISSUES,
    TISSUES_3T,
    MRSimulator,
    SpinEcho,
    tissue_signals,
    tissue_table,
)

DEFAULT_CONFIG = "configs/prepare.json"
OVERRIDE = "configs/prepare_second_physics.json"
TEST_KEYS = {"image", "target", "t2", "label", "mask", "subject", "slice"}
BRAIN = ["wm", "gm", "deep_gm", "csf"]
# tiny settings for runs on a real label map: one test subject, three slices
TINY_SUBJECT, TINY_SLICES = "13", 3


def _parser(*files: str) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(BUNDLE_ROOT / f) for f in files])
    parser["bundle_root"] = str(BUNDLE_ROOT)
    return parser


def _class_means(dataset: Path) -> dict[str, np.ndarray]:
    """Mean PDw / T1w / T2w intensity inside label classes 1 (CSF), 2 (GM), 3 (WM) over all testing slices."""
    dl = json.loads((dataset / "datalist.json").read_text())
    sums = {c: np.zeros((2, 3)) for c in ("image", "target", "t2")}
    for e in dl["testing"]:
        lab = np.asarray(nib.load(dataset / e["label"]).dataobj)
        for key, acc in sums.items():
            img = np.asarray(nib.load(dataset / e[key]).dataobj)
            for k in (1, 2, 3):
                acc[:, k - 1] += img[lab == k].sum(), (lab == k).sum()
    return {key: acc[0] / acc[1] for key, acc in sums.items()}  # [CSF, GM, WM]


@pytest.fixture(scope="module")
def physics2_dataset(shared_data_dir, tmp_path_factory) -> Path:
    """The override prepared through the bundle runner on one test subject (three slices)."""
    out = tmp_path_factory.mktemp("physics2") / "labelmaps_physics2"
    bundle_run(
        f"['{DEFAULT_CONFIG}','{OVERRIDE}']",
        "--shared_data",
        str(shared_data_dir),
        "--dataset_dir",
        str(out),
        "--max_slices_per_subject",
        str(TINY_SLICES),
        "--labelmaps#testing",
        f"['{TINY_SUBJECT}']",
    )
    return out


@pytest.fixture(scope="module")
def physics1_dataset(shared_data_dir, tmp_path_factory) -> Path:
    """The default physics (prepare.json alone) on the same subject and settings, for comparison."""
    parser = _parser(DEFAULT_CONFIG)
    parser["source"] = "labelmaps"
    parser["shared_data"] = str(shared_data_dir)
    parser["dataset_dir"] = str(tmp_path_factory.mktemp("physics1") / "labelmaps")
    parser["max_slices_per_subject"] = TINY_SLICES
    parser["labelmaps#training"] = []
    parser["labelmaps#testing"] = [TINY_SUBJECT]
    return parser.get_parsed_content("preparer").run()


@pytest.mark.slow
def test_override_prepares_testing_split_through_bundle_runner(physics2_dataset):
    dl = json.loads((physics2_dataset / "datalist.json").read_text())
    assert dl["name"] == "brain_mri_zero_shot_translation-labelmaps_physics2" and dl["source"] == "labelmaps"
    assert dl["subjects"] == {"training": [], "testing": [f"sub-{TINY_SUBJECT}"]}
    assert dl["training"] == [] and dl["source_training"] == []
    assert dl["pixel_mm"] == pytest.approx(220.0 / 128) and dl["spatial_size"] == [128, 128] and dl["seed"] == 1
    assert len(dl["testing"]) == TINY_SLICES
    for e in dl["testing"]:
        assert set(e) == TEST_KEYS
        suffixes = {"image": "PDw", "target": "T1w", "t2": "T2w", "label": "dseg", "mask": "mask"}
        for key, kind in suffixes.items():
            assert e[key].endswith(f"_{kind}.nii.gz") and (physics2_dataset / e[key]).is_file()
        img = nib.load(physics2_dataset / e["image"])
        assert img.shape == (128, 128) and np.allclose(np.abs(img.affine[:2, :2]), np.eye(2) * 220.0 / 128)
        lab = np.asarray(nib.load(physics2_dataset / e["label"]).dataobj)
        mask = np.asarray(nib.load(physics2_dataset / e["mask"]).dataobj)
        assert {1, 2, 3} <= set(np.unique(lab)) and np.array_equal(mask, (lab > 0).astype(np.uint8))


@pytest.mark.slow
def test_second_physics_contrast_on_images(physics2_dataset, physics1_dataset):
    """Spin-echo T1w: WM > GM > CSF, with brighter CSF than the first physics' SPGR; PDw: CSF > GM > WM."""
    p2, p1 = _class_means(physics2_dataset), _class_means(physics1_dataset)
    csf, gm, wm = p2["target"]
    assert wm > gm > csf
    csf_pd, gm_pd, wm_pd = p2["image"]
    assert csf_pd > gm_pd > wm_pd
    assert p2["t2"][0] > p2["t2"][1] > p2["t2"][2]
    # the two physics differ: T1w CSF/WM ~0.5 (spin echo at 3 T) against ~0.4 (SPGR at 1.5 T)
    ratio2, ratio1 = csf / wm, p1["target"][0] / p1["target"][2]
    assert ratio2 - ratio1 > 0.05, (ratio2, ratio1)
    assert p1["target"][2] > p1["target"][1] > p1["target"][0]  # the first physics is T1-weighted too


def test_second_physics_config_and_noise_free_contrast():
    """The merged config overrides the nested simulator keys and keeps the rest of prepare.json."""
    default, merged = _parser(DEFAULT_CONFIG), _parser(DEFAULT_CONFIG, OVERRIDE)
    assert merged["source"] == "labelmaps" and merged["labelmaps"]["training"] == []
    assert merged["labelmaps"]["testing"] == default["labelmaps"]["testing"] == ["13", "14", "15", "16"]
    assert merged.get_parsed_content("dataset_dir") == str(BUNDLE_ROOT / "data" / "labelmaps_physics2")
    assert merged["simulator"]["pv_sigma_mm"] == default["simulator"]["pv_sigma_mm"]  # untouched keys survive
    sim2, sim1 = merged.get_parsed_content("simulator"), default.get_parsed_content("simulator")
    assert sim2.field_strength == 3.0 and sim2.tissues == TISSUES_3T
    assert (sim2.noise_level, sim2.bias_strength, sim2.tissue_jitter) == (0.05, 0.25, 0.02)
    assert (sim1.noise_level, sim1.bias_strength, sim1.tissue_jitter) == (0.03, 0.1, 0.03)
    t1w = sim2.sequences["T1w"]
    assert isinstance(t1w, SpinEcho) and t1w.tr == 500.0 and t1w.te == 15.0
    assert all(isinstance(s, SpinEcho) and s.tr >= 5000 for s in (sim2.sequences["PDw"], sim2.sequences["T2w"]))
    assert sim2.sequences != sim1.sequences
    pd, t1, t2 = tissue_signals(sim2.tissues, sim2.sequences, BRAIN)  # columns: wm, gm, deep_gm, csf
    assert t1[0] > t1[1] > t1[3] and t1[0] > t1[2] > t1[3]
    assert pd[3] > pd[1] > pd[0] and pd[3] > pd[2] > pd[0]
    assert t2[3] > t2[1] > t2[0]
    ref = tissue_signals(sim1.tissues, sim1.sequences, BRAIN)[1]
    assert abs(t1[0] / t1[1] - ref[0] / ref[1]) > 0.05  # WM/GM in T1w: ~1.24 against ~1.32
    # the ordering survives the per-subject jitter
    for seed in range(20):
        pd, t1, _ = sim2.subject_signals(np.random.default_rng(seed), BRAIN)
        assert t1[0] > t1[1] > t1[3] and pd[3] > pd[1] > pd[0], seed


def test_field_strength_selects_tissue_table():
    assert MRSimulator().field_strength == 1.5 and MRSimulator().tissues == TISSUES
    sim3 = MRSimulator(field_strength=3)
    assert sim3.field_strength == 3.0 and sim3.tissues == TISSUES_3T and tissue_table(3.0) is TISSUES_3T
    assert set(TISSUES_3T) == set(TISSUES)
    for name in ("wm", "gm"):
        assert sim3.tissues[name].t1 > TISSUES[name].t1
    assert 830 <= TISSUES_3T["wm"].t1 <= 850 and 1300 <= TISSUES_3T["gm"].t1 <= 1450 and TISSUES_3T["csf"].t1 >= 4000
    for name, t in TISSUES.items():
        if t.pd > 0:  # everything but air: same PD, longer T1, T2 and T2* no longer than at 1.5 T
            t3 = TISSUES_3T[name]
            assert t3.pd == t.pd and t3.t1 > t.t1 and t3.t2 <= t.t2 and t3.t2s <= t.t2s, name
    # per-tissue replacements still apply on top of the chosen table
    custom = MRSimulator(field_strength=3.0, tissues={"wm": {"pd": 0.7, "t1": 900.0, "t2": 60.0, "t2s": 40.0}})
    assert custom.tissues["wm"].t1 == 900.0 and custom.tissues["gm"] == TISSUES_3T["gm"]
    with pytest.raises(ValueError, match="field_strength 7.0"):
        MRSimulator(field_strength=7.0)
    with pytest.raises(DataPreparationError, match="simulator: field_strength"):
        DatasetPreparer(MNISource(), "unused", simulator={"field_strength": 7.0}).check()


def test_default_prepare_config_unchanged():
    """prepare.json alone still means the 1.5 T table, the SPGR T1w and the first dataset's settings."""
    parser = _parser(DEFAULT_CONFIG)
    sim = parser.get_parsed_content("simulator")
    assert sim.field_strength == 1.5 and sim.tissues == TISSUES and sim.sequences == DEFAULT_SEQUENCES
    assert (sim.noise_level, sim.bias_strength, sim.tissue_jitter) == (0.03, 0.1, 0.03)
    assert (parser["source"], parser["fov_mm"], parser["slice_step_mm"], parser["seed"]) == ("mni", 256.0, 2.0, 0)
    assert parser["labelmaps"]["training"] == [f"{i:02d}" for i in range(1, 13)]
    parser["source"] = "labelmaps"
    assert parser.get_parsed_content("dataset_dir") == str(BUNDLE_ROOT / "data" / "labelmaps")


def test_default_labelmaps_output_matches_prepared_dataset(shared_data_dir):
    """One test subject re-simulated with prepare.json alone is bitwise the slices in ``data/labelmaps``."""
    dataset = BUNDLE_ROOT / "data" / "labelmaps"
    if not (dataset / "datalist.json").is_file():
        pytest.skip(f"{dataset} has not been prepared (configs/prepare.json --source labelmaps)")
    parser = _parser(DEFAULT_CONFIG)
    parser["source"] = "labelmaps"
    parser["shared_data"] = str(shared_data_dir)
    preparer = parser.get_parsed_content("preparer")
    preparer.check()
    result = preparer.source.prepare(f"sub-{TINY_SUBJECT}", preparer)
    entries = [
        e for e in json.loads((dataset / "datalist.json").read_text())["testing"] if e["subject"] == result.subject
    ]
    assert [e["slice"] for e in entries] == result.indices and len(entries) > 10
    for n, e in enumerate(entries):
        for key, contrast in (("image", "PDw"), ("target", "T1w"), ("t2", "T2w")):
            assert np.array_equal(np.asarray(nib.load(dataset / e[key]).dataobj), result.images[contrast][n])
        assert np.array_equal(np.asarray(nib.load(dataset / e["label"]).dataobj), result.label[n])
        assert np.allclose(nib.load(dataset / e["image"]).affine, result.affines[n])


@pytest.mark.slow
def test_second_physics_set_evaluates_with_the_default_translator(physics2_dataset, tmp_path):
    """evaluate.json runs the shipped default translator on the second-physics slices (tiny: 2 slices, 2 steps)."""
    output = tmp_path / "eval"
    bundle_run(
        EVALUATE,
        "--dataset_dir", str(physics2_dataset), "--num_slices", "2", "--num_steps", "2",
        "--output_dir", str(output),
    )  # fmt: skip
    with open(output / "lmi" / "metrics.csv") as handle:
        metrics = dict(line.strip().split(",") for line in handle if line.strip())
    assert 0.0 < float(metrics["ssim"]) <= 1.0 and float(metrics["psnr"]) > 5.0
    assert 0.0 <= float(metrics["dice"]) <= 1.0 and float(metrics["oracle_dice"]) > 0.2


@pytest.mark.parametrize("physics", [(), (OVERRIDE,)], ids=["physics1", "physics2"])
def test_validation_overlay_re_simulates_training_subjects_beside_each_test_set(physics):
    """``configs/prepare_validation.json`` (composed last) writes a paired set of *training* subjects (never 13-16)
    with fresh noise into its own folder, for choosing settings on either physics without touching a test subject."""
    parser = _parser(DEFAULT_CONFIG, *physics, "configs/prepare_validation.json")
    parser["source"] = "labelmaps"
    training = _parser(DEFAULT_CONFIG)["labelmaps"]["training"]
    testing = parser.get_parsed_content("labelmaps#testing")
    assert testing and set(testing) <= set(training), "validation subjects are training subjects"
    assert parser.get_parsed_content("labelmaps#training") == []
    folder = "labelmaps_physics2" if physics else "labelmaps"
    assert parser.get_parsed_content("dataset_dir") == str(BUNDLE_ROOT / "data" / f"{folder}_validation")
    assert parser.get_parsed_content("preparer").name == f"brain_mri_zero_shot_translation-{folder}_validation"
    assert parser.get_parsed_content("seed") == 2, "fresh noise: not the seed the training images were made with"
    assert parser.get_parsed_content("simulator").field_strength == (3.0 if physics else 1.5)
