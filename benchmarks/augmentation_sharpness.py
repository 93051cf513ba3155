"""How sharp are the targets the default translator learns from? K-means Dice of augmented T1w training slices.

The denoiser regresses the clean T1w, so whatever the training augmentation does to the T1w is what it learns to
output. The evaluation scores translations with a K-means segmenter against crisp tissue labels, and that score is
very sensitive to blur. This benchmark applies the geometric augmentation of ``configs/train.json`` (its
``RandAffined`` or ``Rand2DElasticd``, with probability 1) to T1w slices of the training subjects and their labels
(labels always by nearest neighbour), with the image resampled bilinearly and by nearest neighbour, and segments
the result with the shipped K-means (``models/segmenter.json``) against the equally transformed labels. Gaussian
blurs of the untransformed slice give the scale. Target images only: no source image, no test subject.

    python benchmarks/augmentation_sharpness.py [--slices 24] [--draws 4]

Prints a table and writes ``benchmarks/results/augmentation_sharpness.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.transforms import Rand2DElasticd, RandAffined
from scipy.ndimage import gaussian_filter

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BUNDLE_ROOT))

from compare import load_slice  # noqa: E402  (benchmarks/, beside this script)
from tune_sampling import validation_pairs  # noqa: E402

from scripts.evaluation.segmenter import KMeansTissueSegmenter, tissue_dice  # noqa: E402
from scripts.io import write_text_atomic  # noqa: E402
from scripts.transforms import robust_scale  # noqa: E402

BLUR_SIGMAS = (0.5, 0.75, 1.0)


SPATIAL_TRANSFORMS = {"RandAffined": RandAffined, "Rand2DElasticd": Rand2DElasticd}


def configured_spatial(train_config: Path) -> tuple[str, dict]:
    """Name and arguments of the geometric transform (one of ``SPATIAL_TRANSFORMS``) of `train_config`'s
    training augmentation."""
    transforms = ConfigParser.load_config_file(train_config)["train"]["augmentation"]["transforms"]
    named = [(str(t.get("_target_", "")).split(".")[-1], t) for t in transforms]
    found = [(name, t) for name, t in named if name in SPATIAL_TRANSFORMS]
    if len(found) != 1:
        raise SystemExit(
            f"error: {train_config}: expected one of {sorted(SPATIAL_TRANSFORMS)} in train#augmentation, "
            f"found {len(found)}"
        )
    name, transform = found[0]
    return name, {k: v for k, v in transform.items() if k not in ("_target_", "keys", "allow_missing_keys")}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=BUNDLE_ROOT / "data" / "labelmaps")
    parser.add_argument("--slices", type=int, default=24)
    parser.add_argument("--draws", type=int, default=4, help="random geometric draws per slice")
    parser.add_argument("--output", type=Path, default=BUNDLE_ROOT / "benchmarks/results/augmentation_sharpness.json")
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(arguments)
    datalist = args.dataset / "datalist.json"
    if not datalist.is_file():
        raise SystemExit(f"error: {datalist} not found (prepare.json --source labelmaps writes it)")
    entries = validation_pairs(args.dataset, args.slices)
    segmenter = KMeansTissueSegmenter.load(BUNDLE_ROOT / "models" / "segmenter.json")
    spatial_name, spatial = configured_spatial(BUNDLE_ROOT / "configs" / "train.json")

    def score(image: np.ndarray, labels: np.ndarray) -> float:
        return tissue_dice(segmenter(robust_scale(image), labels > 0), labels)

    rows: dict[str, list[float]] = {"as simulated": []}
    rows.update({f"Gaussian blur, sigma {s} px": [] for s in BLUR_SIGMAS})
    modes = ("bilinear", "nearest")
    rows.update({f"{spatial_name}, image {m}": [] for m in modes})
    for index, entry in enumerate(entries):
        image, labels = load_slice(entry["target"]).squeeze(), load_slice(entry["label"]).squeeze()
        rows["as simulated"].append(score(image, labels))
        for sigma in BLUR_SIGMAS:
            rows[f"Gaussian blur, sigma {sigma} px"].append(score(gaussian_filter(image, sigma), labels))
        data = {"image": torch.from_numpy(image)[None], "label": torch.from_numpy(labels)[None]}
        for mode in modes:
            transform = SPATIAL_TRANSFORMS[spatial_name](
                keys=["image", "label"], **{**spatial, "prob": 1.0, "mode": [mode, "nearest"]}
            )
            for draw in range(args.draws):
                transform.set_random_state(seed=1000 * index + draw)  # the same geometry for both modes
                out = transform(data)
                rows[f"{spatial_name}, image {mode}"].append(
                    score(np.asarray(out["image"])[0], np.asarray(out["label"])[0])
                )
    table = [
        {"target": name, "dice_mean": round(float(np.mean(v)), 4), "dice_std": round(float(np.std(v)), 4), "n": len(v)}
        for name, v in rows.items()
    ]
    configured = spatial.get("mode", ["bilinear"])
    configured = configured[0] if isinstance(configured, list | tuple) else configured
    result = {
        "command": " ".join(["python benchmarks/augmentation_sharpness.py", *arguments]),
        "what": "K-means (models/segmenter.json) Dice of T1w training slices against their tissue labels, as "
        f"simulated, blurred, and after the {spatial_name} of configs/train.json (probability 1, labels nearest)",
        "spatial_transform": spatial_name,
        "slices": len(entries),
        "draws_per_slice": args.draws,
        "configured_image_mode": configured,
        "spatial_arguments": {k: v for k, v in spatial.items() if k != "mode"},
        "rows": table,
    }
    print(f"{'target':34s} {'Dice':>7s} {'std':>7s} {'n':>4s}")
    for row in table:
        print(f"{row['target']:34s} {row['dice_mean']:7.4f} {row['dice_std']:7.4f} {row['n']:4d}")
    print(f"configs/train.json resamples the image with: {configured}")
    write_text_atomic(args.output, json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
