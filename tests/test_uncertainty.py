"""The uncertainty of a translation (scripts.lmidiffusion.uncertainty): the spread of several samples as a map and
a per-slice score, written beside the translation; and the through-plane flicker metric."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import BUNDLE_ROOT, INFERENCE, bundle_run, infer_overrides
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from phantoms import phantom

from scripts.lmidiffusion.uncertainty import SampleStdd, UncertaintyScore, through_plane_flicker, uncertainty_score


def test_flicker_is_zero_for_a_constant_volume_and_grows_with_the_change_between_slices():
    assert through_plane_flicker(np.full((8, 8, 5), 3.0)) == 0.0
    ramp = np.stack([np.full((4, 4), float(k)) for k in range(5)], axis=-1)  # +1 from one slice to the next
    assert through_plane_flicker(ramp) == pytest.approx(1.0)
    assert through_plane_flicker(ramp, slice_axis=0) == 0.0, "constant along the first axis"
    mask = np.zeros((4, 4, 5), dtype=bool)
    mask[1:3, 1:3, :2] = True  # only slices 0 and 1 are both inside
    assert through_plane_flicker(ramp * 2, mask=mask) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="3D volume"):
        through_plane_flicker(np.zeros((4, 4)))


def test_score_is_the_mean_spread_inside_the_head():
    std = torch.zeros(2, 1, 4, 4)
    std[0, 0, :2] = 1.0
    std[1] = 0.5
    head = torch.zeros(2, 1, 4, 4)
    head[0, 0, :1] = 1.0  # the head covers the first row only
    score = uncertainty_score(std, head)
    assert score.tolist() == [1.0, 0.5], "inside the head; the whole image where the head mask is empty"
    metric = UncertaintyScore()
    metric(std, head)
    assert metric.get_buffer().shape == (2, 1) and float(metric.aggregate()) == pytest.approx(0.75)


class _Spread:
    last_std = None


def test_sample_stdd_gives_each_item_its_row_of_the_batch():
    inferer = _Spread()
    transform = SampleStdd(inferer=inferer)
    source = phantom(16)[0]
    affine = torch.diag(torch.tensor([2.0, 3.0, 1.0, 1.0]))
    pred = MetaTensor(torch.rand(1, 16, 16), affine=affine, meta={"filename_or_obj": "x.nii.gz"})
    inferer.last_std = torch.stack([torch.full((1, 16, 16), 0.1), torch.full((1, 16, 16), 0.2)])
    first, second = transform({"image": source, "pred": pred}), transform({"image": source, "pred": pred})
    assert first["uncertainty"] == pytest.approx(0.1) and second["uncertainty"] == pytest.approx(0.2)
    assert torch.equal(first["pred_std"].affine, affine) and first["pred_std"].meta["filename_or_obj"] == "x.nii.gz"
    inferer.last_std = torch.full((1, 1, 16, 16), 0.3)  # a new batch starts again at its first row
    assert transform({"image": source, "pred": pred})["uncertainty"] == pytest.approx(0.3)
    inferer.last_std = None  # one sample: a zero map, or nothing with always=False
    assert transform({"image": source, "pred": pred})["uncertainty"] == 0.0
    assert "pred_std" not in SampleStdd(inferer=inferer, always=False)({"image": source, "pred": pred})


def test_score_is_higher_on_a_corrupted_input_than_on_a_clean_one():
    """The shipped translator on the 4 demo slices, clean and blurred (lost resolution): the blurred slices leave the
    prior more freedom, and each one's score rises."""
    parser = ConfigParser()
    parser.read_config(BUNDLE_ROOT / "configs" / "inference.json")
    parser.update({"bundle_root": str(BUNDLE_ROOT), "num_steps": 8, "num_samples": 4, "progress": False})
    translator, network = parser.get_parsed_content("translator"), parser.get_parsed_content("network")
    images = []
    for path in sorted((BUNDLE_ROOT / "demo").glob("*_PDw.nii.gz")):
        image = torch.from_numpy(np.asarray(nib.load(path).dataobj, dtype=np.float32))[None, None]
        image = F.interpolate(image, size=(128, 128), mode="area")
        images.append((image / torch.quantile(image, 0.995)).clamp(0.0, 1.0))
    clean = torch.cat(images)
    blurred = F.avg_pool2d(clean, 9, stride=1, padding=4)
    scores = {}
    for name, batch in (("clean", clean), ("blurred", blurred)):
        transform = SampleStdd(inferer=translator)
        prediction = translator.sample(batch, network)
        scores[name] = [transform({"image": batch[i], "pred": prediction[i]})["uncertainty"] for i in range(len(batch))]
    assert all(b > 1.2 * c for b, c in zip(scores["blurred"], scores["clean"], strict=True)), scores


@pytest.mark.slow
def test_uncertainty_outputs_keep_the_affine_of_the_source_volume(tiny_model, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    volume = np.stack([phantom(40, seed=i)[0, 0].numpy() for i in range(3)], axis=-1) * 700
    volume[..., 2] = 0.0  # an empty slice is not translated and scores 0
    affine = np.array([[0, -1.2, 0, 10], [1.2, 0, 0, -5], [0, 0, 2.5, 3], [0, 0, 0, 1]], dtype=float)
    nib.save(nib.Nifti1Image(volume.astype(np.float32), affine), str(inputs / "vol_pd.nii.gz"))
    output = tmp_path / "out"
    bundle_run(INFERENCE, *infer_overrides(tiny_model, output, "--input_dir", str(inputs), "--num_samples", "2"))
    spread = nib.load(output / "vol_pd_std_lmi.nii.gz")
    assert spread.shape == volume.shape and np.allclose(spread.affine, affine)
    data = spread.get_fdata()
    assert data.min() >= 0 and data[..., :2].max() > 0 and data[..., 2].max() == 0
    entry = json.loads((output / "datalist_translated.json").read_text())["testing"][0]
    assert entry["uncertainty_image"] == "vol_pd_std_lmi.nii.gz" and entry["uncertainty"] > 0
    assert len(entry["uncertainty_per_slice"]) == 3 and entry["uncertainty_per_slice"][2] == 0.0
