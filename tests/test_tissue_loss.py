"""The tissue-aware training loss of the default translator and the label channel that feeds it."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import TRAIN, bundle_run, train_overrides
from monai.networks.schedulers import DDPMScheduler

from scripts.lmidiffusion.diffusion import LMIDiffusionPrepareBatch, TissueAwareLoss
from scripts.training import require_tissue_labels

CENTRES = [0.2, 0.4, 0.6]  # CSF, GM, WM on the [0, 1] image scale


def _to_model(image: torch.Tensor) -> torch.Tensor:
    return image * 2 - 1


def test_weight_zero_is_plain_mse_and_reads_no_labels():
    prediction, target = torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8)
    loss = TissueAwareLoss(CENTRES, weight=0.0)
    expected = torch.nn.functional.mse_loss(prediction, target)
    assert torch.allclose(loss(prediction, target), expected)
    assert torch.allclose(loss(prediction, torch.cat([target, torch.full_like(target, 7.0)], 1)), expected)


def test_the_tissue_term_prefers_the_labelled_tissue_at_equal_mse():
    labels = torch.full((1, 1, 4, 4), 2.0)  # grey matter everywhere
    target = _to_model(torch.full((1, 1, 4, 4), 0.48))  # a GM voxel near the GM/WM boundary (0.5)
    toward_gm = _to_model(torch.full((1, 1, 4, 4), 0.43))
    toward_wm = _to_model(torch.full((1, 1, 4, 4), 0.53))  # the same squared error, across the boundary
    loss = TissueAwareLoss(CENTRES, weight=0.05)
    assert torch.allclose(
        torch.nn.functional.mse_loss(toward_gm, target), torch.nn.functional.mse_loss(toward_wm, target)
    )
    with_labels = torch.cat([target, labels], 1)
    assert loss(toward_gm, with_labels) < loss(toward_wm, with_labels)


def test_voxels_outside_the_brain_add_no_tissue_term_and_gradients_flow():
    target = _to_model(torch.rand(1, 1, 6, 6))
    labels = torch.zeros(1, 1, 6, 6)
    labels[..., :3, :] = 3.0  # white matter in the top half, background below
    prediction = _to_model(torch.rand(1, 1, 6, 6)).requires_grad_()
    loss = TissueAwareLoss(CENTRES, weight=0.1)
    value = loss(prediction, torch.cat([target, labels], 1))
    value.backward()
    mse_grad = 2 * (prediction.detach() - target) / target.numel()
    background = labels[0, 0] == 0
    assert torch.allclose(prediction.grad[0, 0][background], mse_grad[0, 0][background], atol=1e-7)
    assert not torch.allclose(prediction.grad[0, 0][~background], mse_grad[0, 0][~background])
    no_brain = loss(prediction.detach(), torch.cat([target, torch.zeros_like(labels)], 1))
    assert torch.allclose(no_brain, torch.nn.functional.mse_loss(prediction.detach(), target))


def test_bad_settings_and_a_target_without_labels_are_refused():
    with pytest.raises(ValueError, match="3 tissue centres"):
        TissueAwareLoss([0.2, 0.4])
    with pytest.raises(ValueError, match="temperature > 0"):
        TissueAwareLoss(CENTRES, temperature=0.0)
    with pytest.raises(ValueError, match=r"\[regression target, labels\]"):
        TissueAwareLoss(CENTRES)(torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 4))


def test_prepare_batch_appends_the_target_labels_as_the_last_target_channel():
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="sample")
    images = torch.rand(2, 1, 8, 8)
    labels = torch.randint(0, 4, (2, 1, 8, 8)).float()
    _, target, _, kwargs = LMIDiffusionPrepareBatch(scheduler, label_key="label")({"image": images, "label": labels})
    assert target.shape == (2, 2, 8, 8)
    assert torch.allclose(target[:, :1], images * 2 - 1) and torch.equal(target[:, 1:], labels)
    assert "label" not in kwargs, "labels are a training target, never an input of the denoiser"
    _, plain_target, _, _ = LMIDiffusionPrepareBatch(scheduler)({"image": images, "label": labels})
    assert plain_target.shape == images.shape
    with pytest.raises(ValueError, match="label map under 'label'"):
        LMIDiffusionPrepareBatch(scheduler, label_key="label")({"image": images})


def test_require_tissue_labels_names_the_entry_without_labels():
    entries = [{"image": "a_T1w.nii.gz", "label": "a_dseg.nii.gz"}, {"image": "b_T1w.nii.gz"}]
    assert require_tissue_labels(entries, required=False) is entries
    assert require_tissue_labels(entries[:1]) == entries[:1]
    with pytest.raises(ValueError, match="b_T1w.nii.gz.*--tissue_loss_weight 0"):
        require_tissue_labels(entries)


@pytest.mark.slow
def test_training_without_label_maps_stops_in_one_line_unless_the_tissue_term_is_off(tiny_dataset, tmp_path):
    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    datalist = json.loads((tiny_dataset / "datalist.json").read_text())
    for i, entry in enumerate(datalist["training"]):
        image = tiny_dataset / entry["image"]
        copy = unlabelled / f"plain_{i}_T1w.nii.gz"  # no _dseg sibling
        copy.write_bytes(image.read_bytes())
        entry["image"] = str(copy)
    for entry in datalist["source_training"] + datalist["testing"]:
        entry.update({k: str(tiny_dataset / v) for k, v in entry.items() if k != "subject"})
    (unlabelled / "datalist.json").write_text(json.dumps(datalist))
    overrides = [*train_overrides(tiny_dataset, tmp_path / "models", epochs=1), "--datalist"]
    result = bundle_run(TRAIN, *overrides, str(unlabelled / "datalist.json"), check=False)
    assert result.returncode != 0
    assert "has no tissue label map" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "models" / "model.pt").exists()
    plain = bundle_run(
        TRAIN, *overrides, str(unlabelled / "datalist.json"), "--tissue_loss_weight", "0", "--val_interval", "100"
    )
    assert plain.returncode == 0 and (tmp_path / "models" / "model.pt").is_file()
