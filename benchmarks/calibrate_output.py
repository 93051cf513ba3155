"""Fit the default translator's intensity calibration (``output_gamma``), and measure what it does to segmentation.

Every consumer of a translation here (the K-means segmenter, PSNR, SSIM) first divides it by its own 99.5th
percentile. The denoiser returns smooth images, whose 99.5th percentile sits lower relative to the tissues than that
of a noisy acquired T1w, so after that scaling every tissue of a translation comes out too bright; a power
``y -> y ** gamma`` corrects it (it commutes with the per-image scaling, a gain would cancel).

Both parts work on the *training* subjects (no test subject):

- the fit (``fitted_gamma``, the value ``configs/inference.json`` ships): translate their T1w slices with the T1w
  itself as the source and keep the power that brings the scaled translation closest to the scaled T1w on the brain
  voxels (least squares over ``--gammas``): target images only, the intensities a T1w has;
- the segmentation curve (``segmentation_gamma``): translate their PDw slices (never trained on) once at gamma 1 and
  score the mean tissue Dice under the shipped segmenter at every power; the best one is the override for a user who
  only segments (it darkens the translation past the T1w's intensities, costing PSNR and SSIM). The T2w of the same
  slices, which nothing is chosen on, are scored too, to see whether that power carries over to another source.

Writes ``benchmarks/results/output_calibration.json``.

    python benchmarks/calibrate_output.py [--model models/model.pt] [--slices 24] [--gammas 0.9:1.3:0.01]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BUNDLE_ROOT))

from tune_sampling import evaluate, shipped_sampling, validation_workspace  # noqa: E402  (benchmarks/, beside this script)

from scripts.evaluation import KMeansTissueSegmenter, tissue_dice  # noqa: E402
from scripts.io import write_text_atomic  # noqa: E402
from scripts.training import slice_sibling  # noqa: E402
from scripts.transforms import robust_scale  # noqa: E402  (the scaling every consumer of a translation applies)


def fit_gamma(pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray]], gammas: np.ndarray) -> tuple[float, list]:
    """The power minimising the squared error between ``translation ** gamma`` and the target on the masked voxels.

    `pairs` holds (scaled translation, scaled target, mask) triples; returns the best gamma and the error curve.
    """
    curve = []
    for gamma in gammas:
        error = sum(float(((pred**gamma - target)[mask] ** 2).sum()) for pred, target, mask in pairs)
        count = sum(int(mask.sum()) for _, _, mask in pairs)
        curve.append((round(float(gamma), 4), error / max(count, 1)))
    best = min(curve, key=lambda row: row[1])[0]
    return best, curve


def dice_curve(cases: list[tuple[np.ndarray, np.ndarray, np.ndarray]], gammas: np.ndarray, segmenter) -> list:
    """Mean tissue Dice of ``translation ** gamma`` (re-scaled as every consumer does) for each gamma.

    `cases` holds (scaled translation, labels, brain mask) triples."""
    curve = []
    for gamma in gammas:
        dice = [tissue_dice(segmenter(robust_scale(pred**gamma), brain), labels) for pred, labels, brain in cases]
        curve.append((round(float(gamma), 4), float(np.mean(dice))))
    return curve


def grid(text: str) -> np.ndarray:
    start, stop, step = (float(v) for v in text.split(":"))
    return np.round(np.arange(start, stop + step / 2, step), 4)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=BUNDLE_ROOT / "models" / "model.pt")
    parser.add_argument("--dataset", type=Path, default=BUNDLE_ROOT / "data" / "labelmaps")
    parser.add_argument("--slices", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gammas", default="0.9:1.3:0.01", help="START:STOP:STEP of the powers tried")
    parser.add_argument("--output", type=Path, default=BUNDLE_ROOT / "benchmarks/results/output_calibration.json")
    args = parser.parse_args(argv)
    if not (args.dataset / "datalist.json").is_file():
        raise SystemExit(f"error: {args.dataset}/datalist.json not found (prepare.json --source labelmaps writes it)")
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        model, validation, entries = validation_workspace(args.model, args.dataset, args.slices, work)
        common = (model, validation, args.slices, shipped_sampling(), args.seed)
        self_translation = ("--output_gamma", "1.0", "--source_key", "target", "--save_outputs", "True")
        self_run = evaluate("lmi", *common, work / "t1w", self_translation)
        pairs = []
        for entry in entries:
            stem = Path(entry["target"]).name.removesuffix(".nii.gz")
            saved = work / "t1w" / "lmi" / "images" / f"{stem}_to_t1w_lmi.nii.gz"  # already scaled by the workflow
            pred = np.asarray(nib.load(saved).dataobj, dtype=np.float64).squeeze()
            target = robust_scale(np.asarray(nib.load(entry["target"]).dataobj, dtype=np.float64).squeeze())
            brain = np.asarray(nib.load(entry["label"]).dataobj).squeeze() > 0
            pairs.append((pred, target, brain))
        gamma, curve = fit_gamma(pairs, grid(args.gammas))
        print(f"T1w -> T1w on {args.slices} training-subject slices: Dice {self_run['dice']:.3f}; fitted gamma {gamma}")

        segmenter = KMeansTissueSegmenter.load(BUNDLE_ROOT / "models" / "segmenter.json")
        dice_curves = {}
        sources = {
            "t1w": [entry["target"] for entry in entries],
            "pdw": [entry["image"] for entry in entries],
            "t2w": [slice_sibling(entry["image"], "T2w") for entry in entries],  # the same slices' T2w
        }
        for source, images in sources.items():
            folder = work / f"{source}_dice"
            if not all(image is not None and Path(image).is_file() for image in images):
                continue  # a dataset without T2w: no check
            if source != "t1w":
                folder.mkdir()
                datalist = [dict(entry, image=str(image)) for entry, image in zip(entries, images, strict=True)]
                (folder / "datalist.json").write_text(json.dumps({"testing": datalist}))
                evaluate("lmi", model, folder, args.slices, shipped_sampling(), args.seed, folder / "out",
                         ("--output_gamma", "1.0", "--save_outputs", "True"))  # fmt: skip
            cases = []
            for entry, image in zip(entries, images, strict=True):
                stem = Path(image).name.removesuffix(".nii.gz")
                saved = (work / "t1w" if source == "t1w" else folder / "out") / "lmi" / "images"
                pred = np.asarray(nib.load(saved / f"{stem}_to_t1w_lmi.nii.gz").dataobj, dtype=np.float64).squeeze()
                labels = np.asarray(nib.load(entry["label"]).dataobj).squeeze()
                brain = np.asarray(nib.load(entry["mask"]).dataobj).squeeze() > 0
                cases.append((pred, labels, brain))
            dice_curves[source] = dice_curve(cases, grid(args.gammas), segmenter)
        for_segmentation = max(dice_curves["pdw"], key=lambda row: row[1])[0]  # what a segmentation-only user wants
        for source, values in dice_curves.items():
            best = max(values, key=lambda row: row[1])
            at = dict(values)
            print(
                f"{source} Dice: {at[1.0]:.3f} at gamma 1, {at[gamma]:.3f} at the fit {gamma}, "
                f"{at[for_segmentation]:.3f} at the PDw-best {for_segmentation}; best {best[1]:.3f} at {best[0]}"
            )

        rows = [{"source": "t1w", "output_gamma": 1.0, **{k: self_run[k] for k in ("dice", "psnr", "ssim")}}]
        values = sorted({1.0, gamma, for_segmentation})
        for value, source in [(v, s) for v in values for s in ("t1w", "pdw") if (v, s) != (1.0, "t1w")]:
            extra = ("--output_gamma", str(value)) + (("--source_key", "target") if source == "t1w" else ())
            row = evaluate("lmi", *common, work / f"{source}_{value}", extra)
            rows.append({"source": source, "output_gamma": value, **{k: row[k] for k in ("dice", "psnr", "ssim")}})
        for row in rows:
            print(
                f"{row['source']:>4} gamma {row['output_gamma']:5.2f}: Dice {row['dice']:.3f} PSNR {row['psnr']:.2f} "
                f"SSIM {row['ssim']:.3f}"
            )
    summary = {
        "benchmark": "intensity calibration of the default translator (output_gamma), fitted on target images only",
        "model": os.path.relpath(args.model, BUNDLE_ROOT),
        "sampling": shipped_sampling(),
        "fit": f"{args.slices} T1w slices of the training subjects translated with themselves as the source; least "
        "squares on brain voxels after 99.5th-percentile scaling",
        "fitted_gamma": gamma,
        "fit_curve": [{"gamma": g, "mse": round(e, 7)} for g, e in curve],
        "segmentation": f"mean tissue Dice at each power of the same {args.slices} slices' T1w, PDw and T2w (each "
        "translated once at gamma 1); segmentation_gamma: the best on PDw, the T2w scored as a check only",
        "segmentation_gamma": for_segmentation,
        "dice_curves": {
            source: [{"gamma": g, "dice": round(d, 4)} for g, d in values] for source, values in dice_curves.items()
        },
        "scores": rows,
        "scores_note": "full evaluation runs (PSNR and SSIM too) at gamma 1, the fit and segmentation_gamma; t1w: the "
        "fitting slices, pdw: the same subjects' PDw (never trained on)",
        "command": "python benchmarks/calibrate_output.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    write_text_atomic(args.output, json.dumps(summary, indent=4) + "\n")
    print(f"fitted output_gamma {gamma} (segmentation_gamma {for_segmentation}); wrote {args.output}")
    return summary


if __name__ == "__main__":
    main()
