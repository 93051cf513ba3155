"""The bundle's training and inference workflows, run through `python -m monai.bundle run` on tiny settings."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import (
    BUNDLE_ROOT,
    INFERENCE,
    TINY_PAPER,
    TRAIN,
    bundle_run,
    infer_overrides,
    sigterm_once_staging,
    train_overrides,
)
from phantoms import phantom

from scripts.configs import config_files


@pytest.mark.slow
def test_training_runs_and_resumes_after_an_interruption(tiny_dataset, tmp_path):
    models = tmp_path / "models"
    first = bundle_run(TRAIN, *train_overrides(tiny_dataset, models, epochs=1))
    first_log = first.stdout + first.stderr
    assert "val_dice" in first_log and "val_ssim" in first_log, "the validation handler must log Dice and SSIM"
    checkpoint = models / "checkpoints" / "checkpoint_epoch_1.pt"
    assert checkpoint.is_file() and (models / "model.pt").is_file()
    rows = (models / "training_log.csv").read_text().splitlines()
    assert rows[0].split(",")[:4] == ["iteration", "epoch", "wall_s", "images_seen"] and len(rows) == 2
    weights = torch.load(models / "model.pt", weights_only=True)

    # A second run with more epochs continues from epoch 1 instead of starting again.
    # The campaign may lower the learning rate between runs: the configured rate wins over the checkpoint's.
    second = bundle_run(TRAIN, *train_overrides(tiny_dataset, models, epochs=2), "--learning_rate", "0.0002")
    log = second.stdout + second.stderr
    assert "resuming from" in log and "Epoch[2]" in log and "Epoch[1]" not in log
    assert (models / "checkpoints" / "checkpoint_epoch_2.pt").is_file()
    state = torch.load(models / "checkpoints" / "checkpoint_epoch_2.pt", weights_only=False)
    assert state["optimizer"]["param_groups"][0]["lr"] == 0.0002
    assert float(state["wall_clock"]["wall_s"]) > 0, "the campaign's wall time is part of the resume state"
    assert not checkpoint.exists(), "only the newest checkpoint is kept"
    updated = torch.load(models / "model.pt", weights_only=True)
    assert any(not torch.equal(weights[k], updated[k]) for k in weights), "resumed training must update the weights"
    rows = [row.split(",") for row in (models / "training_log.csv").read_text().splitlines()[1:]]
    assert [int(row[1]) for row in rows] == [1, 2], "the campaign log continues across the resume"
    assert float(rows[1][2]) > float(rows[0][2]) and int(rows[1][0]) > int(rows[0][0])


@pytest.mark.slow
def test_paper_recipe_trains_with_its_own_network(tiny_dataset, tmp_path):
    models = tmp_path / "models"
    overrides = train_overrides(tiny_dataset, models, epochs=1, tiny=TINY_PAPER)
    bundle_run(config_files("train_lmi_paper"), *overrides)
    assert (models / "checkpoints_lmi_paper" / "checkpoint_epoch_1.pt").is_file()
    state = torch.load(models / "lmi_paper.pt", weights_only=True)
    assert state["conv_in.conv.weight"].shape[1] == 4, "x_t, LMI(s, x_t), LMI(s, s) and the head mask"


@pytest.mark.slow
def test_a_source_image_in_the_training_list_stops_training(tiny_dataset, tmp_path):
    leaky = tmp_path / "leaky"
    leaky.mkdir()
    datalist = json.loads((tiny_dataset / "datalist.json").read_text())
    source = tiny_dataset / datalist["testing"][0]["image"]
    datalist["training"].append({"image": str(source), "subject": "s2"})
    (leaky / "datalist.json").write_text(json.dumps(datalist))
    overrides = train_overrides(tiny_dataset, tmp_path / "models", epochs=1)
    result = bundle_run(TRAIN, *overrides, "--datalist", str(leaky / "datalist.json"), check=False)
    assert result.returncode != 0
    assert "looks like a source-modality image" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "models" / "model.pt").exists()


@pytest.mark.slow
def test_two_process_cpu_ddp_training(tiny_dataset, tmp_path):
    models = tmp_path / "models"
    result = bundle_run(
        config_files("multi_gpu_train"),
        *train_overrides(tiny_dataset, models, epochs=1),
        torchrun=2,
    )
    assert (models / "checkpoints" / "checkpoint_epoch_1.pt").is_file(), result.stdout[-2000:]
    state = torch.load(models / "model.pt", weights_only=True)
    assert "unet.conv_in.conv.weight" in state, "the default translator's space-to-depth UNet"
    assert not any(k.startswith("module.") for k in state), "exported weights must load without DDP"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lmi", "sdedit"])
def test_inference_on_2d_slices_keeps_the_affine(tiny_dataset, tiny_model, tmp_path, method):
    output = tmp_path / "out"
    extra = ["--datalist", str(tiny_dataset / "datalist.json")]
    bundle_run(config_files("inference", method), *infer_overrides(tiny_model, output, *extra))
    assert (output / f"test_0_pd_to_t1w_{method}.nii.gz").is_file()
    written = json.loads((output / "datalist_translated.json").read_text())["testing"]
    assert len(written) == 2
    for entry in written:
        image = nib.load(output / entry["image"])
        source = nib.load(output / entry["source_image"])  # relative to the datalist, as "image" is
        assert image.shape == source.shape and np.allclose(image.affine, source.affine)
        data = image.get_fdata()
        assert data.min() >= 0 and data.max() <= 1 and data.max() > 0
    assert (output / "translation.png").is_file()
    assert not list(output.glob("*.partial*")) and not list(tmp_path.glob(".*")), "no staging may remain"


@pytest.mark.slow
def test_composed_configs_run_from_another_directory_given_bundle_root(tiny_dataset, tiny_model, tmp_path):
    """Every reference resolves from bundle_root: a base, a method override and absolute config paths, run elsewhere."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    output = tmp_path / "out"
    configs = config_files("inference", "sdedit", bundle_root=BUNDLE_ROOT)
    extra = ["--datalist", str(tiny_dataset / "datalist.json"), "--bundle_root", str(BUNDLE_ROOT)]
    bundle_run(configs, *infer_overrides(tiny_model, output, *extra), cwd=elsewhere)
    assert (output / "test_0_pd_to_t1w_sdedit.nii.gz").is_file() and not any(elsewhere.iterdir())


@pytest.mark.slow
def test_inference_on_a_3d_volume_writes_one_volume(tiny_model, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    volume = np.stack([phantom(40, seed=i)[0, 0].numpy() for i in range(3)], axis=-1) * 700
    affine = np.array([[0, -1.2, 0, 10], [1.2, 0, 0, -5], [0, 0, 2.5, 3], [0, 0, 0, 1]], dtype=float)
    nib.save(nib.Nifti1Image(volume.astype(np.float32), affine), str(inputs / "vol_pd.nii.gz"))
    output = tmp_path / "out"
    bundle_run("configs/inference.json", *infer_overrides(tiny_model, output, "--input_dir", str(inputs)))
    result = nib.load(output / "vol_pd_to_t1w_lmi.nii.gz")
    assert result.shape == volume.shape and np.allclose(result.affine, affine)
    assert np.all(result.get_fdata()[..., 1].max() > 0)


@pytest.mark.slow
def test_inference_is_deterministic_for_a_seed(tiny_dataset, tiny_model, tmp_path):
    outputs = []
    for run in ("a", "b"):
        output = tmp_path / run
        extra = ["--datalist", str(tiny_dataset / "datalist.json"), "--seed", "7"]
        bundle_run("configs/inference.json", *infer_overrides(tiny_model, output, *extra))
        outputs.append(nib.load(output / "test_0_pd_to_t1w_lmi.nii.gz").get_fdata())
    assert np.array_equal(outputs[0], outputs[1])


def _write(tmp_path: Path, name: str, array: np.ndarray) -> Path:
    folder = tmp_path / "bad"
    folder.mkdir(exist_ok=True)
    nib.save(nib.Nifti1Image(array.astype(np.float32), np.eye(4)), str(folder / name))
    return folder


@pytest.mark.slow
@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_dir", "input_dir not found"),
        ("empty_dir", "no NIfTI file"),
        ("not_nifti", "not a NIfTI file"),
        ("four_d", "4D or multichannel"),
        ("nan", "NaN or Inf"),
        ("all_zero", "all zero"),
        ("missing_model", "model file not found"),
        ("mismatched_model", "does not match the network in the config: missing"),
        ("random_bytes_model", "not a state dict saved with torch.save"),
        ("tensor_model", "not a state dict of tensors"),
        ("constant", "image is constant"),
        ("unknown_method", "unknown method 'foo'"),
        ("method_without_its_config", "choose a method by adding configs/methods/sdedit.json to --config_file"),
        ("zero_steps", "num_steps must be a whole number in 1-1000, got 0"),
        ("negative_steps", "num_steps must be a whole number in 1-1000, got -3"),
        ("steps_past_schedule", "num_steps must be a whole number in 1-1000, got 5000"),
        ("sdedit_start_past_schedule", "sdedit_start must be a timestep in 1-999, got 5000"),
        ("stop_past_schedule", "stop_timestep must be a timestep in 0-999, got 1000"),
        ("output_dir_is_a_file", "is a file; give a folder"),
    ],
)
def test_inference_bad_input_gives_a_clear_error_and_no_output(tiny_model, tmp_path, case, message):
    good = phantom(32)[0, 0].numpy()
    model = tiny_model
    if case == "missing_dir":
        inputs = tmp_path / "nowhere"
    elif case == "empty_dir":
        inputs = tmp_path / "empty"
        inputs.mkdir()
    elif case == "not_nifti":
        inputs = tmp_path / "text"
        inputs.mkdir()
        (inputs / "scan.nii.gz").write_text("not an image")
        message = "cannot be read as NIfTI"
    elif case == "four_d":
        inputs = _write(tmp_path, "x.nii.gz", np.stack([good] * 2, -1)[..., None].repeat(2, -1))
    elif case == "nan":
        inputs = _write(tmp_path, "x.nii.gz", np.where(good > 0.5, np.nan, good))
    elif case == "all_zero":
        inputs = _write(tmp_path, "x.nii.gz", np.zeros_like(good))
    elif case == "constant":
        inputs = _write(tmp_path, "x.nii.gz", np.full_like(good, 3.0))
    else:
        inputs = _write(tmp_path, "x.nii.gz", good)
        model = tmp_path / ("absent.pt" if case == "missing_model" else "other.pt")
        if case == "mismatched_model":
            torch.save({"conv_in.weight": torch.zeros(1)}, model)
        elif case == "random_bytes_model":
            model.write_bytes(np.random.default_rng(0).bytes(4096))
        elif case == "tensor_model":
            torch.save(torch.zeros(3), model)
        elif not case.endswith("_model"):
            model = tiny_model
    settings = {
        "unknown_method": ["--method", "foo"],
        "zero_steps": ["--num_steps", "0"],
        "negative_steps": ["--num_steps", "-3"],
        "steps_past_schedule": ["--num_steps", "5000"],
        "method_without_its_config": ["--method", "sdedit"],
        "sdedit_start_past_schedule": ["--sdedit_start", "5000"],
        "stop_past_schedule": ["--stop_timestep", "1000"],
    }.get(case, [])
    output = tmp_path / "out"
    if case == "output_dir_is_a_file":
        output.write_text("a file where the folder should be")
    overrides = infer_overrides(model, output, "--input_dir", str(inputs)) + settings
    config = config_files("inference", "sdedit") if case == "sdedit_start_past_schedule" else INFERENCE
    result = bundle_run(config, *overrides, check=False)
    assert result.returncode == 1
    assert message in result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "weights_only=False" not in result.stderr
    if case == "output_dir_is_a_file":
        assert output.read_text() == "a file where the folder should be"
    else:
        assert not output.exists() or not any(output.iterdir()), "a failed run leaves no output"
    assert not list(tmp_path.glob(".*")), "nor a staging folder"


def _translate_into(output: Path, model: Path, inputs: Path, *extra: str):
    return bundle_run("configs/inference.json", *infer_overrides(model, output, "--input_dir", str(inputs), *extra))


@pytest.mark.slow
def test_a_rerun_replaces_the_previous_run_whole_and_an_interrupted_one_changes_nothing(tiny_model, tmp_path):
    inputs = _write(tmp_path, "a_pd.nii.gz", phantom(32, seed=1)[0, 0].numpy())
    output = tmp_path / "out"
    _translate_into(output, tiny_model, inputs)
    first = {p.name: p.read_bytes() for p in output.iterdir()}
    _write(tmp_path, "b_pd.nii.gz", phantom(32, seed=2)[0, 0].numpy())
    _translate_into(output, tiny_model, inputs, "--seed", "3")  # a re-run replaces the earlier run whole
    second = {p.name: p.read_bytes() for p in output.iterdir()}
    assert {"a_pd_to_t1w_lmi.nii.gz", "b_pd_to_t1w_lmi.nii.gz"} <= set(second)
    assert second["a_pd_to_t1w_lmi.nii.gz"] != first["a_pd_to_t1w_lmi.nii.gz"]

    overrides = infer_overrides(tiny_model, output, "--input_dir", str(inputs), "--num_steps", "1000")
    returncode, stderr = sigterm_once_staging(
        "configs/inference.json", *overrides, staging=tmp_path, pattern=".out.tmp-*", wait=0.5
    )
    assert returncode == 1 and "terminated by SIGTERM" in stderr
    assert {p.name: p.read_bytes() for p in output.iterdir()} == second, "the earlier run is left as it was"
    assert not list(tmp_path.glob(".*")), "no staging folder remains"

    (output / "thesis.txt").write_text("mine")
    result = bundle_run(
        "configs/inference.json", *infer_overrides(tiny_model, output, "--input_dir", str(inputs)), check=False
    )
    assert result.returncode == 1 and "holds files this bundle did not write" in result.stderr
    assert (output / "thesis.txt").read_text() == "mine"


@pytest.mark.slow
def test_inputs_with_the_same_file_name_get_distinct_outputs(tiny_model, tmp_path):
    good = phantom(32)[0, 0].numpy() * 500
    affine = np.eye(4)
    entries = []
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        nib.save(nib.Nifti1Image(good.astype(np.float32), affine), str(tmp_path / folder / "x.nii.gz"))
        entries.append({"image": f"{folder}/x.nii.gz"})
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"testing": entries}))
    output = tmp_path / "out"
    bundle_run("configs/inference.json", *infer_overrides(tiny_model, output, "--datalist", str(datalist)))
    written = json.loads((output / "datalist_translated.json").read_text())["testing"]
    assert sorted(e["image"] for e in written) == ["a/x_to_t1w_lmi.nii.gz", "b/x_to_t1w_lmi.nii.gz"]
    assert all((output / e["image"]).is_file() for e in written)

    datalist.write_text(json.dumps({"testing": [entries[0], entries[0]]}))
    result = bundle_run(
        "configs/inference.json",
        *infer_overrides(tiny_model, tmp_path / "twice", "--datalist", str(datalist)),
        check=False,
    )
    assert result.returncode == 1 and "is listed twice" in result.stderr


@pytest.mark.slow
def test_a_slice_with_two_trailing_singleton_axes_translates(tiny_model, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    slice_ = (phantom(32)[0, 0].numpy() * 500)[:, :, None, None]
    nib.save(nib.Nifti1Image(slice_.astype(np.float32), np.diag([1.5, 1.5, 3.0, 1.0])), str(inputs / "x.nii.gz"))
    output = tmp_path / "out"
    _translate_into(output, tiny_model, inputs)
    result = nib.load(output / "x_to_t1w_lmi.nii.gz")
    assert result.shape == (32, 32, 1, 1) and np.allclose(result.affine, np.diag([1.5, 1.5, 3.0, 1.0]))


@pytest.mark.slow
def test_a_labelled_translated_set_goes_straight_into_auto3dseg(tiny_dataset, tiny_model, tmp_path):
    """Labels and other keys of the input entries are carried over, under the key Auto3DSeg trains on."""
    from monai.apps.auto3dseg import DataAnalyzer

    output = tmp_path / "out"
    extra = ["--datalist", str(tiny_dataset / "datalist.json"), "--output_list_key", "training"]
    bundle_run("configs/inference.json", *infer_overrides(tiny_model, output, *extra))
    datalist = json.loads((output / "datalist_translated.json").read_text())
    assert "testing" not in datalist and len(datalist["training"]) == 2
    for entry in datalist["training"]:
        assert {"image", "label", "source_image", "subject"} <= set(entry)
        assert (output / entry["label"]).is_file() and (output / entry["source_image"]).is_file()
    analyzer = DataAnalyzer(
        str(output / "datalist_translated.json"), str(output), output_path=str(tmp_path / "stats.yaml"), worker=0
    )
    stats = analyzer.get_all_case_stats()
    assert len(stats["stats_by_cases"]) == 2
    assert stats["stats_summary"]["label_stats"]["labels"] == [0, 1, 2, 3]
