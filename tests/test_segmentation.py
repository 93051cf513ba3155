"""The target-only K-means tissue segmenter: fit, order, JSON round trip, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from scripts.evaluation import KMeansTissueSegmenter, TissueSegmentd, fit_segmenter


def t1_like(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A T1w-like slice (CSF 0.2 < GM 0.45 < WM 0.7, noisy) with its labels and brain mask."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(1, 4, size=(32, 32))
    labels[:4] = 0
    image = np.choose(labels, [0.0, 0.2, 0.45, 0.7]) + 0.03 * rng.standard_normal(labels.shape)
    image[0, 0] = 1.0  # a bright non-brain voxel sets the 99.5th percentile scale, as scalp fat does
    return image.clip(0, None), labels, labels > 0


def test_fit_orders_clusters_as_csf_gm_wm_and_segments():
    images, labels, masks = zip(*(t1_like(seed) for seed in range(3)), strict=True)
    segmenter = fit_segmenter(images, masks, seed=0)
    assert np.all(np.diff(segmenter.centres) > 0)
    image, truth, mask = t1_like(10)
    top = np.percentile(image, 99.5)
    predicted = segmenter(np.clip(image / top, 0, 1), mask)
    assert predicted[~mask].max() == 0
    assert (predicted[mask] == truth[mask]).mean() > 0.95


def test_json_round_trip_and_malformed_files(tmp_path):
    segmenter = KMeansTissueSegmenter([0.2, 0.4, 0.6])
    path = tmp_path / "segmenter.json"
    segmenter.save(path)
    content = json.loads(path.read_text())
    assert content["centres"] == [0.2, 0.4, 0.6] and "scikit-learn" in content["versions"]
    assert np.allclose(KMeansTissueSegmenter.load(path).centres, segmenter.centres)
    with pytest.raises(FileNotFoundError, match="segmenter file not found"):
        KMeansTissueSegmenter.load(tmp_path / "absent.json")
    (tmp_path / "pickle.json").write_bytes(b"\x80\x04not json")
    with pytest.raises(ValueError, match="not JSON"):
        KMeansTissueSegmenter.load(tmp_path / "pickle.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="expected format"):
        KMeansTissueSegmenter.load(tmp_path / "other.json")
    (tmp_path / "two.json").write_text(json.dumps({**content, "centres": [0.1, 0.2]}))
    with pytest.raises(ValueError, match="malformed segmenter file"):
        KMeansTissueSegmenter.load(tmp_path / "two.json")


def test_dictionary_transform_segments_inside_the_mask():
    image, truth, mask = t1_like(3)
    data = {
        "pred": MetaTensor(torch.from_numpy(image[None] / np.percentile(image, 99.5)).float().clamp(0, 1)),
        "mask": torch.from_numpy(mask[None].astype(np.float32)),
    }
    out = TissueSegmentd("pred", KMeansTissueSegmenter([0.2, 0.45, 0.7]), mask_key="mask")(data)
    assert isinstance(out["pred_seg"], MetaTensor) and out["pred_seg"].shape == (1, 32, 32)
    with pytest.raises(ValueError, match="shape"):
        TissueSegmentd("pred", KMeansTissueSegmenter([0.2, 0.45, 0.7]))({**data, "mask": torch.ones(1, 8, 8)})
