"""Compare trained weights of the default translator on the validation sets of both physics (no test subject).

Settings that must hold on other scanners (the scanner randomisation of ``configs/train.json``, a fork of the
campaign) are chosen here: each ``--model LABEL=PATH`` is evaluated with the shipped sampling
(``configs/inference.json``) and the same seed on ``--slices`` slices of each ``--datasets`` folder written by
``configs/prepare_validation.json`` (training subjects 02/05/08/11 re-simulated with fresh noise; physics 1 and the
second physics), for each source key (PDw ``image``, ``t2``). Prints Dice / PSNR / SSIM per model, set and source,
and the mean Dice of each model; writes ``benchmarks/results/<--name>.json``.

    python benchmarks/compare_weights.py --model plain=runs/a.pt --model wider=runs/b.pt [--slices 80]
        [--datasets data/labelmaps_validation,data/labelmaps_physics2_validation] [--source-keys image,t2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BUNDLE_ROOT))

from tune_sampling import evaluate  # noqa: E402  (benchmarks/, beside this script)

from scripts.io import write_text_atomic  # noqa: E402

SHIPPED_KEYS = ("num_steps", "eta", "num_samples", "mirror_samples", "guidance_scale", "guidance_every", "output_gamma")


def labelled_model(text: str) -> tuple[str, Path]:
    """``LABEL=PATH`` -> (label, path), for argparse (one line for a malformed or missing file)."""
    label, sep, path = text.partition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError(f"expected LABEL=PATH, got {text!r}")
    if not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"{path}: no such weights file")
    return label, Path(path)


def shipped_sampling() -> dict:
    """The default translator's sampling settings and calibration as ``configs/inference.json`` ships them."""
    config = json.loads((BUNDLE_ROOT / "configs" / "inference.json").read_text())
    return {key: config[key] for key in SHIPPED_KEYS}


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
    args = parser.parse_args(argv)
    datasets = [Path(d) if Path(d).is_absolute() else BUNDLE_ROOT / d for d in args.datasets.split(",")]
    for dataset in datasets:
        if not (dataset / "datalist.json").is_file():
            raise SystemExit(f"error: {dataset}/datalist.json not found (configs/prepare_validation.json writes it)")
    setting = shipped_sampling()
    rows = []
    print(f"{'model':>12} {'dataset':>32} {'source':>6} {'Dice':>6} {'PSNR':>6} {'SSIM':>6}")
    with tempfile.TemporaryDirectory() as work:
        for label, model in args.model:
            for dataset in datasets:
                for key in args.source_keys.split(","):
                    folder = Path(work) / f"{label}-{dataset.name}-{key}"
                    means = evaluate(
                        "lmi", model, dataset, args.slices, setting, args.seed, folder, ("--source_key", key)
                    )
                    row = {"model": label, "dataset": dataset.name, "source_key": key}
                    row |= {name: means[name] for name in ("dice", "psnr", "ssim", "seconds")}
                    rows.append(row)
                    cells = " ".join(
                        f"{row[name]:6.{digits}f}" for name, digits in (("dice", 3), ("psnr", 2), ("ssim", 3))
                    )
                    print(f"{label:>12} {dataset.name:>32} {key:>6} {cells}")
    runs = len(rows) // len(args.model)
    mean_dice = {label: round(sum(r["dice"] for r in rows if r["model"] == label) / runs, 4) for label, _ in args.model}
    for label, mean in mean_dice.items():
        print(f"{label}: mean Dice {mean:.4f} over {len(datasets)} sets x {len(args.source_keys.split(','))} sources")
    summary = {
        "benchmark": "trained weights of the default translator on the validation sets of both physics",
        "models": {label: os.path.relpath(path, BUNDLE_ROOT) for label, path in args.model},
        "split": "configs/prepare_validation.json: training subjects 02/05/08/11 re-simulated with seed 2 (no test "
        "subject; their T1w anatomy is in the training set, so scores run higher than on the test subjects)",
        "slices": args.slices,
        "seed": args.seed,
        "sampling": setting,
        "rows": rows,
        "mean_dice": mean_dice,
        "command": "python benchmarks/compare_weights.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    output = BUNDLE_ROOT / "benchmarks" / "results" / f"{args.name}.json"
    write_text_atomic(output, json.dumps(summary, indent=2) + "\n")
    print(f"wrote {output}")
    return summary


if __name__ == "__main__":
    main()
