"""Training-campaign helpers (scripts.training): the target-only guard, the campaign log, clipping, learning rate."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from ignite.engine import Engine

from scripts.training import ClipGradients, LearningRateSchedule, SourceLeakError, TrainingLog, WallClock, target_only


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


def test_learning_rate_schedule_holds_then_decays_linearly_and_overrides_every_group():
    from types import SimpleNamespace

    groups = [{"params": [torch.zeros(1, requires_grad=True)], "lr": 1e-3} for _ in range(2)]
    optimizer = torch.optim.AdamW(groups)
    schedule = LearningRateSchedule(optimizer, 5e-4, decay_start=100, decay_steps=40, final_lr=1e-4)
    expected = {1: 5e-4, 100: 5e-4, 110: 4e-4, 120: 3e-4, 140: 1e-4, 10_000: 1e-4}
    for iteration, lr in expected.items():
        schedule(SimpleNamespace(state=SimpleNamespace(iteration=iteration)))
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([lr, lr]), iteration
    constant = LearningRateSchedule(optimizer, 5e-4)
    assert constant.rate(1) == constant.rate(10**6) == 5e-4
    with pytest.raises(ValueError, match="final_learning_rate"):
        LearningRateSchedule(optimizer, 5e-4, decay_start=0, decay_steps=10, final_lr=1e-3)
    with pytest.raises(ValueError, match="lr_decay_start"):
        LearningRateSchedule(optimizer, 5e-4, decay_start=-1)

    # Later stages of a campaign continue linearly from the point before, then hold the last rate.
    staged = LearningRateSchedule(optimizer, 5e-4, 100, 40, 1e-4, milestones=[[200, 1e-4], [300, 2e-5]])
    expected = {100: 5e-4, 120: 3e-4, 140: 1e-4, 200: 1e-4, 250: 6e-5, 300: 2e-5, 10_000: 2e-5}
    assert {i: staged.rate(i) for i in expected} == pytest.approx(expected)
    held = LearningRateSchedule(optimizer, 5e-4, milestones=[[10, 5e-4], [20, 1e-4]])
    assert [held.rate(i) for i in (1, 10, 15, 20, 99)] == pytest.approx([5e-4, 5e-4, 3e-4, 1e-4, 1e-4])
    for bad in ([[140, 1e-5]], [[200, 1e-5], [150, 1e-5]], [[200, 0.0]], [[200]], 5, [["x", 1e-5]]):
        with pytest.raises(ValueError, match="lr_milestones must be"):
            LearningRateSchedule(optimizer, 5e-4, 100, 40, 1e-4, milestones=bad)


def test_campaign_config_holds_the_schedule_every_stage_ran_with():
    """The shipped campaign's stages (docs/README.md, Training): 5e-4, linear to 5e-5 from step 19,588 over 8,000
    steps, 5e-5 to step 45,152, linear to 1e-5 at 51,152, then (the tissue-aware loss's stage) a warm restart up to
    4e-5 at 51,800 and down to 1e-5 at 58,500; resuming with the default config continues it."""
    from helpers import composed_parser

    parser = composed_parser("train")
    schedule = LearningRateSchedule(
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0),
        *(parser.get_parsed_content(k) for k in ("learning_rate", "lr_decay_start", "lr_decay_steps")),
        parser.get_parsed_content("final_learning_rate"),
        parser.get_parsed_content("lr_milestones"),
    )
    expected = {19_588: 5e-4, 23_588: 2.75e-4, 27_588: 5e-5, 45_152: 5e-5, 48_152: 3e-5, 51_152: 1e-5}
    expected |= {51_800: 4e-5, 55_150: 2.5e-5, 58_500: 1e-5, 65_000: 1e-5}
    assert {i: schedule.rate(i) for i in expected} == pytest.approx(expected)


def test_resume_skips_objects_the_checkpoint_lacks_and_falls_back_past_an_unreadable_one(tmp_path, caplog):
    from scripts.training import resume_handlers

    network = torch.nn.Linear(2, 1)
    torch.save({"model": network.state_dict()}, tmp_path / "checkpoint_epoch=3.pt")  # ignite's naming still loads
    handlers = resume_handlers(tmp_path, {"model": network, "wall_clock": WallClock()})
    assert len(handlers) == 2 and set(handlers[0].load_dict) == {"model"}
    (tmp_path / "checkpoint_epoch_4.pt").write_bytes(b"\0" * 10)  # a save cut short
    with caplog.at_level("WARNING"):
        handlers = resume_handlers(tmp_path, {"model": network})
    assert handlers[0].load_path.endswith("checkpoint_epoch=3.pt") and "skipping checkpoint" in caplog.text
    (tmp_path / "checkpoint_epoch=3.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="no checkpoint .* can be read"):
        resume_handlers(tmp_path, {"model": network})
    assert resume_handlers(tmp_path / "absent", {"model": network}) == []


def _ignite_trainer(epoch_length: int, batches: int, max_epochs: int = 5) -> Engine:
    trainer = Engine(lambda engine, batch: None)
    trainer.state.dataloader = list(range(batches))
    trainer.state.epoch_length, trainer.state.max_epochs = epoch_length, max_epochs
    trainer.state.iteration, trainer.state.epoch = 2 * epoch_length, 2
    return trainer


def test_resume_refuses_a_checkpoint_past_max_epochs(tmp_path):
    from scripts.training import resume_handlers

    network = torch.nn.Linear(2, 1)
    trainer = _ignite_trainer(epoch_length=83, batches=83)
    torch.save({"model": network.state_dict(), "trainer": trainer.state_dict()}, tmp_path / "checkpoint_epoch_2.pt")
    assert len(resume_handlers(tmp_path, {"model": network}, max_epochs=2)) == 2
    with pytest.raises(ValueError, match="epoch 2, past max_epochs 1: set --max_epochs above 2"):
        resume_handlers(tmp_path, {"model": network}, max_epochs=1)


def test_a_resumed_epoch_is_one_pass_over_the_new_data():
    from scripts.training import EpochLengthFromData

    trainer = _ignite_trainer(epoch_length=83, batches=6)  # the checkpoint's epoch length, another batch size
    EpochLengthFromData()(trainer)
    assert trainer.state.epoch_length == 6 and trainer.state.epoch == 2


def test_checkpoint_saver_writes_through_a_temporary_file_and_keeps_the_last_loadable_one(tmp_path, monkeypatch):
    from scripts.training import SafeCheckpointSaver, checkpoints

    network = torch.nn.Linear(2, 1)
    trainer = _ignite_trainer(epoch_length=4, batches=4)
    (tmp_path / ".checkpoint_epoch_1.pt.abc123.tmp").write_bytes(b"half")  # left by a killed save
    (tmp_path / "notes.txt").write_text("not ours")
    saver = SafeCheckpointSaver(tmp_path, {"model": network, "trainer": trainer}, keep=1)
    saver.remove_stale_temporaries()
    saver(trainer)
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint_epoch_2.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch_2.pt", "notes.txt"]

    def killed(path, data):  # the process dies after writing half of the temporary file
        (Path(path).parent / f".{Path(path).name}.xyz.tmp").write_bytes(data[: len(data) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr("scripts.io.atomic.write_bytes_atomic", killed)
    trainer.state.epoch = 3
    with pytest.raises(KeyboardInterrupt):
        saver(trainer)
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint_epoch_2.pt"], "the previous one survives"
    torch.load(tmp_path / "checkpoint_epoch_2.pt", weights_only=True)
    monkeypatch.undo()
    saver.remove_stale_temporaries()
    saver(trainer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch_3.pt", "notes.txt"]


def test_wall_clock_continues_from_its_saved_state():
    clock = WallClock()
    clock.load_state_dict({"wall_s": torch.tensor(100.0)})
    assert 100.0 <= clock.seconds() < 101.0
    assert float(clock.state_dict()["wall_s"]) >= 100.0
    earlier = WallClock(offset=50.0)  # runs before the clock existed; a saved clock replaces the offset
    assert 50.0 <= earlier.seconds() < 51.0
    earlier.load_state_dict({"wall_s": torch.tensor(100.0)})
    assert 100.0 <= earlier.seconds() < 101.0
    with pytest.raises(ValueError, match="offset"):
        WallClock(offset=-1.0)
