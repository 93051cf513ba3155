"""Choose the default translator's sampling settings on validation data (never the test subjects).

Runs the evaluation workflow (``scripts.configs.config_files("evaluate", method)``) on PDw slices of the *training*
subjects of ``--dataset`` (their source images never reach training; only their T1w do;
``scripts.training.paired_training_slices`` pairs each with its T1w, labels and mask) for each combination of DDIM
steps, DDIM ``eta``, ``guidance_scale`` and ``guidance_every`` in the grid, with the same seed, and prints Dice /
PSNR / SSIM / seconds per slice; writes ``benchmarks/results/sampling_<method>.json``. ``--method sdedit`` instead
searches SDEdit's start timestep (``--starts``) and steps with the same network; ``--method lmi_projection`` the
projection's spatial window (``--windows``, pixels of the 128 x 128 grid; 0: the same sampler unprojected). The
setting with the best mean Dice (ties: SSIM) is the one to put in ``configs/inference.json``
(``configs/methods/sdedit.json`` for SDEdit's start).

    python benchmarks/tune_sampling.py [--dataset data/labelmaps] [--slices 24] [--steps 10,20,40] [--etas 0,1]
        [--scales 0,0.05] [--every 1,2] [--samples 4 --mirror 1] [--stops 0,300,650]
    python benchmarks/tune_sampling.py --method sdedit --starts 300,500,700
    python benchmarks/tune_sampling.py --method lmi_projection --windows 0,3,6,12 --samples 4
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BUNDLE_ROOT))

from scripts.configs import config_files  # noqa: E402
from scripts.io import write_text_atomic  # noqa: E402
from scripts.training import paired_training_slices  # noqa: E402

# the default translator's sampling settings and calibration in configs/inference.json; `evaluate` passes the
# sampling ones, the workflow reads `output_gamma` from the config (benchmarks that fit it override it)
SHIPPED_KEYS = (
    "num_steps", "eta", "stop_timestep", "guidance_scale", "guidance_every", "num_samples", "mirror_samples",
    "output_gamma",
)  # fmt: skip


def shipped_sampling() -> dict:
    """The default translator's settings as ``configs/inference.json`` ships them (``SHIPPED_KEYS``)."""
    config = json.loads((BUNDLE_ROOT / "configs" / "inference.json").read_text())
    return {key: config[key] for key in SHIPPED_KEYS}


def read_mean(folder: Path, metric: str) -> float:
    with open(folder / f"{metric}_summary.csv") as handle:
        rows = {row["class"]: float(row["mean"]) for row in csv.DictReader(handle)}
    return rows["mean"]


def evaluate(
    method: str, model: Path, dataset: Path, slices: int, setting: dict, seed: int, work: Path, extra: tuple = ()
) -> dict:
    """One run of the evaluation workflow with `setting` (and `extra` command-line overrides); its mean scores."""
    if setting.get("projection_window") == 0:  # the reference row: the same sampler without the projection
        method = "lmi"
    command = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", json.dumps(config_files("evaluate", method)),
        "--model_path", str(model), "--dataset_dir", str(dataset), "--num_slices", str(slices),
        "--num_steps", str(setting["num_steps"]), "--eta", str(setting["eta"]),
        "--num_samples", str(setting.get("num_samples", 1)),
        "--mirror_samples", str(bool(setting.get("mirror_samples", 0))),
        "--guidance_scale", str(setting["guidance_scale"]), "--guidance_every", str(setting["guidance_every"]),
        "--seed", str(seed), "--output_dir", str(work),
    ]  # fmt: skip
    if "stop_timestep" in setting:  # else the configured one
        command += ["--stop_timestep", str(setting["stop_timestep"])]
    if "sdedit_start" in setting:
        command += ["--sdedit_start", str(setting["sdedit_start"])]
    if setting.get("projection_window"):
        command += ["--projection#spatial_sigma", str(setting["projection_window"])]
    command += list(extra)
    result = subprocess.run(command, cwd=BUNDLE_ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    folder = work / method
    return {**setting, **{name: round(read_mean(folder, name), 4) for name in ("dice", "psnr", "ssim", "seconds")}}


def validation_pairs(dataset: Path, slices: int) -> list[dict]:
    """`slices` validation pairs of `dataset` (training subjects' PDw with their T1w, labels and mask), or a one-line
    exit when it has none (e.g. a test-only dataset such as the second physics)."""
    try:
        return paired_training_slices(dataset / "datalist.json", slices)
    except ValueError as error:
        raise SystemExit(f"error: {error} (validation needs training subjects' source/target pairs)") from None


def validation_workspace(model: Path, dataset: Path, slices: int, work: Path) -> tuple[Path, Path, list[dict]]:
    """A snapshot of `model` and a datalist of `slices` validation pairs (training subjects' PDw) under `work`.

    The snapshot keeps one set of weights for every run, even while a training run rewrites `model`.
    Returns the snapshot, the folder holding the datalist, and its entries.
    """
    validation = work / "validation"
    validation.mkdir()
    snapshot = work / "model.pt"
    shutil.copyfile(model, snapshot)
    entries = validation_pairs(dataset, slices)
    (validation / "datalist.json").write_text(json.dumps({"testing": entries}))
    return snapshot, validation, entries


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="lmi", choices=["lmi", "sdedit", "lmi_projection"])
    parser.add_argument("--model", type=Path, default=BUNDLE_ROOT / "models" / "model.pt")
    parser.add_argument("--dataset", type=Path, default=BUNDLE_ROOT / "data" / "labelmaps")
    parser.add_argument("--slices", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", default="20", help="comma-separated DDIM step counts")
    parser.add_argument("--etas", default="0", help="comma-separated DDIM eta values (0 = deterministic)")
    parser.add_argument("--scales", default="0", help="comma-separated LMI-guidance scales (0 = off)")
    parser.add_argument("--every", default="1", help="comma-separated guidance frequencies (every n-th step)")
    parser.add_argument("--samples", default="1", help="comma-separated samples per slice, averaged (--method lmi)")
    parser.add_argument(
        "--mirror", default="0", help="comma-separated 0/1: every second sample on the mirrored source (--method lmi)"
    )
    parser.add_argument(
        "--stops", default="0", help="comma-separated stop timesteps: the last reverse step walked (--method lmi)"
    )
    parser.add_argument("--starts", default="500", help="comma-separated SDEdit start timesteps (--method sdedit)")
    parser.add_argument(
        "--windows", default="12", help="comma-separated projection windows, 0 = none (--method lmi_projection)"
    )
    parser.add_argument("--output", type=Path, help="default: benchmarks/results/sampling_<method>.json")
    args = parser.parse_args(argv)
    output = args.output or BUNDLE_ROOT / "benchmarks" / "results" / f"sampling_{args.method}.json"
    if not (args.dataset / "datalist.json").is_file():
        raise SystemExit(f"error: {args.dataset}/datalist.json not found (prepare.json --source labelmaps writes it)")
    axes = {
        "num_steps": [int(v) for v in args.steps.split(",")],
        "eta": [float(v) for v in args.etas.split(",")],
        "guidance_scale": [float(v) for v in args.scales.split(",")],
        "guidance_every": [int(v) for v in args.every.split(",")],
        "num_samples": [int(v) for v in args.samples.split(",")],
        "mirror_samples": [int(v) for v in args.mirror.split(",")],
        "stop_timestep": [int(v) for v in args.stops.split(",")],
    }
    if args.method == "sdedit":  # SDEdit starts from the noised source: no guidance, its own start step
        axes = {"num_steps": axes["num_steps"], "sdedit_start": [int(v) for v in args.starts.split(",")]}
        axes.update(eta=[0.0], guidance_scale=[0.0], guidance_every=[1], num_samples=[1], mirror_samples=[0])
        axes.update(stop_timestep=[0])
    if args.method == "lmi_projection":  # the default sampler, its final x0 estimate projected
        axes["projection_window"] = [float(v) for v in args.windows.split(",")]
    grid = [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]
    grid = [g for g in grid if g["guidance_scale"] > 0 or g["guidance_every"] == 1]  # every needs guidance
    grid = [g for g in grid if g["num_samples"] > 1 or not g["mirror_samples"]]  # mirroring needs two samples
    rows = []
    start = f" {'start':>5}" if "sdedit_start" in axes else f" {'n':>5}"
    start += f" {'window':>6}" if "projection_window" in axes else ""
    start += f" {'stop':>4}"
    print(
        f"{'steps':>5} {'eta':>4} {'scale':>6} {'every':>5}{start} {'Dice':>6} {'PSNR':>6} {'SSIM':>6} {'s/slice':>7}"
    )
    with tempfile.TemporaryDirectory() as work:
        model, validation, _ = validation_workspace(args.model, args.dataset, args.slices, Path(work))
        for index, setting in enumerate(grid):
            row = evaluate(args.method, model, validation, args.slices, setting, args.seed, Path(work) / f"run{index}")
            rows.append(row)
            cells = f"{row['dice']:6.3f} {row['psnr']:6.2f} {row['ssim']:6.3f} {row['seconds']:7.2f}"
            knobs = f"{row['num_steps']:5d} {row['eta']:4.1f} {row['guidance_scale']:6.3f} {row['guidance_every']:5d}"
            knobs += f" {row['sdedit_start']:5d}" if "sdedit_start" in row else f" {row['num_samples']:5d}"
            knobs += "m" if row.get("mirror_samples") else " "
            knobs += f" {row['projection_window']:6.1f}" if "projection_window" in row else ""
            knobs += f" {row['stop_timestep']:4d}"
            print(f"{knobs} {cells}")
    best = max(rows, key=lambda r: (r["dice"], r["ssim"]))
    summary = {
        "benchmark": "sampling settings (DDIM steps and eta, LMI guidance) of the default translator",
        "method": args.method,
        "model": os.path.relpath(args.model, BUNDLE_ROOT),
        "dataset": os.path.relpath(args.dataset, BUNDLE_ROOT),
        "split": "PDw slices of the training subjects (never trained on; no test subject), spread over the list",
        "slices": args.slices,
        "seed": args.seed,
        "rows": rows,
        "best": best,
        "command": "python benchmarks/tune_sampling.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    write_text_atomic(output, json.dumps(summary, indent=4) + "\n")
    print(f"best: {', '.join(f'{k} {best[k]}' for k in axes)}; wrote {output}")
    return rows


if __name__ == "__main__":
    main()
