"""Continue a campaign's step count in a stage that was warm-started from it (``--init_weights``).

A warm-started stage (for example a denoiser deepened with ``--init_num_res_blocks``) starts its trainer at step 0,
its own log and its own clock. To ship it as the continuation of the campaign it grew from, its resume state and log
are moved onto that campaign's count: every checkpoint's trainer step, epoch (file name) and wall clock, and every
log row's step, epoch, images seen and wall time, are shifted by the last row of the earlier campaign's log, whose
rows are then put first. Resuming the result with the default command continues both, and the learning-rate schedule
(a function of the step) sees the campaign's step.

    python tools/rebase_campaign.py --prior_log models/training_log.csv --log STAGE/log.csv \
        --checkpoint_dir STAGE/checkpoints

Both the stage log and its checkpoints are rewritten in place (atomically; a checkpoint is written under its new
name before the old name is removed). A stage that already holds the earlier rows is refused.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.io import write_torch_atomic  # noqa: E402
from scripts.training import checkpoints, write_log_rows  # noqa: E402


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise SystemExit(f"error: training log {path} not found")
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise SystemExit(f"error: training log {path} has no rows")
    return rows


def rebase(prior_log: Path, log: Path, checkpoint_dir: Path) -> dict:
    """Shift the stage at `log` and `checkpoint_dir` onto the count of `prior_log` (see the module docstring)."""
    prior, stage = read_rows(prior_log), read_rows(log)
    last = prior[-1]
    steps, epochs = int(last["iteration"]), int(last["epoch"])
    wall, images = float(last["wall_s"]), int(last["images_seen"])
    if int(stage[0]["iteration"]) > steps or stage[0] == prior[0]:
        raise SystemExit(f"error: {log} already continues {prior_log} (its first step is {stage[0]['iteration']})")
    found = checkpoints(checkpoint_dir)
    if not found:
        raise SystemExit(f"error: no checkpoint_epoch_N.pt in {checkpoint_dir}")
    for path in found:
        state = torch.load(path, map_location="cpu", weights_only=True)
        trainer = state["trainer"]
        if int(trainer["iteration"]) % int(trainer["epoch_length"]) or steps % int(trainer["epoch_length"]):
            raise SystemExit(f"error: {path} or {prior_log} does not end on an epoch of {trainer['epoch_length']} steps")
        trainer["iteration"] = int(trainer["iteration"]) + steps
        if "epoch" in trainer:  # ignite stores either the epoch or the iteration and epoch length
            trainer["epoch"] = int(trainer["epoch"]) + epochs
        state["wall_clock"]["wall_s"] = state["wall_clock"]["wall_s"] + wall
        epoch = int(re.search(r"_(\d+)\.pt$", path.name).group(1)) + epochs
        write_torch_atomic(state, path.with_name(f"checkpoint_epoch_{epoch}.pt"))
        path.unlink()
    shifted = [
        {
            **row,
            "iteration": int(row["iteration"]) + steps,
            "epoch": int(row["epoch"]) + epochs,
            "wall_s": round(float(row["wall_s"]) + wall, 1),
            "images_seen": int(row["images_seen"]) + images,
        }
        for row in stage
    ]
    write_log_rows(log, prior + shifted)
    return {"steps": steps, "epochs": epochs, "wall_s": wall, "images_seen": images, "rows": len(shifted)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prior_log", type=Path, required=True, help="log of the campaign the stage grew from")
    parser.add_argument("--log", type=Path, required=True, help="the warm-started stage's log (rewritten)")
    parser.add_argument("--checkpoint_dir", type=Path, required=True, help="the stage's checkpoints (rewritten)")
    args = parser.parse_args(argv)
    shift = rebase(args.prior_log, args.log, args.checkpoint_dir)
    print(
        f"shifted {shift['rows']} rows and the checkpoints by {shift['steps']} steps, {shift['epochs']} epochs, "
        f"{shift['wall_s']:.0f} s; {args.log} now starts with {args.prior_log}'s rows"
    )
    return shift


if __name__ == "__main__":
    main()
