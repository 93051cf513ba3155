"""The bundle's training and inference workflows, run through `python -m monai.bundle run` on tiny settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from phantoms import phantom

BUNDLE_ROOT = Path(__file__).resolve().parents[1]

# A network small enough to train two iterations in seconds; the same overrides go to every workflow.
TINY = [
    "--network_channels", "[8, 8]",
    "--attention_levels", "[False, False]",
    "--num_head_channels", "8",
    "--norm_num_groups", "8",
    "--model_size", "[32, 32]",
    "--image_size", "[32, 32]",
]  # fmt: skip
# The same for the paper's recipe (configs/train_lmi_paper.json, method lmi_paper), which has its own network.
TINY_PAPER_NETWORK = {
    "_target_": "DiffusionModelUNet",
    "spatial_dims": 2,
    "in_channels": "$1 + @paper_conditioner.num_channels",
    "out_channels": 1,
    "channels": [8, 8],
    "attention_levels": [False, False],
    "num_res_blocks": 1,
    "num_head_channels": 8,
    "norm_num_groups": 8,
}
TINY_PAPER = [
    "--paper_network_def",
    json.dumps(TINY_PAPER_NETWORK),
    "--paper_model_size",
    "[16, 16]",
    "--image_size",
    "[32, 32]",
]


def bundle_run(config: str | list[str], *overrides: str, torchrun: int = 0, check: bool = True):
    """Run a bundle config in a fresh process from the bundle root, as a user would."""
    configs = config if isinstance(config, str) else json.dumps(config)
    if torchrun:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
        command += ["-m", "monai.bundle", "run"]
    else:
        command = [sys.executable, "-m", "monai.bundle", "run"]
    command += ["--config_file", configs, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(command, cwd=BUNDLE_ROOT, capture_output=True, text=True, env=env, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> str:
    nib.save(nib.Nifti1Image(array.astype(np.float32), affine), str(path))
    return path.name


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    """Six target-only training slices and two paired test slices, in the prepare workflow's datalist layout."""
    root = tmp_path_factory.mktemp("tiny_dataset")
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    datalist = {"training": [], "source_training": [], "testing": []}
    for i in range(6):
        t1 = phantom(32, seed=i)[0, 0].numpy()
        labels = np.digitize(t1, [0.05, 0.3, 0.7]).astype(np.float32)
        datalist["training"].append({"image": _save(t1 * 800, affine, root / f"train_{i}_T1w.nii.gz"), "subject": "s1"})
        # the training subjects' source slices with their siblings, as the prepare workflow writes them (validation)
        pd = _save(np.where(t1 > 0, 1.1 - t1, 0) * 900, affine, root / f"train_{i}_PDw.nii.gz")
        _save(labels, affine, root / f"train_{i}_dseg.nii.gz")
        _save((labels > 0).astype(np.float32), affine, root / f"train_{i}_mask.nii.gz")
        datalist["source_training"].append({"image": pd, "subject": "s1"})
    for i in range(2):
        t1 = phantom(32, seed=10 + i)[0, 0].numpy()
        pd = np.where(t1 > 0, 1.1 - t1, 0)
        labels = np.digitize(t1, [0.05, 0.3, 0.7]).astype(np.float32)
        datalist["testing"].append(
            {
                "image": _save(pd * 900, affine, root / f"test_{i}_pd.nii.gz"),
                "target": _save(t1 * 800, affine, root / f"test_{i}_t1.nii.gz"),
                "label": _save(labels, affine, root / f"test_{i}_label.nii.gz"),
                "mask": _save((labels > 0).astype(np.float32), affine, root / f"test_{i}_mask.nii.gz"),
                "subject": "s2",
            }
        )
    (root / "datalist.json").write_text(json.dumps(datalist))
    return root


def train_overrides(dataset: Path, models: Path, epochs: int, tiny: list[str] = TINY) -> list[str]:
    return tiny + [
        "--dataset_dir", str(dataset),
        "--ckpt_dir", str(models),
        "--output_dir", str(models / "logs"),
        "--batch_size", "3",
        "--train#trainer#max_epochs", str(epochs),
        "--val_interval", "1",
        "--num_val_slices", "2",
        "--val_steps", "2",
    ]  # fmt: skip


def test_training_runs_and_resumes_after_an_interruption(tiny_dataset, tmp_path):
    models = tmp_path / "models"
    first = bundle_run("configs/train.json", *train_overrides(tiny_dataset, models, epochs=1))
    first_log = first.stdout + first.stderr
    assert "val_dice" in first_log and "val_ssim" in first_log, "the validation handler must log Dice and SSIM"
    checkpoint = models / "checkpoints" / "checkpoint_epoch=1.pt"
    assert checkpoint.is_file() and (models / "model.pt").is_file()
    rows = (models / "training_log.csv").read_text().splitlines()
    assert rows[0].split(",")[:4] == ["iteration", "epoch", "wall_s", "images_seen"] and len(rows) == 2
    weights = torch.load(models / "model.pt", weights_only=True)

    # A second run with more epochs continues from epoch 1 instead of starting again.
    # The campaign may lower the learning rate between runs: the configured rate wins over the checkpoint's.
    second = bundle_run(
        "configs/train.json", *train_overrides(tiny_dataset, models, epochs=2), "--learning_rate", "0.0002"
    )
    log = second.stdout + second.stderr
    assert "resuming from" in log and "Epoch[2]" in log and "Epoch[1]" not in log
    assert (models / "checkpoints" / "checkpoint_epoch=2.pt").is_file()
    state = torch.load(models / "checkpoints" / "checkpoint_epoch=2.pt", weights_only=False)
    assert state["optimizer"]["param_groups"][0]["lr"] == 0.0002
    assert float(state["wall_clock"]["wall_s"]) > 0, "the campaign's wall time is part of the resume state"
    assert not checkpoint.exists(), "only the newest checkpoint is kept"
    updated = torch.load(models / "model.pt", weights_only=True)
    assert any(not torch.equal(weights[k], updated[k]) for k in weights), "resumed training must update the weights"
    rows = [row.split(",") for row in (models / "training_log.csv").read_text().splitlines()[1:]]
    assert [int(row[1]) for row in rows] == [1, 2], "the campaign log continues across the resume"
    assert float(rows[1][2]) > float(rows[0][2]) and int(rows[1][0]) > int(rows[0][0])


def test_paper_recipe_trains_with_its_own_network(tiny_dataset, tmp_path):
    models = tmp_path / "models"
    bundle_run("configs/train_lmi_paper.json", *train_overrides(tiny_dataset, models, epochs=1, tiny=TINY_PAPER))
    assert (models / "checkpoints_lmi_paper" / "checkpoint_epoch=1.pt").is_file()
    state = torch.load(models / "lmi_paper.pt", weights_only=True)
    assert state["conv_in.conv.weight"].shape[1] == 4, "x_t, LMI(s, x_t), LMI(s, s) and the head mask"


def test_a_source_image_in_the_training_list_stops_training(tiny_dataset, tmp_path):
    leaky = tmp_path / "leaky"
    leaky.mkdir()
    datalist = json.loads((tiny_dataset / "datalist.json").read_text())
    source = tiny_dataset / datalist["testing"][0]["image"]
    datalist["training"].append({"image": str(source), "subject": "s2"})
    (leaky / "datalist.json").write_text(json.dumps(datalist))
    overrides = train_overrides(tiny_dataset, tmp_path / "models", epochs=1)
    result = bundle_run("configs/train.json", *overrides, "--datalist", str(leaky / "datalist.json"), check=False)
    assert result.returncode != 0
    assert "looks like a source-modality image" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "models" / "model.pt").exists()


def test_two_process_cpu_ddp_training(tiny_dataset, tmp_path):
    models = tmp_path / "models"
    result = bundle_run(
        ["configs/train.json", "configs/multi_gpu_train.json"],
        *train_overrides(tiny_dataset, models, epochs=1),
        torchrun=2,
    )
    assert (models / "checkpoints" / "checkpoint_epoch=1.pt").is_file(), result.stdout[-2000:]
    state = torch.load(models / "model.pt", weights_only=True)
    assert "unet.conv_in.conv.weight" in state, "the default translator's space-to-depth UNet"
    assert not any(k.startswith("module.") for k in state), "exported weights must load without DDP"


@pytest.fixture(scope="module")
def tiny_model(tiny_dataset, tmp_path_factory) -> Path:
    models = tmp_path_factory.mktemp("tiny_models")
    bundle_run("configs/train.json", *train_overrides(tiny_dataset, models, epochs=1), "--val_interval", "100")
    return models / "model.pt"


def infer_overrides(model: Path, output: Path, *extra: str) -> list[str]:
    return TINY + ["--model_path", str(model), "--output_dir", str(output), "--num_steps", "2", *extra]


@pytest.mark.parametrize("method", ["lmi", "sdedit"])
def test_inference_on_2d_slices_keeps_the_affine(tiny_dataset, tiny_model, tmp_path, method):
    output = tmp_path / "out"
    extra = ["--datalist", str(tiny_dataset / "datalist.json"), "--method", method]
    bundle_run("configs/inference.json", *infer_overrides(tiny_model, output, *extra))
    written = json.loads((output / "datalist_translated.json").read_text())["testing"]
    assert len(written) == 2
    for entry in written:
        image = nib.load(output / entry["image"])
        source = nib.load(entry["source_image"])
        assert image.shape == source.shape and np.allclose(image.affine, source.affine)
        data = image.get_fdata()
        assert data.min() >= 0 and data.max() <= 1 and data.max() > 0
    assert (output / "translation.png").is_file()
    assert not list(output.glob("*.partial*")), "no temporary file may remain"


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
        ("mismatched_model", "does not match the network"),
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
    else:
        inputs = _write(tmp_path, "x.nii.gz", good)
        model = tmp_path / ("absent.pt" if case == "missing_model" else "other.pt")
        if case == "mismatched_model":
            torch.save({"conv_in.weight": torch.zeros(1)}, model)
    output = tmp_path / "out"
    result = bundle_run(
        "configs/inference.json", *infer_overrides(model, output, "--input_dir", str(inputs)), check=False
    )
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
    assert not output.exists() or not any(output.iterdir()), "a failed run leaves no output"
