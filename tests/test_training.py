"""Training-campaign helpers (scripts.training): the target-only guard, the campaign log, clipping, learning rate."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import pytest
import torch

from scripts.training import ClipGradients, SetLearningRate, SourceLeakError, TrainingLog, WallClock, target_only


def test_target_only_accepts_target_images():
    entries = [{"image": "slices/sub-01/sub-01_slice-080_T1w.nii.gz"}, {"image": "ixi/IXI002-Guys-0828-T1.nii.gz"}]
    assert target_only(entries) is entries


@pytest.mark.parametrize(
    "name",
    [
        "slices/sub-01/sub-01_slice-080_PDw.nii.gz",
        "slices/sub-01/sub-01_slice-080_T2w.nii.gz",
        "IXI002-Guys-0828-PD.nii.gz",
        "IXI002-Guys-0828-T2.nii.gz",
        "training/source_sub-01_slice-080.nii.gz",
        "case_FLAIR.nii.gz",
    ],
)
def test_target_only_rejects_source_images(name):
    with pytest.raises(SourceLeakError, match="source-modality image"):
        target_only([{"image": "slices/sub-01/sub-01_slice-080_T1w.nii.gz"}, {"image": name}])


def test_target_only_rejects_an_empty_list():
    with pytest.raises(ValueError, match="empty"):
        target_only([])


def _trainer(iteration: int, epoch: int, batch_size: int = 8) -> SimpleNamespace:
    state = SimpleNamespace(iteration=iteration, epoch=epoch)
    return SimpleNamespace(state=state, data_loader=SimpleNamespace(batch_size=batch_size))


def test_training_log_appends_rows_and_sums_wall_time_across_runs(tmp_path):
    path = tmp_path / "log.csv"
    evaluator = SimpleNamespace(state=SimpleNamespace(metrics={"val_dice": 0.5, "val_ssim": 0.6}))
    first = TrainingLog(path, _trainer(100, 1))
    first(evaluator)
    written = float(next(csv.DictReader(open(path)))["wall_s"])
    resumed = TrainingLog(path, _trainer(200, 2))  # a new run reads the last wall time as its offset
    resumed.trainer.state.iteration = 200
    resumed(evaluator)
    rows = list(csv.DictReader(open(path)))
    assert [int(r["iteration"]) for r in rows] == [100, 200]
    assert [int(r["images_seen"]) for r in rows] == [800, 1600]
    assert float(rows[1]["wall_s"]) >= written and rows[1]["val_dice"] == "0.5"
    assert not list(tmp_path.glob(".*tmp")), "no temporary file remains"


def test_clip_gradients_bounds_the_global_norm():
    network = torch.nn.Linear(4, 1)
    network(torch.full((2, 4), 100.0)).sum().backward()
    assert torch.nn.utils.get_total_norm([p.grad for p in network.parameters()]) > 1.0
    ClipGradients(network, max_norm=1.0)(None)
    assert torch.nn.utils.get_total_norm([p.grad for p in network.parameters()]) == pytest.approx(1.0, rel=1e-4)
    with pytest.raises(ValueError, match="max_norm"):
        ClipGradients(network, max_norm=0)


def test_set_learning_rate_overrides_every_group():
    optimizer = torch.optim.AdamW([{"params": [torch.zeros(1, requires_grad=True)], "lr": 1e-3}])
    SetLearningRate(optimizer, 5e-4)(None)
    assert [g["lr"] for g in optimizer.param_groups] == [5e-4]


def test_resume_skips_objects_the_checkpoint_lacks_and_rejects_an_unreadable_one(tmp_path):
    from scripts.training import resume_handlers

    network = torch.nn.Linear(2, 1)
    torch.save({"model": network.state_dict()}, tmp_path / "checkpoint_epoch=3.pt")
    loaders = resume_handlers(tmp_path, {"model": network, "wall_clock": WallClock()})
    assert len(loaders) == 1 and set(loaders[0].load_dict) == {"model"}
    (tmp_path / "checkpoint_epoch=4.pt").write_bytes(b"\0" * 10)  # a save cut short
    with pytest.raises(ValueError, match="cannot be read"):
        resume_handlers(tmp_path, {"model": network})
    assert resume_handlers(tmp_path / "absent", {"model": network}) == []


def test_wall_clock_continues_from_its_saved_state():
    clock = WallClock()
    clock.load_state_dict({"wall_s": torch.tensor(100.0)})
    assert 100.0 <= clock.seconds() < 101.0
    assert float(clock.state_dict()["wall_s"]) >= 100.0
