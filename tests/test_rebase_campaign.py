"""tools/rebase_campaign.py: a warm-started stage continues the step count, epochs, images and wall time of the
campaign it grew from, in its resume state and in its log."""

from __future__ import annotations

import csv
import subprocess
import sys

import torch
from helpers import BUNDLE_ROOT

from scripts.training import checkpoints
from scripts.training.campaign import _stored_epoch

HEADER = "iteration,epoch,wall_s,images_seen,val_dice,validation\n"


def rebase(tmp_path) -> subprocess.CompletedProcess:
    command = [
        sys.executable, str(BUNDLE_ROOT / "tools" / "rebase_campaign.py"), "--prior_log", str(tmp_path / "prior.csv"),
        "--log", str(tmp_path / "stage.csv"), "--checkpoint_dir", str(tmp_path / "checkpoints"),
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)


def test_a_stage_is_moved_onto_the_campaign_it_grew_from_and_only_once(tmp_path):
    (tmp_path / "prior.csv").write_text(HEADER + "8,2,100.0,64,0.5,v\n16,4,200.0,128,0.6,v\n")
    (tmp_path / "stage.csv").write_text(HEADER + "8,2,30.5,64,0.62,v\n")
    (tmp_path / "checkpoints").mkdir()
    weights = {"w": torch.ones(2)}
    state = {
        "model": weights,
        "trainer": {"epoch_length": 4, "iteration": 12, "max_epochs": 10},
        "wall_clock": {"wall_s": torch.tensor(45.0, dtype=torch.float64)},
    }
    torch.save(state, tmp_path / "checkpoints" / "checkpoint_epoch_3.pt")

    result = rebase(tmp_path)
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "stage.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["iteration"], r["epoch"], r["wall_s"], r["images_seen"]) for r in rows] == [
        ("8", "2", "100.0", "64"),
        ("16", "4", "200.0", "128"),
        ("24", "6", "230.5", "192"),  # the stage's row, shifted by the earlier campaign's last row
    ]
    (moved,) = checkpoints(tmp_path / "checkpoints")
    assert moved.name == "checkpoint_epoch_7.pt"
    stored = torch.load(moved, weights_only=True)
    assert stored["trainer"]["iteration"] == 28 and _stored_epoch(stored["trainer"]) == 7
    assert float(stored["wall_clock"]["wall_s"]) == 245.0
    assert torch.equal(stored["model"]["w"], weights["w"]), "the weights themselves are untouched"

    again = rebase(tmp_path)
    assert again.returncode != 0 and "already continues" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1, "one line, no traceback"
    assert checkpoints(tmp_path / "checkpoints") == [moved]
