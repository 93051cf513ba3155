"""Fit the default translator's intensity calibration (``output_gamma``) on target images only.

Every consumer of a translation here (the K-means segmenter, PSNR, SSIM) first divides it by its own 99.5th
percentile. The denoiser returns smooth images, whose 99.5th percentile sits lower relative to the tissues than that
of a noisy acquired T1w, so after that scaling every tissue of a translation comes out too bright. The fit: translate
T1w slices of the *training* subjects with the T1w itself as the source (the target modality only: no source image,
no test subject), and choose the power ``y -> y ** gamma`` that brings the scaled translation closest to the scaled
T1w on the brain voxels (least squares over a grid). A power commutes with the per-image scaling, a gain would cancel.

For information only, the same run then scores the PDw slices of those subjects (never trained on) at gamma 1 and at
the fitted gamma; the choice does not look at them. Writes ``benchmarks/results/output_calibration.json``; put the
fitted value into ``configs/inference.json`` (``output_gamma``).

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

from tune_sampling import evaluate, validation_workspace  # noqa: E402  (benchmarks/, beside this script)

from scripts.io import write_text_atomic  # noqa: E402
from scripts.transforms import robust_scale  # noqa: E402  (the scaling every consumer of a translation applies)


def shipped_sampling() -> dict:
    """The default translator's sampling settings, as configs/inference.json ships them (the calibration must see
    the same averaged, mirrored samples as a user)."""
    config = json.loads((BUNDLE_ROOT / "configs" / "inference.json").read_text())
    keys = ("num_steps", "eta", "stop_timestep", "guidance_scale", "guidance_every", "num_samples", "mirror_samples")
    return {key: config[key] for key in keys}


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
        rows = [{"source": "t1w", "output_gamma": 1.0, **{k: self_run[k] for k in ("dice", "psnr", "ssim")}}]
        for value, source in [(1.0, "pdw")] + ([(gamma, "t1w"), (gamma, "pdw")] if gamma != 1.0 else []):
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
        "fit": f"{args.slices} T1w slices of the training subjects translated with themselves as the source; least "
        "squares on brain voxels after 99.5th-percentile scaling",
        "fitted_gamma": gamma,
        "fit_curve": [{"gamma": g, "mse": round(e, 7)} for g, e in curve],
        "scores": rows,
        "scores_note": "t1w: the fitting slices; pdw: the same subjects' PDw (never trained on), for information only",
        "command": "python benchmarks/calibrate_output.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    write_text_atomic(args.output, json.dumps(summary, indent=4) + "\n")
    print(f"fitted output_gamma {gamma}; wrote {args.output}")
    return summary


if __name__ == "__main__":
    main()
