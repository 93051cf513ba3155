"""benchmarks/compare_weights.py: its command line refuses bad input in one line and reads the shipped sampling."""

from __future__ import annotations

import json

import compare_weights  # benchmarks/, on sys.path through conftest.py
import pytest
from helpers import BUNDLE_ROOT


def test_model_arguments_are_label_equals_existing_path(tmp_path, capsys):
    weights = tmp_path / "a.pt"
    weights.write_bytes(b"")
    assert compare_weights.labelled_model(f"plain={weights}") == ("plain", weights)
    for bad, message in (("plain", "expected LABEL=PATH"), (f"={weights}", "expected LABEL=PATH")):
        with pytest.raises(SystemExit):
            compare_weights.main(["--model", bad])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare_weights.main(["--model", f"x={tmp_path / 'missing.pt'}"])
    assert "no such weights file" in capsys.readouterr().err


def test_a_missing_validation_set_stops_in_one_line(tmp_path):
    weights = tmp_path / "a.pt"
    weights.write_bytes(b"")
    with pytest.raises(SystemExit, match="configs/prepare_validation.json writes it"):
        compare_weights.main(["--model", f"a={weights}", "--datasets", str(tmp_path / "nowhere")])


def test_sampling_is_the_shipped_one():
    shipped = json.loads((BUNDLE_ROOT / "configs" / "inference.json").read_text())
    setting = compare_weights.shipped_sampling()
    assert setting == {key: shipped[key] for key in compare_weights.SHIPPED_KEYS}
    assert "output_gamma" in setting, "the calibration is part of what a user gets"


def test_means_by_dataset_average_the_source_keys_of_each_model_and_set():
    rows = [
        {"model": "a", "dataset": "v", "source_key": "image", "dice": 0.8, "psnr": 24.0, "ssim": 0.86},
        {"model": "a", "dataset": "v", "source_key": "t2", "dice": 0.7, "psnr": 20.0, "ssim": 0.80},
        {"model": "a", "dataset": "mni", "source_key": "image", "dice": 0.5, "psnr": 18.0, "ssim": 0.70},
        {"model": "b", "dataset": "v", "source_key": "image", "dice": 0.6, "psnr": 22.0, "ssim": 0.84},
    ]
    means = compare_weights.means_by_dataset(rows)
    assert means == {
        "a": {"v": {"dice": 0.75, "psnr": 22.0, "ssim": 0.83}, "mni": {"dice": 0.5, "psnr": 18.0, "ssim": 0.7}},
        "b": {"v": {"dice": 0.6, "psnr": 22.0, "ssim": 0.84}},
    }
