"""The CycleGAN baseline: source subset by subject, image pool, trainer update, inferer, bundle training and resume."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import bundle_run, composed_parser, save_slice
from monai.data import DataLoader, MetaTensor
from phantoms import phantom

from scripts.baselines.cyclegan import (
    CycleGANInferer,
    CycleGANTrainer,
    ImagePool,
    ResnetGenerator,
    discriminator,
    load_source_subset,
    select_source_subset,
)
from scripts.configs import config_files
from scripts.lmidiffusion.inferers import SliceWiseInferer
from scripts.training import load_weights

TINY_SIZES = {"channels": 4, "num_downsamplings": 1, "num_residual_units": 1}
TINY = [
    "--generator_channels", "4",
    "--generator_downsamplings", "1",
    "--generator_residual_units", "1",
    "--discriminator_channels", "4",
    "--discriminator_layers", "2",
    "--image_size", "[32, 32]",
    "--pool_size", "4",
]  # fmt: skip


def _entries(counts: dict[str, int]) -> list[dict]:
    return [{"image": f"{s}_{k}_PDw.nii.gz", "subject": s, "slice": k} for s, n in counts.items() for k in range(n)]


# ---------------------------------------------------------------------------------------------- source subset
COUNTS = {f"sub-{i:02d}": 50 + 3 * i for i in range(1, 13)}


def test_source_subset_takes_whole_subjects_and_exactly_the_fraction(caplog):
    entries = _entries(COUNTS)
    with caplog.at_level(logging.INFO, logger="scripts.baselines.cyclegan"):
        subset = select_source_subset(entries, fraction=0.11, seed=0)
    assert len(subset) == round(0.11 * len(entries))
    assert all(any(e is s for e in entries) for s in subset), "entries are returned as given, not rebuilt"
    subjects = list(dict.fromkeys(e["subject"] for e in subset))
    counts = [sum(e["subject"] == s for e in subset) for s in subjects]
    assert all(c == COUNTS[s] for s, c in zip(subjects[:-1], counts[:-1], strict=True)), "all but the last are whole"
    assert 0 < counts[-1] <= COUNTS[subjects[-1]]
    last = sorted(e["slice"] for e in subset if e["subject"] == subjects[-1])
    if counts[-1] > 1 and counts[-1] < COUNTS[subjects[-1]]:
        assert last[-1] - last[0] > counts[-1], "a partial subject is spread over its slices, not one slab"
    assert "source subset" in caplog.text and all(s in caplog.text for s in subjects)


def test_source_subset_is_deterministic_per_seed_and_exact_for_any_fraction():
    entries = _entries(COUNTS)
    first = select_source_subset(entries, 0.11, seed=3)
    assert first == select_source_subset(entries, 0.11, seed=3)
    others = [{e["subject"] for e in select_source_subset(entries, 0.11, seed=s)} for s in range(6)]
    assert len({frozenset(o) for o in others}) > 1, "the seed chooses the subjects"
    for fraction in (0.01, 0.25, 0.5, 1.0):
        assert len(select_source_subset(entries, fraction, seed=1)) == round(fraction * len(entries))


@pytest.mark.parametrize(
    "entries, fraction, message",
    [
        ([], 0.11, "empty"),
        ([{"image": "a.nii.gz"}], 0.11, "no 'subject' key"),
        (_entries({"sub-01": 4}), 0.0, "fraction must be in"),
        (_entries({"sub-01": 4}), 1.5, "fraction must be in"),
        (_entries({"sub-01": 4}), 0.1, "selects no slice"),
    ],
)
def test_source_subset_bad_input_gives_a_clear_error(entries, fraction, message):
    with pytest.raises(ValueError, match=message):
        select_source_subset(entries, fraction)


def test_load_source_subset_reads_training_subjects_only_and_refuses_test_subjects(tmp_path):
    datalist = {
        "subjects": {"training": ["sub-01", "sub-02"], "testing": ["sub-03"]},
        "training": _entries({"sub-01": 5, "sub-02": 5}),
        "source_training": _entries({"sub-01": 5, "sub-02": 5}),
        "testing": _entries({"sub-03": 5}),
    }
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(datalist))
    subset = load_source_subset(path, tmp_path, fraction=0.5, seed=0)
    assert len(subset) == 5 and {e["subject"] for e in subset} <= {"sub-01", "sub-02"}
    assert all(Path(e["image"]).is_absolute() and str(tmp_path) in e["image"] for e in subset)

    datalist["source_training"] += _entries({"sub-03": 2})
    path.write_text(json.dumps(datalist))
    with pytest.raises(ValueError, match="test subjects"):
        load_source_subset(path, tmp_path)
    del datalist["source_training"]
    path.write_text(json.dumps(datalist))
    with pytest.raises(ValueError, match="no 'source_training' key"):
        load_source_subset(path, tmp_path)


# --------------------------------------------------------------------------------------------------- image pool
def test_image_pool_fills_then_mixes_history_and_current_fakes():
    pool = ImagePool(pool_size=4, seed=0)
    first = torch.arange(4.0).view(4, 1, 1, 1).requires_grad_()
    out = pool.query(first * 1)
    assert torch.equal(out, first.detach()) and not out.requires_grad and len(pool) == 4
    from_history = 0
    for step in range(1, 21):
        stored = set(torch.cat(pool.images).flatten().tolist())
        batch = torch.arange(4.0).view(4, 1, 1, 1) + 100.0 * step
        current = set(batch.flatten().tolist())
        out = pool.query(batch)
        assert out.shape == batch.shape and len(pool) == 4
        values = out.flatten().tolist()
        assert set(values) <= current | stored, "an output is a current fake or a stored one"
        from_history += sum(v in stored for v in values)
    assert 20 < from_history < 60, f"about half of the 80 outputs come from the history, got {from_history}"
    assert torch.equal(ImagePool(0).query(first), first.detach()), "pool_size 0 passes fakes through"
    with pytest.raises(ValueError, match="pool_size"):
        ImagePool(-1)


def test_image_pool_resumes_with_its_history_and_random_state(tmp_path):
    pool = ImagePool(pool_size=4, seed=3)
    for step in range(5):
        pool.query(torch.rand(3, 1, 2, 2) + step)
    torch.save(pool.state_dict(), tmp_path / "pool.pt")
    resumed = ImagePool(pool_size=4, seed=99)  # another seed: everything must come from the saved state
    resumed.load_state_dict(torch.load(tmp_path / "pool.pt", weights_only=True))
    assert all(torch.equal(a, b) for a, b in zip(pool.images, resumed.images, strict=True)) and len(resumed) == 4
    batch = torch.rand(6, 1, 2, 2) + 10
    assert torch.equal(pool.query(batch), resumed.query(batch)), "the same swaps after the resume"
    empty = ImagePool(pool_size=4)
    empty.load_state_dict(ImagePool(pool_size=4).state_dict())
    assert len(empty) == 0


# ----------------------------------------------------------------------------------------------------- trainer
def _tiny_networks(seed: int = 0):
    torch.manual_seed(seed)
    return (
        ResnetGenerator(**TINY_SIZES),
        ResnetGenerator(**TINY_SIZES),
        discriminator(channels=4, num_layers=2),
        discriminator(channels=4, num_layers=2),
    )


def test_trainer_iterations_give_finite_losses_and_update_all_four_networks():
    g_ab, g_ba, d_a, d_b = _tiny_networks()
    before = [copy.deepcopy(n.state_dict()) for n in (g_ab, g_ba, d_a, d_b)]
    targets = [{"image": phantom(32, seed=i)[0]} for i in range(6)]
    sources = [{"image": 1.0 - phantom(32, seed=10 + i)[0]} for i in range(2)]  # fewer: the source loader cycles
    g_opt = torch.optim.Adam([*g_ab.parameters(), *g_ba.parameters()], 2e-4, betas=(0.5, 0.999))
    d_opt = torch.optim.Adam([*d_a.parameters(), *d_b.parameters()], 2e-4, betas=(0.5, 0.999))
    trainer = CycleGANTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=DataLoader(targets, batch_size=2),
        source_data_loader=DataLoader(sources, batch_size=2),
        generator_ab=g_ab,
        generator_ba=g_ba,
        discriminator_a=d_a,
        discriminator_b=d_b,
        g_optimizer=g_opt,
        d_optimizer=d_opt,
        pool_size=4,
    )
    trainer.run()
    assert trainer.state.iteration == 3
    output = trainer.state.output
    assert set(output) >= {"g_loss", "d_loss", "cycle_loss", "identity_loss", "adv_loss"}
    assert all(np.isfinite(v) and v >= 0 for v in output.values())
    assert output["g_loss"] == pytest.approx(
        output["adv_loss"] + 10 * output["cycle_loss"] + 5 * output["identity_loss"], rel=1e-5
    )
    for name, network, state in zip(("G_AB", "G_BA", "D_A", "D_B"), (g_ab, g_ba, d_a, d_b), before, strict=True):
        changed = [k for k, v in network.state_dict().items() if not torch.equal(v, state[k])]
        assert changed, f"{name} was not updated"
        assert all(p.requires_grad for p in network.parameters()), f"{name} must stay trainable"
    assert len(trainer.pool_a) == len(trainer.pool_b) == 4


def test_generator_keeps_any_input_size_and_tanh_range():
    generator = ResnetGenerator(channels=4, num_downsamplings=2, num_residual_units=1)
    out = generator(torch.randn(2, 1, 30, 37) * 3)
    assert out.shape == (2, 1, 30, 37) and out.abs().max() <= 1
    with pytest.raises(ValueError, match="channels"):
        ResnetGenerator(channels=0)


# ----------------------------------------------------------------------------------------------------- inferer
@pytest.fixture(scope="module")
def generator() -> ResnetGenerator:
    torch.manual_seed(0)
    return ResnetGenerator(**TINY_SIZES).train()


def test_inferer_output_shape_range_meta_and_determinism(generator):
    affine = torch.tensor([[0.0, -2, 0, 5], [2, 0, 0, -3], [0, 0, 2, 1], [0, 0, 0, 1]])
    source = MetaTensor(torch.cat([phantom(40, seed=0), phantom(40, seed=1)]), affine=affine)
    inferer = CycleGANInferer(image_size=(32, 32))
    out = inferer(source, generator)
    assert isinstance(out, MetaTensor) and out.shape == source.shape
    assert torch.allclose(out.affine.float(), affine) and out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, inferer(source, generator)), "translation must be deterministic"
    assert not out.requires_grad and generator.training, "no gradients; the network's mode is restored"
    plain = CycleGANInferer()(phantom(36), generator)
    assert isinstance(plain, MetaTensor) and plain.shape == (1, 1, 36, 36)
    volume = torch.stack([phantom(32, seed=i)[0] for i in range(3)], dim=-1)[None]  # (1, 1, 32, 32, 3)
    stacked = SliceWiseInferer(CycleGANInferer(), image_size=(32, 32), progress=False)(volume, generator)
    assert stacked.shape == volume.shape, "usable as the translator of SliceWiseInferer for volumes"


@pytest.mark.parametrize(
    "inputs, message",
    [
        (torch.rand(1, 32, 32), "batch of 2D images"),
        (torch.full((1, 1, 32, 32), float("nan")), "NaN or Inf"),
        (torch.zeros(2, 1, 32, 32), "all zero"),
    ],
)
def test_inferer_bad_input_gives_a_clear_error(generator, inputs, message):
    with pytest.raises(ValueError, match=message):
        CycleGANInferer()(inputs, generator)


# ------------------------------------------------------------------------------------------- bundle workflow
@pytest.fixture(scope="module")
def cyclegan_dataset(tmp_path_factory) -> Path:
    """Two training subjects (T1w targets, PDw sources) and one test subject, in the prepare workflow's layout."""
    root = tmp_path_factory.mktemp("cyclegan_dataset")
    datalist = {"subjects": {"training": ["sub-01", "sub-02"], "testing": ["sub-03"]}}
    datalist.update(training=[], source_training=[], testing=[])
    for i in range(6):
        subject = f"sub-0{i // 3 + 1}"
        t1 = phantom(32, seed=i)[0, 0].numpy()
        pd = np.where(t1 > 0, 1.1 - t1, 0)
        labels = np.digitize(t1, [0.05, 0.3, 0.7]) * (t1 > 0.05)
        stem = f"{subject}_slice-{i:03d}"
        datalist["training"].append({"image": save_slice(t1 * 800, root / f"{stem}_T1w.nii.gz"), "subject": subject})
        source = save_slice(pd * 900, root / f"{stem}_PDw.nii.gz")
        datalist["source_training"].append({"image": source, "subject": subject})
        save_slice(labels, root / f"{stem}_dseg.nii.gz")  # what validation pairs each source slice with
        save_slice(labels > 0, root / f"{stem}_mask.nii.gz")
    datalist["testing"].append({"image": datalist["source_training"][0]["image"], "subject": "sub-03"})
    (root / "datalist.json").write_text(json.dumps(datalist))
    return root


def _overrides(dataset: Path, models: Path, epochs: int) -> list[str]:
    return TINY + [
        "--dataset_dir", str(dataset),
        "--ckpt_dir", str(models),
        "--output_dir", str(models / "logs"),
        "--batch_size", "2",
        "--source_fraction", "0.5",
        "--train#trainer#max_epochs", str(epochs),
        "--val_interval", "1",
        "--num_val_slices", "2",
    ]  # fmt: skip


def test_new_stage_starts_both_generators_from_a_resume_state_and_new_discriminators(tmp_path, caplog):
    """`init_checkpoint` starts a stage from another campaign's generators (each its own entry) with discriminators
    of any size; a plain weights file is refused, since it would give one generator the other's weights."""
    torch.manual_seed(0)
    trained = {k: ResnetGenerator(1, 1, **TINY_SIZES).state_dict() for k in ("generator_ab", "generator_ba")}
    resume_state = tmp_path / "checkpoint_epoch_50.pt"
    torch.save({**trained, "discriminator_a": discriminator(1, 4, 2).state_dict(), "wall_clock": {}}, resume_state)
    overrides = TINY + [
        "--init_checkpoint", str(resume_state),
        "--checkpoint_dir", str(tmp_path / "new_stage"),
        "--discriminator_channels", "8",
    ]  # fmt: skip
    parser = composed_parser("train_cyclegan", "cyclegan", overrides)
    for key, weights in trained.items():
        started = parser.get_parsed_content(key).state_dict()
        assert all(torch.equal(started[name], value) for name, value in weights.items()), key
    sizes = [
        sum(p.numel() for p in d.parameters())
        for d in (parser.get_parsed_content("discriminator_a"), discriminator(1, 8, 2))
    ]
    assert sizes[0] == sizes[1], "the discriminators are new, of the configured size"

    plain = tmp_path / "cyclegan_generator.pt"
    torch.save(trained["generator_ab"], plain)
    overrides = TINY + ["--init_checkpoint", str(plain), "--checkpoint_dir", str(tmp_path / "other_stage")]
    parser = composed_parser("train_cyclegan", "cyclegan", overrides)
    with pytest.raises(SystemExit):
        parser.get_parsed_content("generator_ab")
    assert "is not a resume state with a 'generator_ab' entry; give a checkpoint_epoch_*.pt" in caplog.text


@pytest.mark.slow
def test_bundle_training_bad_schedule_gives_one_line(cyclegan_dataset, tmp_path):
    """A final learning rate above the starting one is refused in one line, before any step or checkpoint."""
    models = tmp_path / "models"
    overrides = _overrides(cyclegan_dataset, models, epochs=1) + ["--final_learning_rate", "0.1"]
    result = bundle_run(config_files("train_cyclegan"), *overrides, check=False)
    assert result.returncode == 1
    assert "error: final_learning_rate must be in (0, learning_rate=0.0002], got 0.1." in result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert not (models / "checkpoints_cyclegan").exists() or not any((models / "checkpoints_cyclegan").iterdir())


@pytest.mark.slow
def test_bundle_training_writes_the_generator_and_resumes(cyclegan_dataset, tmp_path):
    models = tmp_path / "models"
    first = bundle_run(config_files("train_cyclegan"), *_overrides(cyclegan_dataset, models, epochs=1))
    log = first.stdout + first.stderr
    assert "no checkpoint in" in log and "source subset: 3 of 6" in log
    assert "g_loss" in log and "cycle_loss" in log, "the losses are logged"
    rows = (models / "training_log_cyclegan.csv").read_text().splitlines()
    assert "val_dice" in rows[0] and len(rows) == 2, "validation on its own source subset, logged for the curve"
    checkpoint = models / "checkpoints_cyclegan" / "checkpoint_epoch_1.pt"
    assert checkpoint.is_file() and (models / "cyclegan_generator.pt").is_file()
    assert list((models / "logs" / "tensorboard").glob("events.*")), "TensorBoard events are written"
    state = torch.load(checkpoint, weights_only=False)
    assert set(state) == {"generator_ab", "generator_ba", "discriminator_a", "discriminator_b"} | {
        "g_optimizer",
        "d_optimizer",
        "trainer",
        "pool_a",
        "pool_b",
        "wall_clock",
    }
    assert state["pool_a"]["images"].shape == (4, 1, 32, 32), "the image pools are part of the resume state"
    weights = torch.load(models / "cyclegan_generator.pt", weights_only=True)

    rates = [state[k]["param_groups"][0]["lr"] for k in ("g_optimizer", "d_optimizer")]
    assert rates == [2e-4, 2e-4], "the first half of max_epochs (50 here) runs at the constant rate"

    # The default schedule is the original CycleGAN's: constant for the first half of max_epochs, then linear decay.
    overrides = _overrides(cyclegan_dataset, models, epochs=1) + ["--max_epochs", "5"]
    parser = composed_parser("train_cyclegan", overrides=overrides)
    epoch_length = len(parser.get_parsed_content("train#dataloader"))
    assert epoch_length == 3
    assert parser.get_parsed_content("lr_decay_start") == 2 * epoch_length
    assert parser.get_parsed_content("lr_decay_steps") == 3 * epoch_length

    # The campaign may switch on the linear decay when it resumes: both optimizers follow the schedule of the
    # restored iteration (3 steps from iteration 3 reach the final rate at iteration 6, the last one).
    decay = ["--lr_decay_start", "3", "--lr_decay_steps", "3", "--final_learning_rate", "1e-5"]
    second = bundle_run(config_files("train_cyclegan"), *_overrides(cyclegan_dataset, models, epochs=2), *decay)
    log = second.stdout + second.stderr
    assert "resuming from" in log and "Epoch[2]" in log and "Epoch[1]" not in log
    resumed = models / "checkpoints_cyclegan" / "checkpoint_epoch_2.pt"
    assert resumed.is_file() and not checkpoint.exists(), "only the newest checkpoint is kept"
    resumed_state = torch.load(resumed, weights_only=False)
    trainer_state = resumed_state["trainer"]
    assert trainer_state["iteration"] == 2 * trainer_state["epoch_length"] == 6, "the second epoch continued the first"
    for key in ("g_optimizer", "d_optimizer"):
        assert resumed_state[key]["param_groups"][0]["lr"] == pytest.approx(1e-5), f"{key} follows the decay"
    updated = torch.load(models / "cyclegan_generator.pt", weights_only=True)
    assert any(not torch.equal(weights[k], updated[k]) for k in weights), "resumed training must update G"

    # What the method's override does in evaluation and inference: rebuild network_def, load the exported weights.
    parser = composed_parser("evaluate", "cyclegan", TINY)
    network = load_weights(parser.get_parsed_content("network_def"), models / "cyclegan_generator.pt")
    inferer = parser.get_parsed_content("inferer")
    out = inferer(phantom(48), network)
    assert out.shape == (1, 1, 48, 48) and 0 <= out.min() and out.max() <= 1 and out.std() > 0
