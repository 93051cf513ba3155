"""benchmarks/augmentation_sharpness.py: how much the training augmentation blurs the targets, on a tiny dataset."""

from __future__ import annotations

import json

import augmentation_sharpness  # benchmarks/, on sys.path through conftest.py
import pytest


def test_bilinear_resampling_costs_dice_and_nearest_keeps_it(tiny_dataset, tmp_path):
    output = tmp_path / "sharpness.json"
    result = augmentation_sharpness.main(["--dataset", str(tiny_dataset), "--draws", "3", "--output", str(output)])
    assert json.loads(output.read_text()) == result
    dice = {row["target"]: row["dice_mean"] for row in result["rows"]}
    spatial = result["spatial_transform"]
    assert spatial == "Rand2DElasticd", "the transform of configs/train.json"
    assert result["slices"] == 6 and result["configured_image_mode"] == "nearest"
    assert dice[f"{spatial}, image nearest"] > dice[f"{spatial}, image bilinear"] + 0.02, dice
    assert dice["Gaussian blur, sigma 1.0 px"] < dice["as simulated"], dice
    assert {row["n"] for row in result["rows"] if row["target"].startswith(spatial)} == {18}


def test_a_dataset_without_validation_pairs_is_refused_in_one_line(tmp_path):
    dataset = tmp_path / "test_only"
    dataset.mkdir()
    (dataset / "datalist.json").write_text(json.dumps({"training": [], "source_training": [], "testing": []}))
    with pytest.raises(SystemExit, match="no 'source_training' entries to validate on"):
        augmentation_sharpness.main(["--dataset", str(dataset), "--output", str(tmp_path / "out.json")])
