"""Does the spread of several samples tell which translations to distrust? And what does each sample cost?

Runs the evaluation workflow of the default translator (``scripts.configs.config_files("evaluate")``) with
``--num_samples N`` on three sets: PDw slices of the *training* subjects (validation: their source images never reach
training), the test subjects 13-16 (the compare.py slices) and the second-physics test set. Each slice gets the
uncertainty score (``scripts.lmidiffusion.uncertainty``; mean per-pixel standard deviation of the samples inside the
source's head mask) beside its Dice and SSIM. Prints, per set and N, the Spearman correlation of the score with the Dice
loss (1 - Dice) and with 1 - SSIM, and the seconds per slice; writes ``benchmarks/results/uncertainty.json`` and
``docs/images/uncertainty.png`` (source, translation, |translation - T1w| and the uncertainty map for the test slices
with the highest and the lowest score).

    python benchmarks/uncertainty.py [--samples 2,4] [--slices 40] [--val-slices 24]
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BUNDLE_ROOT))

from scripts.configs import config_files  # noqa: E402
from scripts.io import write_bytes_atomic, write_text_atomic  # noqa: E402
from scripts.training import paired_training_slices  # noqa: E402


def read_raw(path: Path) -> dict[str, float]:
    """A MetricsSaver ``*_raw.csv``: file name -> the row's mean."""
    with open(path) as handle:
        return {row["filename"]: float(row["mean"]) for row in csv.DictReader(handle)}


def evaluate(dataset: Path, datalist: Path, slices: int, samples: int, model: Path, work: Path) -> dict[str, dict]:
    """One evaluation run of the default translator; per-slice uncertainty, Dice, SSIM and seconds."""
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", json.dumps(config_files("evaluate"))]
    command += ["--dataset_dir", str(dataset), "--datalist", str(datalist), "--num_slices", str(slices)]
    command += ["--num_samples", str(samples), "--model_path", str(model), "--output_dir", str(work)]
    result = subprocess.run(command, cwd=BUNDLE_ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"evaluation failed:\n{(result.stdout + result.stderr)[-3000:]}")
    folder = work / "lmi"
    return {name: read_raw(folder / f"{name}_raw.csv") for name in ("uncertainty", "dice", "ssim", "seconds")}


def correlations(raw: dict[str, dict]) -> dict:
    """Spearman correlation of the uncertainty score with the Dice loss and with 1 - SSIM, over the slices."""
    from scipy.stats import spearmanr

    cases = sorted(raw["uncertainty"])
    score = np.array([raw["uncertainty"][c] for c in cases])
    dice_loss = 1.0 - np.array([raw["dice"][c] for c in cases])
    ssim_loss = 1.0 - np.array([raw["ssim"][c] for c in cases])
    rho_dice, p_dice = spearmanr(score, dice_loss)
    rho_ssim, p_ssim = spearmanr(score, ssim_loss)
    return {
        "slices": len(cases),
        "spearman_dice_loss": round(float(rho_dice), 3),
        "p_dice_loss": float(f"{p_dice:.2g}"),
        "spearman_ssim_loss": round(float(rho_ssim), 3),
        "p_ssim_loss": float(f"{p_ssim:.2g}"),
        "mean_uncertainty": round(float(score.mean()), 4),
        "mean_dice": round(float(1.0 - dice_loss.mean()), 4),
        "mean_ssim": round(float(1.0 - ssim_loss.mean()), 4),
        "seconds_per_slice": round(float(np.mean(list(raw["seconds"].values()))), 3),
    }


def figure(dataset: Path, raw: dict[str, dict], samples: int, model: Path, path: Path, rows: int = 4) -> None:
    """Source | translation | |translation - T1w| | uncertainty for the test slices with the highest and the lowest
    score (the same preprocessing and translator as the evaluation, in this process)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from monai.bundle import ConfigParser

    from scripts.transforms import robust_scale

    order = sorted(raw["uncertainty"], key=raw["uncertainty"].get)
    chosen = order[::-1][: rows // 2] + order[: rows - rows // 2]  # highest first, then lowest
    parser = ConfigParser()
    parser.read_config([BUNDLE_ROOT / f for f in config_files("evaluate")])
    parser.update({"bundle_root": str(BUNDLE_ROOT), "model_path": str(model), "num_samples": samples})
    entries = json.loads((dataset / "datalist.json").read_text())["testing"]
    by_name = {str(Path(e["image"]).name): e for e in entries}
    transform, translator = parser.get_parsed_content("paired_preprocessing"), parser.get_parsed_content("translator")
    network = parser.get_parsed_content("network")
    fig, axes = plt.subplots(rows, 4, figsize=(10, 2.6 * rows))
    vmax = None
    for row, case in enumerate(chosen):
        entry = {k: str(dataset / v) if isinstance(v, str) and v.endswith(".nii.gz") else v
                 for k, v in by_name[Path(case).name].items()}  # fmt: skip
        item = transform(entry)
        with torch.no_grad():
            mean = translator.sample(item["image"][None].float(), network)[0, 0].numpy()
        std = translator.last_std[0, 0].numpy()
        target = item["target"][0].numpy()
        vmax = vmax or float(np.percentile(std, 99.5))
        panels = [item["image"][0].numpy(), robust_scale(mean), np.abs(robust_scale(mean) - target), std]
        titles = ["PDw source", f"translation (mean of {samples})", "|translation - T1w|", "uncertainty (std)"]
        limits = [(0, 1), (0, 1), (0, 0.5), (0, vmax)]
        for col, (panel, title, (low, high)) in enumerate(zip(panels, titles, limits, strict=True)):
            ax = axes[row, col]
            ax.imshow(np.rot90(panel), cmap="gray" if col < 2 else "magma", vmin=low, vmax=high)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=9)
        label = "highest" if row < rows // 2 else "lowest"
        axes[row, 0].set_ylabel(
            f"{Path(case).name.split('_PDw')[0]}\n{label} score {raw['uncertainty'][case]:.3f}\n"
            f"Dice {raw['dice'][case]:.2f}, SSIM {raw['ssim'][case]:.2f}",
            fontsize=8,
        )
    fig.tight_layout()
    with tempfile.NamedTemporaryFile(suffix=".png") as handle:
        fig.savefig(handle.name, dpi=90)
        write_bytes_atomic(path, Path(handle.name).read_bytes())
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=BUNDLE_ROOT / "data" / "labelmaps")
    parser.add_argument("--physics2-dataset", type=Path, default=BUNDLE_ROOT / "data" / "labelmaps_physics2")
    parser.add_argument("--model", type=Path, default=BUNDLE_ROOT / "models" / "model.pt")
    parser.add_argument("--samples", default="2,4", help="samples per slice to compare on the validation slices")
    parser.add_argument("--slices", type=int, default=40, help="test and second-physics slices (as compare.py)")
    parser.add_argument("--val-slices", type=int, default=24, help="validation slices (as tune_sampling.py)")
    parser.add_argument("--output", type=Path, default=BUNDLE_ROOT / "benchmarks" / "results" / "uncertainty.json")
    parser.add_argument("--figure", type=Path, default=BUNDLE_ROOT / "docs" / "images" / "uncertainty.png")
    args = parser.parse_args(argv)
    shipped = json.loads((BUNDLE_ROOT / "configs" / "inference.json").read_text())["num_samples"]
    counts = sorted({int(n) for n in args.samples.split(",")} | {shipped})
    if min(counts) < 2:
        raise SystemExit("error: the spread needs at least 2 samples per slice")
    for dataset in (args.dataset,):
        if not (dataset / "datalist.json").is_file():
            raise SystemExit(f"error: {dataset}/datalist.json not found (prepare.json --source labelmaps writes it)")
    results: dict = {"sets": {}}
    print(f"{'set':<10} {'N':>2} {'slices':>6} {'rho(Dice loss)':>14} {'rho(1-SSIM)':>11} {'score':>6} {'Dice':>5} "
          f"{'s/slice':>7}")  # fmt: skip
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        model = work / "model.pt"  # one snapshot, even while training rewrites the weights
        shutil.copyfile(args.model, model)
        validation = work / "validation"
        validation.mkdir()
        entries = paired_training_slices(args.dataset / "datalist.json", args.val_slices)
        (validation / "datalist.json").write_text(json.dumps({"testing": entries}))
        runs = [("validation", validation, args.val_slices, n) for n in counts]
        runs.append(("test", args.dataset, args.slices, shipped))
        if (args.physics2_dataset / "datalist.json").is_file():
            runs.append(("physics2", args.physics2_dataset, args.slices, shipped))
        else:
            print(f"[physics2] skipped: {args.physics2_dataset}/datalist.json not found")
        test_raw = None
        for index, (name, dataset, slices, samples) in enumerate(runs):
            raw = evaluate(dataset, dataset / "datalist.json", slices, samples, model, work / f"run{index}")
            row = {"num_samples": samples, **correlations(raw)}
            results["sets"].setdefault(name, []).append(row)
            print(f"{name:<10} {samples:>2} {row['slices']:>6} {row['spearman_dice_loss']:>14.3f} "
                  f"{row['spearman_ssim_loss']:>11.3f} {row['mean_uncertainty']:>6.3f} {row['mean_dice']:>5.3f} "
                  f"{row['seconds_per_slice']:>7.2f}")  # fmt: skip
            if name == "test":
                test_raw = raw
        if test_raw is not None:
            figure(args.dataset, test_raw, shipped, model, args.figure)
            print(f"wrote {args.figure}")
    results.update(
        benchmark="uncertainty score of the default translator (spread of N samples) against the per-slice error",
        score="mean per-pixel standard deviation of the N samples inside the source's head mask",
        shipped_num_samples=shipped,
        sets_described={
            "validation": f"{args.val_slices} PDw slices of training subjects (source images never trained on)",
            "test": f"{args.slices} PDw slices of test subjects 13-16 (the compare.py selection)",
            "physics2": f"{args.slices} PDw slices of the second-physics test set",
        },
        machine=f"{platform.machine()}, {platform.processor() or 'cpu'}, 1 torch thread per run",
        wall_s=round(time.perf_counter() - started, 1),
        command="python benchmarks/uncertainty.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    )
    write_text_atomic(args.output, json.dumps(results, indent=4) + "\n")
    print(f"wrote {args.output}")
    return results


if __name__ == "__main__":
    main()
