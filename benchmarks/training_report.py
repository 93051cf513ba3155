"""The training campaigns' logs as a table, a JSON summary and a curve figure.

Reads each campaign log written by ``scripts.training.TrainingLog`` (``models/training_log.csv`` for the default
translator), prints steps, images seen, wall time and the validation scores per validation, writes
``benchmarks/results/training.json`` and draws ``docs/images/training_curve.png`` (validation Dice, SSIM and PSNR on
the validation slices the log's ``validation`` column names, never test subjects, against steps and wall-clock
hours).

    python benchmarks/training_report.py [--log models/training_log.csv] [--figure docs/images/training_curve.png]
        [--marker "19588:learning-rate decay starts"]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BUNDLE_ROOT))

from scripts.io import write_text_atomic  # noqa: E402
from scripts.visualize import read_training_log, save_training_curve  # noqa: E402


def summarise(rows: list[dict[str, float]]) -> dict:
    """The campaign's budget so far and its best validation Dice."""
    last = rows[-1]
    comparable = [row for row in rows if row.get("validation") == last.get("validation")]  # the last set's rows
    best = max(comparable, key=lambda row: row.get("val_dice", float("-inf")))
    return {
        "steps": int(last["iteration"]),
        "epochs": int(last["epoch"]),
        "images_seen": int(last["images_seen"]),
        "wall_hours": round(last["wall_s"] / 3600.0, 2),
        "last": {k: v for k, v in last.items() if k.startswith("val_")},
        "best_val_dice": {"steps": int(best["iteration"]), "value": best.get("val_dice")},
    }


def validation_sets(rows: list[dict]) -> list[dict]:
    """Each validation set of the log (its ``validation`` column) with the steps it covered: scores of different
    sets do not compare."""
    sets: list[dict] = []
    for row in rows:
        name = row.get("validation", "unnamed")
        if not sets or sets[-1]["slices"] != name:
            sets.append({"slices": name, "first_step": int(row["iteration"])})
        sets[-1]["last_step"] = int(row["iteration"])
    return sets


def marker(text: str) -> tuple[int, str]:
    """``STEP:LABEL`` -> (step, label)."""
    step, separator, label = text.partition(":")
    if not separator or not step.strip().isdigit() or not label.strip():
        raise argparse.ArgumentTypeError(f"expected STEP:LABEL (e.g. '19588:learning-rate decay starts'), got {text!r}")
    return int(step), label.strip()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log", type=Path, default=BUNDLE_ROOT / "models" / "training_log.csv")
    parser.add_argument("--figure", type=Path, default=BUNDLE_ROOT / "docs" / "images" / "training_curve.png")
    parser.add_argument("--output", type=Path, default=BUNDLE_ROOT / "benchmarks" / "results" / "training.json")
    parser.add_argument("--hardware", default="2-core x86_64 CPU, 1 torch thread (beside other work)")
    parser.add_argument("--name", default="default translator", help="the model, for the figure's title")
    parser.add_argument(
        "--marker", type=marker, action="append", default=[], help="STEP:LABEL, a change of recipe to mark (repeatable)"
    )
    args = parser.parse_args(argv)
    if not args.log.is_file():
        raise SystemExit(f"error: training log not found: {args.log}")
    rows = read_training_log(args.log)
    print(f"{'steps':>7} {'epoch':>6} {'hours':>6} {'images':>8} {'Dice':>6} {'SSIM':>6} {'PSNR':>6}")
    for row in rows:
        print(
            f"{int(row['iteration']):7d} {int(row['epoch']):6d} {row['wall_s'] / 3600:6.2f}"
            f" {int(row['images_seen']):8d}"
            f" {row.get('val_dice', float('nan')):6.3f} {row.get('val_ssim', float('nan')):6.3f}"
            f" {row.get('val_psnr', float('nan')):6.2f}"
        )
    summary = {
        "log": os.path.relpath(args.log, BUNDLE_ROOT),
        "hardware": args.hardware,
        "validation": validation_sets(rows),
        **summarise(rows),
        "recipe_changes": [{"step": step, "change": label} for step, label in args.marker],
        "command": shlex.join(["python", "benchmarks/training_report.py", *(sys.argv[1:] if argv is None else argv)]),
    }
    write_text_atomic(args.output, json.dumps(summary, indent=4) + "\n")
    title = f"{args.name}: {summary['steps']:,} steps, {summary['wall_hours']} h ({args.hardware})"
    save_training_curve(
        rows, args.figure, title=title, metrics=("val_dice", "val_ssim", "val_psnr"), markers=dict(args.marker)
    )
    print(f"wrote {args.output} and {args.figure}")
    return summary


if __name__ == "__main__":
    main()
