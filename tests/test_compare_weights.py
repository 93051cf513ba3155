"""benchmarks/compare_weights.py: its command line refuses bad input in one line and reads the shipped sampling."""

from __future__ import annotations

import json

import compare_weights  # benchmarks/, on sys.path through conftest.py
import pytest
import tune_sampling
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
    assert setting == {key: shipped[key] for key in tune_sampling.SHIPPED_KEYS}
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


def test_parallel_jobs_keep_the_rows_in_model_set_source_order(tmp_path, monkeypatch):
    """--jobs 2 on a stubbed evaluation: rows in the order of the command line, means over each model's rows."""
    dataset = tmp_path / "set"
    dataset.mkdir()
    (dataset / "datalist.json").write_text(json.dumps({"description": "stub set"}))
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"")

    def stub(method, model, data, slices, setting, seed, folder, extra):
        dice = {"image": 0.5, "t2": 0.7}[extra[1]] + (0.1 if folder.name.startswith("b-") else 0.0)
        return {"dice": dice, "psnr": 20.0, "ssim": 0.8, "seconds": 0.1}

    shipped = compare_weights.shipped_sampling()  # read before BUNDLE_ROOT moves to tmp_path
    monkeypatch.setattr(compare_weights, "evaluate", stub)
    monkeypatch.setattr(compare_weights, "shipped_sampling", lambda: shipped)
    monkeypatch.setattr(compare_weights, "BUNDLE_ROOT", tmp_path)  # the JSON goes under tmp_path
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    summary = compare_weights.main(
        ["--model", f"a={weights}", "--model", f"b={weights}", "--datasets", str(dataset), "--jobs", "2"]
    )
    assert [(r["model"], r["source_key"]) for r in summary["rows"]] == [
        ("a", "image"),
        ("a", "t2"),
        ("b", "image"),
        ("b", "t2"),
    ]
    assert summary["mean_dice"] == {"a": 0.6, "b": 0.7}
    assert summary["datasets"] == {"set": "stub set"}
    assert json.loads((tmp_path / "benchmarks" / "results" / "weights_validation.json").read_text()) == summary
