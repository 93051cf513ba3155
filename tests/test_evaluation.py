"""configs/evaluate.json and benchmarks/compare.py: metrics as the protocol defines them, every method inside the
evaluator, clear errors for bad input with nothing half-written, and the quick comparison that CI runs."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.metrics import PSNRMetric, SSIMMetric
from phantoms import phantom
from test_workflows import BUNDLE_ROOT, bundle_run

sys.path.insert(0, str(BUNDLE_ROOT / "benchmarks"))

from scripts.evaluation import PublishOutputs, TimedInferer  # noqa: E402
from scripts.segmentation import KMeansTissueSegmenter  # noqa: E402
from scripts.transforms import robust_scale  # noqa: E402

SIZE = ["--image_size", "[32, 32]"]


def _save(array: np.ndarray, path: Path) -> str:
    nib.save(nib.Nifti1Image(array.astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0])), str(path))
    return path.name


@pytest.fixture(scope="module")
def eval_dataset(tmp_path_factory) -> Path:
    """Three paired test slices (PD-like source, T1-like target, tissue labels 0-3, brain mask) at 32 x 32."""
    root = tmp_path_factory.mktemp("eval_dataset")
    testing = []
    for i in range(3):
        t1 = phantom(32, seed=20 + i)[0, 0].numpy()
        pd = np.where(t1 > 0.05, 1.1 - t1, 0.0)
        labels = np.digitize(t1, [0.05, 0.3, 0.7]) * (t1 > 0.05)
        labels[:3] = 0  # a border outside the brain
        testing.append(
            {
                "image": _save(pd * 900, root / f"case{i}_PDw.nii.gz"),
                "target": _save(t1 * 800, root / f"case{i}_T1w.nii.gz"),
                "label": _save(labels, root / f"case{i}_dseg.nii.gz"),
                "mask": _save(labels > 0, root / f"case{i}_mask.nii.gz"),
            }
        )
    (root / "datalist.json").write_text(json.dumps({"testing": testing}))
    return root


def evaluate(dataset: Path, output: Path, *extra: str, check: bool = True):
    return bundle_run(
        "configs/evaluate.json", "--dataset_dir", str(dataset), "--output_dir", str(output), *SIZE, *extra, check=check
    )


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


def test_identity_metrics_match_the_protocol_computed_by_hand(eval_dataset, tmp_path):
    evaluate(eval_dataset, tmp_path, "--method", "identity", "--save_outputs", "True")
    folder = tmp_path / "identity"
    metrics = read_metrics(folder)
    assert not list(tmp_path.glob(".partial-*")), "the work folder is renamed on completion"

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


def test_the_target_as_source_reproduces_the_oracle(eval_dataset, tmp_path):
    """Evaluating the real target as if it were a translation must give the oracle's Dice and agree with it."""
    datalist = json.loads((eval_dataset / "datalist.json").read_text())
    for entry in datalist["testing"]:
        entry["image"] = entry["target"]
    path = tmp_path / "target_as_source.json"
    path.write_text(json.dumps(datalist))
    evaluate(eval_dataset, tmp_path / "out", "--method", "identity", "--datalist", str(path))
    metrics = read_metrics(tmp_path / "out" / "identity")
    assert metrics["dice_vs_oracle"] == pytest.approx(1.0)
    assert metrics["dice"] == pytest.approx(metrics["oracle_dice"])
    assert metrics["ssim"] == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("method", ["lmi", "sdedit", "cyclegan", "stylegan"])
def test_every_method_runs_inside_the_evaluator_with_the_shipped_weights(eval_dataset, tmp_path, method):
    steps = ["--num_steps", "2", "--stylegan_steps", "2", "--num_slices", "2"]
    evaluate(eval_dataset, tmp_path, "--method", method, *steps)
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
        entry["label"] = str(tmp_path / _save(labels, tmp_path / "bad_dseg.nii.gz"))
    elif case == "shape mismatch":
        entry["mask"] = str(tmp_path / _save(np.ones((30, 32)), tmp_path / "bad_mask.nii.gz"))
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(datalist))
    return path


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing key", "missing key(s) ['mask']"),
        ("missing file", "'target' file not found"),
        ("label out of range", "outside 0-3"),
        ("shape mismatch", "shapes differ"),
        ("unknown method", "unknown method 'pix2pix'"),
    ],
)
def test_bad_input_gives_one_clear_line_and_leaves_earlier_results_alone(eval_dataset, tmp_path, case, message):
    output = tmp_path / "out"
    (output / "identity").mkdir(parents=True)
    (output / "identity" / "metrics.csv").write_text("ssim,0.5\n")  # an earlier run's results
    if case == "unknown method":
        extra = ["--method", "pix2pix"]
    else:
        extra = ["--method", "identity", "--datalist", str(_bad_datalist(eval_dataset, tmp_path, case))]
    result = evaluate(eval_dataset, output, *extra, check=False)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    if case != "unknown method":
        assert "entry 1" in result.stderr, "the error names the entry"
    assert "Traceback" not in result.stderr
    assert (output / "identity" / "metrics.csv").read_text() == "ssim,0.5\n"
    assert sorted(p.name for p in output.iterdir()) == ["identity"], "nothing half-written"


def test_publish_outputs_keeps_the_previous_results_when_a_run_fails(tmp_path):
    final, work = tmp_path / "lmi", tmp_path / ".partial-lmi"
    final.mkdir()
    (final / "metrics.csv").write_text("old")
    engine = Engine(lambda e, b: (_ for _ in ()).throw(RuntimeError("interrupted")))
    PublishOutputs(work, final).attach(engine)
    with pytest.raises(RuntimeError, match="interrupted"):
        engine.run([0])
    assert (final / "metrics.csv").read_text() == "old" and not work.exists()

    engine = Engine(lambda e, b: (work / "metrics.csv").write_text("new"))
    PublishOutputs(work, final).attach(engine)
    engine.run([0])
    assert (final / "metrics.csv").read_text() == "new" and not work.exists()


def test_timed_inferer_reports_seconds_per_slice():
    inferer = TimedInferer(lambda inputs, network: inputs * 2)
    engine = Engine(lambda e, batch: inferer(batch, None))
    inferer.attach(engine)
    engine.run([torch.ones(2, 1, 4, 4), torch.ones(3, 1, 4, 4)])
    assert engine.state.metric_details["seconds"].shape == (5, 1)
    assert engine.state.metrics["seconds_per_slice"] >= 0


def test_quick_comparison_writes_the_table_the_json_and_the_figure(tmp_path):
    import compare

    result = compare.main(["--quick", "--output", str(tmp_path / "comparison"), "--figure", str(tmp_path / "c.png")])
    assert list(result["methods"]) == compare.DEFAULT_METHODS
    table = (tmp_path / "comparison.md").read_text()
    for method in compare.DEFAULT_METHODS:
        assert compare.METHOD_LABELS[method] in table
        row = result["methods"][method]
        assert 0 <= row["dice"]["mean"] <= 1 and np.isfinite(row["psnr"]["mean"]) and 0 < row["ssim"]["mean"] <= 1
    assert "Published (Wang et al." in table and "0.88" in table
    assert json.loads((tmp_path / "comparison.json").read_text())["num_slices"] == 4
    assert result["methods"]["identity"]["steps"] == 0 and result["methods"]["lmi"]["steps"] == 2
    image = __import__("matplotlib.image", fromlist=["imread"]).imread(tmp_path / "c.png")
    assert image.shape[0] > 500 and image.shape[1] > 1000, "3 slices x 2 rows, 8 columns"
