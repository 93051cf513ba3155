"""Plain helpers shared by the test modules: the bundle root, running a bundle config in a fresh process, writing a
test slice, and the tiny settings of the default translator. Fixtures live in conftest.py; test modules import
these with ``from helpers import ...`` (tests/ is on ``sys.path`` through the rootdir conftest), never from another
test module."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.bundle import ConfigParser

from scripts.configs import config_files

BUNDLE_ROOT = Path(__file__).resolve().parents[1]

# The --config_file lists of the workflows the tests run (scripts.configs composes them)
INFERENCE = config_files("inference")
EVALUATE = config_files("evaluate")
TRAIN = config_files("train")

# 2 mm voxels: the geometry of the synthetic slices the datasets of the tests are made of
SLICE_AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def save_slice(array: np.ndarray, path: Path, affine: np.ndarray = SLICE_AFFINE) -> str:
    """Write `array` as float32 NIfTI at `path`; return the file name, as the datalists of the tests list it."""
    nib.save(nib.Nifti1Image(np.asarray(array).astype(np.float32), affine), str(path))
    return path.name


def composed_parser(workflow: str, method: str | None = None, overrides: list[str] = ()) -> ConfigParser:
    """The configs of `workflow` (with `method`'s override) read as the bundle runner composes them, then the
    command-line `overrides` (``["--key", "value", ...]``) applied: a value is JSON where it parses, else a string."""
    parser = ConfigParser()
    parser.read_config([BUNDLE_ROOT / f for f in config_files(workflow, method)])
    for key, text in zip(overrides[::2], overrides[1::2], strict=True):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        parser[key[2:]] = value
    return parser


def bundle_env() -> dict[str, str]:
    """The environment of a bundle run started by a test: one thread each (the CI machine has 2 cores), no warnings."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def bundle_command(config: str | list[str], *overrides: str, torchrun: int = 0) -> list[str]:
    """``python -m monai.bundle run --config_file CONFIG OVERRIDES``, under ``torch.distributed.run`` with `torchrun`
    processes when it is not 0. A list of configs is passed as one JSON list (a base and its overrides)."""
    configs = config if isinstance(config, str) else json.dumps(config)
    if torchrun:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
        command += ["-m", "monai.bundle", "run"]
    else:
        command = [sys.executable, "-m", "monai.bundle", "run"]
    return command + ["--config_file", configs, *overrides]


def bundle_run(
    config: str | list[str],
    *overrides: str,
    torchrun: int = 0,
    check: bool = True,
    timeout: float = 600,
    cwd: Path = BUNDLE_ROOT,
) -> subprocess.CompletedProcess:
    """Run a bundle config in a fresh process from `cwd` (the bundle root by default), as a user would. With `check`,
    a non-zero exit status fails the test with the command and the tails of its output."""
    command = bundle_command(config, *overrides, torchrun=torchrun)
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=bundle_env(), timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def sigterm_once_staging(
    config: str | list[str], *overrides: str, staging: Path, pattern: str, wait: float = 0.0
) -> tuple:
    """Start a bundle run, send it SIGTERM once its staging folder (`pattern` in `staging`) exists (and `wait` more
    seconds have passed), and return its exit status and stderr."""
    process = subprocess.Popen(
        bundle_command(config, *overrides), cwd=BUNDLE_ROOT, env=bundle_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not list(staging.glob(pattern)) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert list(staging.glob(pattern)), "the run writes into its staging folder"
    time.sleep(wait)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    return process.returncode, stderr.decode()


def ended_pid() -> int:
    """The id of a process that has ended, for the marker of a staging folder left by a killed run."""
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(ended.stdout)


# A network small enough to train two iterations in seconds; the same overrides go to every workflow.
TINY = [
    "--network_channels", "[8, 8]",
    "--attention_levels", "[False, False]",
    "--num_head_channels", "8",
    "--norm_num_groups", "8",
    "--model_size", "[32, 32]",
    "--image_size", "[32, 32]",
]  # fmt: skip
# The same for the paper's recipe (configs/methods/lmi_paper.json), which has its own network.
TINY_PAPER_NETWORK = {
    "_target_": "DiffusionModelUNet",
    "spatial_dims": 2,
    "in_channels": "$1 + @conditioner.num_channels",
    "out_channels": 1,
    "channels": [8, 8],
    "attention_levels": [False, False],
    "num_res_blocks": 1,
    "num_head_channels": 8,
    "norm_num_groups": 8,
}
TINY_PAPER = [
    "--network_def",
    json.dumps(TINY_PAPER_NETWORK),
    "--model_size",
    "[16, 16]",
    "--image_size",
    "[32, 32]",
]


# A tiny IXI preparation (32 x 32 slices, 3 per subject), for the registration and data-safety tests.
TINY_IXI = {"spatial_size": (32, 32), "fov_mm": 192.0, "slice_step_mm": 8.0, "max_slices_per_subject": 3}


def train_overrides(dataset: Path, models: Path, epochs: int, tiny: list[str] = TINY) -> list[str]:
    """The training workflow (``config_files("train")``, or ``"train_lmi_paper"`` with `tiny=TINY_PAPER`) on the tiny
    dataset, into `models`."""
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


def infer_overrides(model: Path, output: Path, *extra: str) -> list[str]:
    """The inference workflow with the tiny network's weights `model`, two sampling steps, into `output`."""
    return TINY + ["--model_path", str(model), "--output_dir", str(output), "--num_steps", "2", *extra]
