"""Choose the default translator's LMI-guidance settings on validation data (never the test subjects).

Runs ``configs/evaluate.json --method lmi`` on PDw slices of the *training* subjects of ``--dataset`` (their source
images never reach training; only their T1w do; ``scripts.training.paired_training_slices`` pairs each with its T1w,
labels and mask) for each ``guidance_scale`` x ``guidance_every`` in the grid, with the same seed and steps, and prints
Dice / PSNR / SSIM / seconds per slice; writes ``benchmarks/results/guidance.json``. The setting with the best mean
Dice (ties: SSIM) is the one to put in ``configs/inference.json``.

    python benchmarks/tune_guidance.py [--dataset data/labelmaps] [--slices 24] [--scales 0,0.05,0.1] [--every 1,2]
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BUNDLE_ROOT))

from scripts.io import write_text_atomic  # noqa: E402
from scripts.training import paired_training_slices  # noqa: E402


def read_mean(folder: Path, metric: str) -> float:
    with open(folder / f"{metric}_summary.csv") as handle:
        rows = {row["class"]: float(row["mean"]) for row in csv.DictReader(handle)}
    return rows["mean"]


def evaluate(dataset: Path, slices: int, steps: int, scale: float, every: int, seed: int, work: Path) -> dict:
    command = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/evaluate.json",
        "--method", "lmi", "--dataset_dir", str(dataset), "--num_slices", str(slices), "--num_steps", str(steps),
        "--guidance_scale", str(scale), "--guidance_every", str(every), "--seed", str(seed), "--output_dir", str(work),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=BUNDLE_ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    folder = work / "lmi"
    return {
        "guidance_scale": scale,
        "guidance_every": every,
        **{name: round(read_mean(folder, name), 4) for name in ("dice", "psnr", "ssim", "seconds")},
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=BUNDLE_ROOT / "data" / "labelmaps")
    parser.add_argument("--slices", type=int, default=24)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scales", default="0,0.05,0.1")
    parser.add_argument("--every", default="1,2")
    parser.add_argument("--output", type=Path, default=BUNDLE_ROOT / "benchmarks" / "results" / "guidance.json")
    args = parser.parse_args(argv)
    if not (args.dataset / "datalist.json").is_file():
        raise SystemExit(f"error: {args.dataset}/datalist.json not found (prepare.json --source labelmaps writes it)")
    grid = [(float(s), int(e)) for s, e in itertools.product(args.scales.split(","), args.every.split(","))]
    grid = [(s, e) for s, e in grid if s > 0 or e == 1]  # every is meaningless without guidance
    rows = []
    print(f"{'scale':>6} {'every':>5} {'Dice':>6} {'PSNR':>6} {'SSIM':>6} {'s/slice':>7}")
    with tempfile.TemporaryDirectory() as work:
        validation = Path(work) / "validation"
        validation.mkdir()
        entries = paired_training_slices(args.dataset / "datalist.json", args.slices)
        (validation / "datalist.json").write_text(json.dumps({"testing": entries}))
        for scale, every in grid:
            folder = Path(work) / f"{scale}-{every}"
            row = evaluate(validation, args.slices, args.steps, scale, every, args.seed, folder)
            rows.append(row)
            cells = f"{row['dice']:6.3f} {row['psnr']:6.2f} {row['ssim']:6.3f} {row['seconds']:7.2f}"
            print(f"{scale:6.3f} {every:5d} {cells}")
    best = max(rows, key=lambda r: (r["dice"], r["ssim"]))
    summary = {
        "benchmark": "LMI-guidance settings of the default translator on validation slices",
        "dataset": os.path.relpath(args.dataset, BUNDLE_ROOT),
        "split": "PDw slices of the training subjects (never trained on; no test subject), spread over the list",
        "slices": args.slices,
        "steps": args.steps,
        "seed": args.seed,
        "rows": rows,
        "best": best,
        "command": "python benchmarks/tune_guidance.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    write_text_atomic(args.output, json.dumps(summary, indent=2) + "\n")
    print(f"best: guidance_scale {best['guidance_scale']}, every {best['guidance_every']} steps; wrote {args.output}")
    return rows


if __name__ == "__main__":
    main()
