"""Compare trained weights of the default translator on the validation sets of both physics (no test subject).

Settings that must hold on other scanners (the scanner randomisation of ``configs/train.json``, a fork of the
campaign) are chosen here: each ``--model LABEL=PATH`` is evaluated with the shipped sampling
(``configs/inference.json``) and the same seed on ``--slices`` slices of each ``--datasets`` folder written by
``configs/prepare_validation.json`` (training subjects 02/05/08/11 re-simulated with fresh noise; physics 1 and the
second physics) or of ``data/mni`` (anatomy never trained on: the MNI152 template, randomly deformed), for each source
key (PDw ``image``, ``t2``). Prints Dice / PSNR / SSIM per model, set and source, and the means of each model, overall
and per set; writes ``benchmarks/results/<--name>.json``.

    python benchmarks/compare_weights.py --model plain=runs/a.pt --model wider=runs/b.pt [--slices 80]
        [--datasets data/labelmaps_validation,data/labelmaps_physics2_validation] [--source-keys image,t2] [--jobs 1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import fmean

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BUNDLE_ROOT))

from tune_sampling import evaluate, shipped_sampling  # noqa: E402  (benchmarks/, beside this script)

from scripts.io import write_text_atomic  # noqa: E402


def labelled_model(text: str) -> tuple[str, Path]:
    """``LABEL=PATH`` -> (label, path), for argparse (one line for a malformed or missing file)."""
    label, sep, path = text.partition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError(f"expected LABEL=PATH, got {text!r}")
    if not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"{path}: no such weights file")
    return label, Path(path)


def means_by_dataset(rows: list[dict]) -> dict:
    """{model: {dataset: {dice, psnr, ssim}}}: each metric averaged over the source keys of that model and set."""
    means: dict = {}
    for model, dataset in dict.fromkeys((row["model"], row["dataset"]) for row in rows):
        chosen = [row for row in rows if row["model"] == model and row["dataset"] == dataset]
        means.setdefault(model, {})[dataset] = {
            name: round(fmean(row[name] for row in chosen), 4) for name in ("dice", "psnr", "ssim")
        }
    return means


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=labelled_model, action="append", required=True, help="LABEL=PATH, repeatable")
    parser.add_argument(
        "--datasets", default="data/labelmaps_validation,data/labelmaps_physics2_validation", help="comma-separated"
    )
    parser.add_argument("--source-keys", default="image,t2", help="comma-separated source keys of the test entries")
    parser.add_argument("--slices", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="weights_validation", help="output: benchmarks/results/<name>.json")
    parser.add_argument(
        "--jobs", type=int, default=1, help="evaluations run at once (each with the caller's OMP_NUM_THREADS)"
    )
    args = parser.parse_args(argv)
    datasets = [Path(d) if Path(d).is_absolute() else BUNDLE_ROOT / d for d in args.datasets.split(",")]
    for dataset in datasets:
        if not (dataset / "datalist.json").is_file():
            raise SystemExit(
                f"error: {dataset}/datalist.json not found (configs/prepare_validation.json writes it; "
                "data/mni: configs/prepare.json --source mni)"
            )
    setting = shipped_sampling()
    runs = [
        (label, model, dataset, key)
        for label, model in args.model
        for dataset in datasets
        for key in args.source_keys.split(",")
    ]
    print(f"{'model':>12} {'dataset':>32} {'source':>6} {'Dice':>6} {'PSNR':>6} {'SSIM':>6}")
    with tempfile.TemporaryDirectory() as work, ThreadPoolExecutor(max_workers=args.jobs) as pool:

        def run(label: str, model: Path, dataset: Path, key: str) -> dict:
            folder = Path(work) / f"{label}-{dataset.name}-{key}"
            means = evaluate("lmi", model, dataset, args.slices, setting, args.seed, folder, ("--source_key", key))
            row = {"model": label, "dataset": dataset.name, "source_key": key}
            row |= {name: means[name] for name in ("dice", "psnr", "ssim", "seconds")}
            cells = " ".join(f"{row[name]:6.{digits}f}" for name, digits in (("dice", 3), ("psnr", 2), ("ssim", 3)))
            sys.stdout.write(f"{label:>12} {dataset.name:>32} {key:>6} {cells}\n")  # one write: jobs print at once
            sys.stdout.flush()
            return row

        rows = list(pool.map(run, *zip(*runs, strict=True)))  # in the order of `runs`, whatever finishes first
    mean_dice = {label: round(fmean(r["dice"] for r in rows if r["model"] == label), 4) for label, _ in args.model}
    for label, mean in mean_dice.items():
        print(f"{label}: mean Dice {mean:.4f} over {len(datasets)} sets x {len(args.source_keys.split(','))} sources")
    mean_by_dataset = means_by_dataset(rows)
    for label, sets in mean_by_dataset.items():
        for name, means in sets.items():
            print(f"{label}: {name}: mean Dice {means['dice']:.4f}, PSNR {means['psnr']:.2f}, SSIM {means['ssim']:.4f}")
    summary = {
        "benchmark": "trained weights of the default translator on validation sets (no test subject)",
        "models": {label: os.path.relpath(path, BUNDLE_ROOT) for label, path in args.model},
        "datasets": {
            dataset.name: json.loads((dataset / "datalist.json").read_text()).get("description", "")
            for dataset in datasets
        },
        "split": "no test subject: configs/prepare_validation.json re-simulates training subjects 02/05/08/11 with "
        "seed 2 (their T1w anatomy is in the training set, so scores run higher than on the test subjects); the `mni` "
        "source (configs/prepare.json --source mni) is anatomy the translator never saw (MNI152 template, deformed)",
        "slices": args.slices,
        "seed": args.seed,
        "sampling": setting,
        "rows": rows,
        "mean_dice": mean_dice,
        "mean_by_dataset": mean_by_dataset,
        "command": "python benchmarks/compare_weights.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    output = BUNDLE_ROOT / "benchmarks" / "results" / f"{args.name}.json"
    write_text_atomic(output, json.dumps(summary, indent=2) + "\n")
    print(f"wrote {output}")
    return summary


if __name__ == "__main__":
    main()
