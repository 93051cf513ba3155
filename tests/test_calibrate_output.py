"""benchmarks/calibrate_output.py: the power that maps a smooth translation back to its target's intensities."""

from __future__ import annotations

import json

import calibrate_output  # benchmarks/, on sys.path through conftest.py
import numpy as np
import pytest


def test_fit_recovers_the_power_that_relates_translation_and_target():
    rng = np.random.default_rng(0)
    pairs = []
    for _ in range(3):
        target = rng.uniform(0.1, 1.0, (16, 16))
        mask = rng.uniform(size=(16, 16)) > 0.3
        pairs.append((target ** (1 / 1.07), target, mask))  # a translation too bright in the mid-tones
    gamma, curve = calibrate_output.fit_gamma(pairs, calibrate_output.grid("0.9:1.3:0.01"))
    assert gamma == pytest.approx(1.07)
    assert min(curve, key=lambda row: row[1])[1] == pytest.approx(0.0, abs=1e-12)
    assert len(curve) == 41


def test_robust_scale_divides_by_the_percentile_and_clips():
    image = np.linspace(0.0, 2.0, 1001)
    scaled = calibrate_output.robust_scale(image)
    assert scaled.max() == 1.0 and scaled.min() == 0.0
    assert scaled[500] == pytest.approx(1.0 / np.percentile(image, 99.5))


def test_a_dataset_without_validation_pairs_is_refused_in_one_line(tmp_path):
    """A test-only datalist (the second-physics source has no training subjects) must not end in a traceback."""
    dataset = tmp_path / "test_only"
    dataset.mkdir()
    (dataset / "datalist.json").write_text(json.dumps({"training": [], "source_training": [], "testing": []}))
    model = tmp_path / "model.pt"
    model.write_bytes(b"weights")
    refusal = "no 'source_training' entries to validate on.*validation needs training subjects"
    with pytest.raises(SystemExit, match=refusal):
        calibrate_output.main(["--model", str(model), "--dataset", str(dataset)])
