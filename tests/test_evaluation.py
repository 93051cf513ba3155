"""configs/evaluate.json and benchmarks/compare.py: metrics as the protocol defines them, every method inside the
evaluator, clear errors for bad input with nothing half-written, and the quick comparison that CI runs."""

from __future__ import annotations

import csv
import json
import socket
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import BUNDLE_ROOT, EVALUATE, bundle_run, ended_pid, save_slice, sigterm_once_staging
from ignite.engine import Engine
from monai.metrics import PSNRMetric, SSIMMetric
from monai.networks.schedulers import DDIMScheduler
from phantoms import phantom

from scripts.configs import config_files
from scripts.evaluation import KMeansTissueSegmenter, TimedInferer
from scripts.io import PublishOutputs
from scripts.io.publishing import MARKER, new_staging_dir, write_marker
from scripts.transforms import robust_scale

SIZE = ["--image_size", "[32, 32]"]


def _paired_dataset(root: Path, size: int, count: int) -> Path:
    """`count` paired test slices (PD-like source, T1-like target, T2-like `t2`, tissue labels 0-3, brain mask)."""
    testing = []
    for i in range(count):
        t1 = phantom(size, seed=20 + i)[0, 0].numpy()
        pd = np.where(t1 > 0.05, 1.1 - t1, 0.0)
        t2 = np.where(t1 > 0.05, (1.0 - t1) ** 2 + 0.05, 0.0)
        labels = np.digitize(t1, [0.05, 0.3, 0.7]) * (t1 > 0.05)
        labels[: max(3, size // 10)] = 0  # a border outside the brain
        testing.append(
            {
                "image": save_slice(pd * 900, root / f"case{i}_PDw.nii.gz"),
                "target": save_slice(t1 * 800, root / f"case{i}_T1w.nii.gz"),
                "t2": save_slice(t2 * 1200, root / f"case{i}_T2w.nii.gz"),
                "label": save_slice(labels, root / f"case{i}_dseg.nii.gz"),
                "mask": save_slice(labels > 0, root / f"case{i}_mask.nii.gz"),
            }
        )
    (root / "datalist.json").write_text(json.dumps({"name": f"phantoms {size} x {size}", "testing": testing}))
    return root


@pytest.fixture(scope="module")
def eval_dataset(tmp_path_factory) -> Path:
    """Three paired test slices at 32 x 32 (the tests run the evaluator at that size)."""
    return _paired_dataset(tmp_path_factory.mktemp("eval_dataset"), 32, 3)


@pytest.fixture(scope="module")
def grid_dataset(tmp_path_factory) -> Path:
    """Two paired slices on the evaluation grid (128 x 128): the comparison saves outputs at the source's size."""
    return _paired_dataset(tmp_path_factory.mktemp("grid_dataset"), 128, 2)


def evaluate(dataset: Path, output: Path, *extra: str, method: str = "lmi", check: bool = True):
    """The evaluation workflow of `method` (its configs/methods/ override composed in) on `dataset`."""
    overrides = ["--dataset_dir", str(dataset), "--output_dir", str(output), *SIZE, *extra]
    return bundle_run(config_files("evaluate", method), *overrides, check=check)


def read_metrics(folder: Path) -> dict[str, float]:
    with open(folder / "metrics.csv") as f:
        return {row[0]: float(row[1]) for row in csv.reader(f)}


def load(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    scores = []
    for label in (1, 2, 3):
        x, y = a == label, b == label
        scores.append(2 * (x & y).sum() / (x.sum() + y.sum()) if x.sum() + y.sum() else 0.0)
    return float(np.mean(scores))


@pytest.mark.slow
def test_identity_metrics_match_the_protocol_computed_by_hand(eval_dataset, tmp_path):
    evaluate(eval_dataset, tmp_path, "--save_outputs", "True", method="identity")
    folder = tmp_path / "identity"
    metrics = read_metrics(folder)
    assert not list(tmp_path.glob(".*")), "the work folder is renamed on completion"

    segmenter = KMeansTissueSegmenter.load(BUNDLE_ROOT / "models" / "segmenter.json")
    entries = json.loads((eval_dataset / "datalist.json").read_text())["testing"]
    psnr, ssim, dices, oracle = [], [], [], []
    for entry in entries:
        source = robust_scale(load(eval_dataset / entry["image"]))
        target = robust_scale(load(eval_dataset / entry["target"]))
        labels, mask = load(eval_dataset / entry["label"]), load(eval_dataset / entry["mask"])
        s, t = torch.from_numpy(source)[None, None], torch.from_numpy(target)[None, None]
        psnr.append(float(PSNRMetric(1.0)(s, t)))
        ssim.append(float(SSIMMetric(2, 1.0, win_size=7)(s, t)))
        dices.append(dice(segmenter(source, mask), labels))
        oracle.append(dice(segmenter(target, mask), labels))
    assert metrics["psnr"] == pytest.approx(np.mean(psnr), abs=1e-3)
    assert metrics["ssim"] == pytest.approx(np.mean(ssim), abs=1e-3)
    assert metrics["dice"] == pytest.approx(np.mean(dices), abs=1e-3)
    assert metrics["oracle_dice"] == pytest.approx(np.mean(oracle), abs=1e-3)
    assert metrics["seconds_per_slice"] >= 0

    with open(folder / "dice_raw.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and {"class0", "class1", "class2", "mean"} <= set(rows[0])
    summary = (folder / "psnr_summary.csv").read_text()
    assert "mean" in summary and "std" in summary
    saved = sorted(p.name for p in (folder / "images").iterdir())
    assert len(saved) == 6 and all(".partial" not in name for name in saved)
    segmentation = load(folder / "images" / "case0_PDw_seg_identity.nii.gz")
    assert set(np.unique(segmentation)) <= {0, 1, 2, 3}


@pytest.mark.slow
def test_the_target_as_source_reproduces_the_oracle(eval_dataset, tmp_path):
    """Evaluating the real target as if it were a translation must give the oracle's Dice and agree with it."""
    datalist = json.loads((eval_dataset / "datalist.json").read_text())
    for entry in datalist["testing"]:
        entry["image"] = entry["target"]
    path = tmp_path / "target_as_source.json"
    path.write_text(json.dumps(datalist))
    evaluate(eval_dataset, tmp_path / "out", "--datalist", str(path), method="identity")
    metrics = read_metrics(tmp_path / "out" / "identity")
    assert metrics["dice_vs_oracle"] == pytest.approx(1.0)
    assert metrics["dice"] == pytest.approx(metrics["oracle_dice"])
    assert metrics["ssim"] == pytest.approx(1.0, abs=1e-4)


@pytest.mark.slow
def test_source_key_t2_translates_the_t2_slice_of_each_entry(eval_dataset, tmp_path):
    """`--source_key t2`: the evaluator reads the entry's T2w slice as the source (identity: its output is the T2w)."""
    evaluate(eval_dataset, tmp_path, "--source_key", "t2", "--save_outputs", "True", method="identity")
    folder = tmp_path / "identity"
    metrics = read_metrics(folder)
    entries = json.loads((eval_dataset / "datalist.json").read_text())["testing"]
    psnr_t2, psnr_pd = [], []
    for entry in entries:
        target = torch.from_numpy(robust_scale(load(eval_dataset / entry["target"])))[None, None]
        for key, values in (("t2", psnr_t2), ("image", psnr_pd)):
            source = torch.from_numpy(robust_scale(load(eval_dataset / entry[key])))[None, None]
            values.append(float(PSNRMetric(1.0)(source, target)))
    assert metrics["psnr"] == pytest.approx(np.mean(psnr_t2), abs=1e-3)
    assert abs(np.mean(psnr_t2) - np.mean(psnr_pd)) > 0.1, "the fixture's T2w and PDw must differ for this to test"
    with open(folder / "psnr_raw.csv") as f:
        assert all(Path(row["filename"]).name.endswith("_T2w.nii.gz") for row in csv.DictReader(f))
    output = load(folder / "images" / "case0_T2w_to_t1w_identity.nii.gz")
    np.testing.assert_allclose(output, robust_scale(load(eval_dataset / entries[0]["t2"])), atol=2e-3)
    assert np.abs(output - robust_scale(load(eval_dataset / entries[0]["image"]))).max() > 0.1


def test_load_evaluation_datalist_validates_the_source_key(eval_dataset, tmp_path):
    from scripts.evaluation import load_evaluation_datalist
    from scripts.io import InputError

    entries = load_evaluation_datalist(eval_dataset / "datalist.json", eval_dataset, source_key="t2")
    assert [Path(e["image"]).name for e in entries] == [f"case{i}_T2w.nii.gz" for i in range(3)]
    assert all(Path(e["source_image"]).name.endswith("_PDw.nii.gz") and e["source_key"] == "t2" for e in entries)
    with pytest.raises(InputError, match=r"entry 0 .*missing key\(s\) \['flair'\]"):
        load_evaluation_datalist(eval_dataset / "datalist.json", eval_dataset, source_key="flair")
    datalist = json.loads((eval_dataset / "datalist.json").read_text())
    datalist["testing"][2]["t2"] = str(tmp_path / save_slice(np.ones((30, 32)), tmp_path / "small_T2w.nii.gz"))
    (tmp_path / "datalist.json").write_text(json.dumps(datalist))
    with pytest.raises(InputError, match="entry 2 .*shapes differ"):
        load_evaluation_datalist(tmp_path / "datalist.json", eval_dataset, source_key="t2")
    with pytest.raises(InputError, match="'t2' file not found"):
        datalist["testing"][0]["t2"] = "nowhere_T2w.nii.gz"
        (tmp_path / "datalist.json").write_text(json.dumps(datalist))
        load_evaluation_datalist(tmp_path / "datalist.json", eval_dataset, source_key="t2")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lmi", "lmi_paper", "lmi_projection", "sdedit", "cyclegan", "stylegan"])
def test_every_method_runs_inside_the_evaluator_with_the_shipped_weights(eval_dataset, tmp_path, method):
    steps = ["--num_steps", "2", "--stylegan_steps", "2", "--num_slices", "2"]
    evaluate(eval_dataset, tmp_path, *steps, method=method)
    metrics = read_metrics(tmp_path / method)
    assert {"ssim", "psnr", "dice", "dice_vs_oracle", "oracle_dice", "seconds_per_slice"} <= set(metrics)
    assert all(np.isfinite(v) for v in metrics.values())
    assert 0 <= metrics["dice"] <= 1 and metrics["seconds_per_slice"] > 0
    with open(tmp_path / method / "ssim_raw.csv") as f:
        assert len(list(csv.DictReader(f))) == 2, "num_slices keeps that many test slices"


def _bad_datalist(dataset: Path, tmp_path: Path, case: str) -> Path:
    datalist = json.loads((dataset / "datalist.json").read_text())
    entry = datalist["testing"][1]
    if case == "missing key":
        del entry["mask"]
    elif case == "missing file":
        entry["target"] = "nowhere_T1w.nii.gz"
    elif case == "label out of range":
        labels = load(dataset / entry["label"])
        labels[5, 5] = 7
        entry["label"] = str(tmp_path / save_slice(labels, tmp_path / "bad_dseg.nii.gz"))
    elif case == "shape mismatch":
        entry["mask"] = str(tmp_path / save_slice(np.ones((30, 32)), tmp_path / "bad_mask.nii.gz"))
    elif case == "NaN source":
        source = load(dataset / entry["image"])
        source[3, 3] = np.nan
        entry["image"] = str(tmp_path / save_slice(source, tmp_path / "nan_PDw.nii.gz"))
    elif case == "blank target":
        entry["target"] = str(tmp_path / save_slice(np.zeros((32, 32)), tmp_path / "blank_T1w.nii.gz"))
    elif case == "empty mask":
        entry["mask"] = str(tmp_path / save_slice(np.zeros((32, 32)), tmp_path / "empty_mask.nii.gz"))
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(datalist))
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    "case, message",
    [
        ("missing key", "missing key(s) ['mask']"),
        ("missing file", "'target' file not found"),
        ("label out of range", "outside 0-3"),
        ("shape mismatch", "shapes differ"),
        ("NaN source", "contains NaN or Inf"),
        ("blank target", "'target' file"),
        ("empty mask", "mask is empty"),
        ("unknown method", "unknown method 'pix2pix'"),
        ("zero steps", "num_steps must be a whole number in 1-1000, got 0"),
        ("start past the schedule", "sdedit_start must be a timestep in 1-999, got 5000"),
    ],
)
def test_bad_input_gives_one_clear_line_and_leaves_earlier_results_alone(eval_dataset, tmp_path, case, message):
    output = tmp_path / "out"
    (output / "identity").mkdir(parents=True)
    (output / "identity" / "metrics.csv").write_text("ssim,0.5\n")  # an earlier run's results
    write_marker(output / "identity", "outputs", ["metrics.csv"])
    method = "sdedit" if case in ("zero steps", "start past the schedule") else "identity"
    if case == "unknown method":
        extra = ["--method", "pix2pix"]
    elif case == "zero steps":
        extra = ["--num_steps", "0"]
    elif case == "start past the schedule":
        extra = ["--sdedit_start", "5000"]
    else:
        extra = ["--datalist", str(_bad_datalist(eval_dataset, tmp_path, case))]
    result = evaluate(eval_dataset, output, *extra, method=method, check=False)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    if case not in ("unknown method", "zero steps", "start past the schedule"):
        assert "entry 1" in result.stderr, "the error names the entry"
    assert "Traceback" not in result.stderr
    assert (output / "identity" / "metrics.csv").read_text() == "ssim,0.5\n"
    assert sorted(p.name for p in output.iterdir()) == ["identity"], "nothing half-written"


def test_publish_outputs_keeps_the_previous_results_when_a_run_fails(tmp_path):
    final = tmp_path / "lmi"
    work = new_staging_dir(final)
    engine = Engine(lambda e, b: (work / "metrics.csv").write_text("old"))
    PublishOutputs(final, work).attach(engine)
    engine.run([0])
    assert (final / "metrics.csv").read_text() == "old" and not work.exists()

    work = new_staging_dir(final)
    engine = Engine(lambda e, b: (_ for _ in ()).throw(RuntimeError("interrupted")))
    PublishOutputs(final, work).attach(engine)
    with pytest.raises(RuntimeError, match="interrupted"):
        engine.run([0])
    assert (final / "metrics.csv").read_text() == "old" and not work.exists()

    ended = ended_pid()
    stale = new_staging_dir(final)  # a staging folder left by a killed run
    stale.mkdir()
    (stale / "stale.csv").write_text("left by a killed run")
    info = {"written_by": "brain_mri_zero_shot_translation", "kind": "outputs", "names": []}
    (stale / MARKER).write_text(json.dumps({**info, "pid": ended, "host": socket.gethostname()}))
    work = new_staging_dir(final)
    engine = Engine(lambda e, b: (work / "metrics.csv").write_text("new"))
    PublishOutputs(final, work).attach(engine)
    engine.run([0])
    assert sorted(p.name for p in final.iterdir()) == [MARKER, "metrics.csv"]
    assert (final / "metrics.csv").read_text() == "new" and not work.exists() and not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lmi"]


@pytest.mark.parametrize("foreign", ["thesis.txt", "images/thesis.txt"])
def test_publish_outputs_never_replaces_a_folder_holding_other_files(tmp_path, foreign):
    final = tmp_path / "lmi"

    def write(engine, batch):
        (engine.state.work_dir / "images").mkdir()
        (engine.state.work_dir / "images" / "x_seg.nii.gz").write_text("result")

    engine = Engine(write)
    publisher = PublishOutputs(final, new_staging_dir(final))
    engine.state.work_dir = publisher.work_dir
    publisher.attach(engine)
    engine.run([0])  # an earlier run of the bundle, with a sub-folder
    (final / foreign).write_text("mine")  # a user's file, at the top or inside the sub-folder
    engine = Engine(lambda e, b: None)
    PublishOutputs(final, new_staging_dir(final)).attach(engine)
    with pytest.raises(ValueError, match="holds files this bundle did not write"):
        engine.run([0])
    assert (final / foreign).read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["lmi"]


@pytest.mark.slow
def test_sigterm_during_evaluation_publishes_nothing_and_leaves_no_staging_folder(eval_dataset, tmp_path):
    output = tmp_path / "out"
    overrides = ["--dataset_dir", str(eval_dataset), "--output_dir", str(output), *SIZE]
    overrides += ["--num_steps", "400"]  # long enough to be interrupted
    returncode, stderr = sigterm_once_staging(EVALUATE, *overrides, staging=output, pattern=".lmi.tmp-*")
    assert returncode == 1 and "terminated by SIGTERM" in stderr
    assert not list(output.glob(".*")) and not (output / "lmi").exists()


def test_each_diffusion_method_samples_with_its_own_configured_steps(monkeypatch, tmp_path):
    """The comparison runs the default at inference.json's `num_steps` and each baseline at the count in its method
    config (their tuned settings differ); `--steps` puts every method on one count."""
    import argparse
    import subprocess

    import compare

    commands = []

    def record(command, **kwargs):
        commands.append(command)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(compare.subprocess, "run", record)
    monkeypatch.setattr(compare, "read_method", lambda folder: {})
    configs = BUNDLE_ROOT / "configs"
    default_steps = json.loads((configs / "inference.json").read_text())["num_steps"]
    sdedit_steps = json.loads((configs / "methods" / "sdedit.json").read_text())["num_steps"]
    assert sdedit_steps != default_steps, "SDEdit keeps the count it was tuned with, not the default's"

    def steps_passed(method: str, steps: int | None) -> int:
        args = argparse.Namespace(
            dataset=tmp_path, steps=steps, num_samples=4, seed=0, sdedit_start=950, stylegan_steps=200
        )
        compare.run_method(method, args, tmp_path / "run")
        return int(commands[-1][commands[-1].index("--num_steps") + 1])

    assert steps_passed("lmi", None) == default_steps
    assert steps_passed("sdedit", None) == sdedit_steps
    paper_steps = json.loads((configs / "methods" / "lmi_paper.json").read_text())["num_steps"]
    assert steps_passed("lmi_paper", None) == paper_steps
    assert steps_passed("sdedit", 3) == 3 and steps_passed("lmi", 3) == 3


def test_timed_inferer_reports_seconds_per_slice():
    inferer = TimedInferer(lambda inputs, network: inputs * 2)
    engine = Engine(lambda e, batch: inferer(batch, None))
    inferer.attach(engine)
    engine.run([torch.ones(2, 1, 4, 4), torch.ones(3, 1, 4, 4)])
    assert engine.state.metric_details["seconds"].shape == (5, 1)
    assert engine.state.metrics["seconds_per_slice"] >= 0


def _strings(value):
    if isinstance(value, dict):
        for key, item in value.items():
            yield str(key)
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, str):
        yield value


@pytest.mark.slow
def test_quick_comparison_writes_the_table_the_json_and_the_figure(grid_dataset, tmp_path):
    """CI's smoke run, with the T2w block on the fixture (the demo has no T2w) and the BrainWeb block when
    ../shared is there; the second-physics block is pointed at an absent folder and must say it is skipped."""
    import compare

    argv = ["--quick", "--output", str(tmp_path / "comparison"), "--figure", str(tmp_path / "c.png")]
    argv += ["--t2-dataset", str(grid_dataset), "--physics2-dataset", str(tmp_path / "absent")]
    result = compare.main(argv)
    assert list(result["methods"]) == compare.DEFAULT_METHODS
    table = (tmp_path / "comparison.md").read_text()
    for method in compare.DEFAULT_METHODS:
        assert compare.METHOD_LABELS[method] in table
        row = result["methods"][method]
        assert 0 <= row["dice"]["mean"] <= 1 and np.isfinite(row["psnr"]["mean"]) and 0 < row["ssim"]["mean"] <= 1
    assert "Published (Wang et al." in table and "0.88" in table
    written = json.loads((tmp_path / "comparison.json").read_text())
    assert written["num_slices"] == 4
    shipped = json.loads((BUNDLE_ROOT / "configs" / "inference.json").read_text())
    schedule = DDIMScheduler(num_train_timesteps=shipped["num_train_timesteps"])
    schedule.set_timesteps(2)
    walked = max(int((schedule.timesteps >= shipped["stop_timestep"]).sum()), 1)  # the steps at or above the stop
    assert result["methods"]["identity"]["steps"] == 0
    assert result["methods"]["lmi"]["steps"] == walked * shipped["num_samples"]
    assert result["methods"]["lmi"]["ddim_steps"] == 2 and result["methods"]["cyclegan"]["ddim_steps"] is None
    # SDEdit's DDIM schedule is stretched to round(2 * 1000 / 900) = 2 steps, timesteps [999, 0]: one is below 900
    assert result["methods"]["sdedit"]["steps"] == 1, "the reverse steps SDEdit walks, one sample per slice"

    # T2w -> T1w through --source_key t2, on 2 fixture slices
    t2 = written["blocks"]["t2"]
    assert t2["source_key"] == "t2" and t2["num_slices"] == 2 and list(t2["methods"]) == ["lmi"]
    assert all(case.endswith("_T2w.nii.gz") for case in t2["cases"])
    assert np.isfinite(t2["methods"]["lmi"]["psnr"]["mean"]) and 0 <= t2["methods"]["lmi"]["dice"]["mean"] <= 1
    assert any("--source_key t2" in command for command in written["commands"])
    assert "T2w -> T1w" in table
    assert "absent has no datalist.json" in written["blocks"]["physics2"]["skipped"]
    assert "Skipped: <external>/absent has no datalist.json" in table

    # training budgets of every learned method, from models/training_budgets.json and the campaign log
    for method in ("lmi_paper", "cyclegan", "stylegan"):
        budget = written["methods"][method]["training"]
        assert budget["steps"] > 0 and budget["images_seen"] > 0 and budget["wall_s"] > 0
        assert budget["hardware"] and budget["source"]
    assert written["methods"]["lmi_paper"]["training"]["steps"] == 5976
    assert written["methods"]["identity"]["training"] is None
    assert written["methods"]["sdedit"]["training"]["same_as"] == "lmi"
    log_path = BUNDLE_ROOT / "models" / "training_log.csv"
    if compare.read_training_log(log_path) is not None:  # a running campaign may add rows meanwhile: one of them
        with open(log_path) as f:
            logged = {int(float(row["iteration"])): row for row in csv.DictReader(f)}
        lmi = written["methods"]["lmi"]["training"]
        assert lmi["steps"] in logged and lmi["images_seen"] == int(float(logged[lmi["steps"]]["images_seen"]))
    for title in ("training steps", "training images seen", "training wall time", "training hardware"):
        assert f"| {title} |" in table
    assert "| training steps | – | " in table and "5,976" in table

    # nothing of this machine's layout in the results
    for text in _strings(written):
        assert str(BUNDLE_ROOT) not in text and str(tmp_path) not in text, text
        assert not any(Path(token.strip("'\"`(),")).is_absolute() for token in text.split()), text
    assert all(not Path(case).is_absolute() for case in written["cases"])

    brainweb = written["blocks"]["brainweb"]
    if (compare.REAL_FIXTURES / "brainweb_pd_slice.png").is_file():
        row = brainweb["methods"]["lmi"]
        assert brainweb["cases"] == ["brainweb_PD.nii.gz"] and 0 <= row["dice"]["mean"] <= 1
        assert np.isfinite(row["psnr"]["mean"]) and 0 <= row["dice_vs_refit"] <= 1
        assert brainweb["oracle_dice"]["mean"] == pytest.approx(1.0), "the label is K-means of the same T1"
        assert "Real BrainWeb PD -> T1 pair" in table and "head_mask of the BrainWeb T1" in table
    else:
        assert "not found" in brainweb["skipped"]
    image = __import__("matplotlib.image", fromlist=["imread"]).imread(tmp_path / "c.png")
    assert image.shape[0] > 500 and image.shape[1] > 1000, "3 slices x 2 rows (+ real rows), 8 columns"


def test_brainweb_conversion_writes_a_valid_evaluation_datalist(shared_data_dir, tmp_path):
    import compare

    from scripts.evaluation import load_evaluation_datalist
    from scripts.transforms import head_mask

    fixtures = shared_data_dir / "real_fixtures"
    datalist, info = compare.real_fixture_dataset(fixtures, tmp_path / "real")
    entries = load_evaluation_datalist(datalist, datalist.parent)  # the evaluator's own checks: files, shapes, labels
    assert [e["case"] for e in entries] == ["brainweb", "ixi"]
    assert not any(
        Path(v).is_absolute()
        for e in json.loads(datalist.read_text())["testing"]
        for v in e.values()
        if isinstance(v, str)
    )
    brainweb = entries[0]
    pd, t1, label, mask = (load(Path(brainweb[key])) for key in ("image", "target", "label", "mask"))
    refit = load(tmp_path / "real" / json.loads(datalist.read_text())["testing"][0]["label_refit"])
    assert pd.shape == t1.shape == label.shape == mask.shape == refit.shape == (128, 128)
    assert set(np.unique(label)) == {0, 1, 2, 3} and set(np.unique(refit)) == {0, 1, 2, 3}
    assert set(np.unique(mask)) == {0, 1} and not label[mask == 0].any()
    segmenter = KMeansTissueSegmenter.load(BUNDLE_ROOT / "models" / "segmenter.json")
    np.testing.assert_array_equal(label, segmenter(robust_scale(t1), mask))
    # the mask is the intracranial region: inside the head, well short of it (scalp and skull left out)
    head = head_mask(t1).astype(bool)
    assert not (mask.astype(bool) & ~head).any() and 0.5 * head.sum() < mask.sum() < 0.9 * head.sum()
    assert info["label_pixels"] == {name: int((label == i + 1).sum()) for i, name in enumerate(("CSF", "GM", "WM"))}
    # the same image as the PNG, zero-padded to 256 x 256, 2 x 2 mean-pooled, stored so that rot90 shows it upright
    png = __import__("matplotlib.image", fromlist=["imread"]).imread(fixtures / "brainweb_t1_slice.png") * 255
    padded = np.zeros((256, 256))
    padded[19 : 19 + 217, 37 : 37 + 181] = png
    np.testing.assert_allclose(np.rot90(t1), padded.reshape(128, 2, 128, 2).mean(axis=(1, 3)), atol=1e-3)
    ixi = entries[1]
    assert (
        ixi["paired"] is False and not load(Path(ixi["label"])).any() and load(Path(ixi["image"])).shape == (128, 128)
    )


def test_training_budgets_read_the_last_log_row_and_the_shared_networks(tmp_path):
    import compare

    (tmp_path / "log.csv").write_text(
        "iteration,epoch,wall_s,images_seen,val_dice,val_ssim,val_psnr\n"
        "100,1,50.5,800,0.4,0.5,15\n"
        "200,2,101.0,1600,0.45,0.55,16\n"
    )
    spec = {
        "methods": {
            "lmi": {"log": "log.csv", "hardware": "CPU, 1 thread", "source": "the log"},
            "sdedit": {"same_as": "lmi", "source": "samples lmi"},
            "cyclegan": {"steps": 10, "images_seen": 40, "wall_s": 5, "hardware": "GPU", "source": "known"},
            "stylegan": {"log": "missing.csv", "hardware": "CPU", "source": "not yet"},
            "lmi_paper": {"log": "log.csv", "steps": 200, "images_seen": 2400, "wall_s": 180.0, "source": "GPU + log"},
        }
    }
    (tmp_path / "budgets.json").write_text(json.dumps(spec))
    budgets = compare.training_budgets(tmp_path / "budgets.json", tmp_path)
    assert budgets["lmi"]["steps"] == 200 and budgets["lmi"]["images_seen"] == 1600
    assert budgets["lmi"]["wall_s"] == 101.0 and budgets["lmi"]["hardware"] == "CPU, 1 thread"
    assert budgets["sdedit"]["steps"] == 200 and budgets["sdedit"]["same_as"] == "lmi"
    assert budgets["cyclegan"]["steps"] == 10
    assert budgets["stylegan"]["steps"] is None and "missing.csv not found" in budgets["stylegan"]["note"]
    stated = budgets["lmi_paper"]  # stated numbers cover stages the log lacks: they win over its last row
    assert (stated["images_seen"], stated["wall_s"], stated["epochs"]) == (2400, 180.0, 2)


@pytest.mark.parametrize(
    "method, folder",
    [
        ("lmi_paper", "checkpoints_lmi_paper"),
        ("cyclegan", "checkpoints_cyclegan"),
        ("stylegan", "checkpoints_stylegan"),
    ],
)
def test_shipped_training_budgets_match_the_checkpoints(method, folder):
    """The steps in models/training_budgets.json are the trainer iterations stored in the shipped resume state (one
    checkpoint per campaign folder)."""
    shipped = sorted((BUNDLE_ROOT / "models" / folder).glob("checkpoint_epoch_*.pt"))
    assert len(shipped) == 1, f"models/{folder} ships one resume state, found {[p.name for p in shipped]}"
    state = torch.load(shipped[0], map_location="cpu", weights_only=False)["trainer"]
    spec = json.loads((BUNDLE_ROOT / "models" / "training_budgets.json").read_text())["methods"][method]
    assert spec["steps"] == state["iteration"]
    assert f"{folder}/{shipped[0].name}" in spec["source"]


@pytest.mark.slow
def test_saved_outputs_of_a_source_off_the_evaluation_grid_keep_the_grid_geometry(tmp_path):
    """A 48 x 48 source evaluated on the 32 x 32 grid: the saved translation is that grid, with its own affine."""
    (tmp_path / "data48").mkdir()
    dataset = _paired_dataset(tmp_path / "data48", 48, 1)
    evaluate(dataset, tmp_path / "out", "--save_outputs", "True", method="identity")
    saved = nib.load(str(tmp_path / "out" / "identity" / "images" / "case0_PDw_to_t1w_identity.nii.gz"))
    assert saved.shape[:2] == (32, 32)
    assert np.allclose(np.abs(np.diag(saved.affine))[:2], 2.0 * 48 / 32), "the pixel size follows the resampling"
