"""Through-plane coherence of a volume translated slice by slice: does it flicker, and what reduces it?

Stacks `--depth` contiguous slices of each of `--subjects` (2 mm apart; the prepared slices of a subject are
contiguous: the test subjects' ``testing`` entries, or, to choose a setting, the training subjects'
``source_training`` PDw slices, never trained on, with ``--list-key source_training``) into a volume on the
evaluation grid (``paired_preprocessing`` of the configs: 128 x 128, source and T1w scaled as the evaluation scales
them), translates it with the inference workflow's ``SliceWiseInferer`` (the path a user's 3D volume takes) and
measures, inside the brain mask:

- the flicker, ``through_plane_flicker`` (``scripts.lmidiffusion``): mean |difference| between adjacent slices of the
  translation, against the same for the real T1w volume (its anatomy changes too, so the T1w value is the floor);
- the Dice of the shipped K-means segmenter on each translated slice (mean over CSF/GM/WM), so that a setting that
  flickers less but segments worse shows.

Settings compared: samples per slice (1, or the shipped N averaged) and the noise across slices: ``independent``
(a slice batch of 8: each slice of a batch draws its own noise) or ``shared`` (``inferer#batch_size`` 1: every
slice restarts from the same seed, so all slices share one noise sequence, as separate 2D inputs do). Prints a table
and writes ``benchmarks/results/coherence.json`` and ``docs/images/coherence.png`` (a sagittal and a coronal
reformat of the translated volume beside the T1w's).

    python benchmarks/coherence.py [--subjects sub-13,sub-14] [--depth 32] [--list-key testing]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BUNDLE_ROOT))

from scripts.configs import config_files  # noqa: E402
from scripts.evaluation import KMeansTissueSegmenter, tissue_dice  # noqa: E402
from scripts.io import write_bytes_atomic, write_text_atomic  # noqa: E402
from scripts.lmidiffusion.uncertainty import through_plane_flicker  # noqa: E402
from scripts.training import slice_sibling  # noqa: E402
from scripts.transforms import robust_scale  # noqa: E402


def load_volume(dataset: Path, subject: str, depth: int, transform, list_key: str) -> dict[str, np.ndarray]:
    """The `depth` central contiguous slices of `subject` in the datalist's `list_key` entries (their T1w, labels
    and mask are the files the prepare workflow wrote beside each PDw slice), each through the evaluation
    preprocessing, stacked on the last axis: image, target, label, mask as (128, 128, depth) arrays."""
    listed = json.loads((dataset / "datalist.json").read_text())[list_key]
    entries = sorted((e for e in listed if e.get("subject") == subject), key=lambda e: e["slice"])
    if len(entries) < depth:
        raise SystemExit(f"error: {subject} has {len(entries)} '{list_key}' slices, fewer than --depth {depth}")
    start = (len(entries) - depth) // 2
    chosen = entries[start : start + depth]
    steps = {b["slice"] - a["slice"] for a, b in zip(chosen, chosen[1:], strict=False)}
    if len(steps) != 1:
        raise SystemExit(f"error: the test slices of {subject} are not evenly spaced ({sorted(steps)})")
    kinds = {"image": "PDw", "target": "T1w", "label": "dseg", "mask": "mask"}
    items = [
        transform({k: str(slice_sibling(dataset / e["image"], kind)) for k, kind in kinds.items()}) for e in chosen
    ]
    return {
        k: np.stack([np.asarray(item[k][0]) for item in items], axis=-1) for k in ("image", "target", "label", "mask")
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=BUNDLE_ROOT / "data" / "labelmaps")
    parser.add_argument("--subjects", default="sub-13,sub-14")
    parser.add_argument(
        "--list-key", default="testing", help="datalist key of the slices: testing, or source_training (validation)"
    )
    parser.add_argument("--samples", default=None, help="comma-separated samples per slice (default: 1 and shipped)")
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--output", type=Path, default=BUNDLE_ROOT / "benchmarks" / "results" / "coherence.json")
    parser.add_argument("--figure", type=Path, default=BUNDLE_ROOT / "docs" / "images" / "coherence.png")
    args = parser.parse_args(argv)
    if not (args.dataset / "datalist.json").is_file():
        raise SystemExit(f"error: {args.dataset}/datalist.json not found (prepare.json --source labelmaps writes it)")
    import torch
    from monai.bundle import ConfigParser
    from monai.data import MetaTensor

    torch.set_num_threads(1)
    config = ConfigParser()
    config.read_config([BUNDLE_ROOT / f for f in config_files("inference")])
    config.update({"bundle_root": str(BUNDLE_ROOT), "progress": False})
    shipped = int(config["num_samples"])
    transform = config.get_parsed_content("paired_preprocessing")
    segmenter = KMeansTissueSegmenter.load(BUNDLE_ROOT / "models" / "segmenter.json")
    volumes = {s: load_volume(args.dataset, s, args.depth, transform, args.list_key) for s in args.subjects.split(",")}
    counts = sorted({int(n) for n in args.samples.split(",")}) if args.samples else sorted({1, shipped})
    settings = [(n, noise) for n in counts for noise in ("independent", "shared")]
    rows, shown = [], {}
    print(f"{'samples':>7} {'noise':<11} {'flicker':>8} {'T1w':>6} {'ratio':>6} {'Dice':>6} {'s/slice':>7}")
    for samples, noise in settings:
        config.update({"num_samples": samples, "inferer#batch_size": 1 if noise == "shared" else 8})
        inferer, network = config.get_parsed_content("inferer", lazy=False), config.get_parsed_content("network")
        flicker, floor, dices, seconds = [], [], [], 0.0
        for subject, volume in volumes.items():
            source = MetaTensor(torch.from_numpy(volume["image"])[None, None].float(), affine=torch.eye(4))
            started = time.perf_counter()
            translated = np.asarray(inferer(source, network)[0, 0])
            seconds += time.perf_counter() - started
            scaled = np.stack([robust_scale(translated[..., k]) for k in range(args.depth)], axis=-1)
            mask = volume["mask"] > 0
            flicker.append(through_plane_flicker(scaled, mask=mask))
            floor.append(through_plane_flicker(volume["target"], mask=mask))
            labels = [segmenter(scaled[..., k], volume["mask"][..., k]) for k in range(args.depth)]
            dices += [tissue_dice(labels[k], volume["label"][..., k]) for k in range(args.depth)]
            if subject == next(iter(volumes)):
                shown[(samples, noise)] = scaled
        row = {
            "num_samples": samples,
            "noise": noise,
            "flicker": round(float(np.mean(flicker)), 4),
            "t1w_flicker": round(float(np.mean(floor)), 4),
            "ratio_to_t1w": round(float(np.mean(flicker) / np.mean(floor)), 3),
            "dice": round(float(np.mean(dices)), 4),
            "seconds_per_slice": round(seconds / (args.depth * len(volumes)), 3),
        }
        rows.append(row)
        print(f"{samples:>7} {noise:<11} {row['flicker']:>8.4f} {row['t1w_flicker']:>6.4f} {row['ratio_to_t1w']:>6.3f} "
              f"{row['dice']:>6.3f} {row['seconds_per_slice']:>7.2f}")  # fmt: skip
    save_figure(volumes[next(iter(volumes))], shown, args.figure)
    result = {
        "benchmark": "through-plane flicker of slice-by-slice translation (mean |adjacent-slice difference| in the "
        "brain mask), against the real T1w, with the Dice of the translated slices",
        "volumes": {s: f"{args.depth} contiguous '{args.list_key}' slices (2 mm apart) of {s}" for s in volumes},
        "rows": rows,
        "machine": f"{platform.machine()}, 1 torch thread",
        "command": "python benchmarks/coherence.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    write_text_atomic(args.output, json.dumps(result, indent=4) + "\n")
    print(f"wrote {args.output} and {args.figure}")
    return result


def save_figure(volume: dict, shown: dict, path: Path) -> None:
    """Sagittal and coronal reformats (through the slice stack, stretched to its 2 mm spacing) of the T1w and of
    each setting's translation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("T1w (real)", volume["target"])] + [
        (f"{n} sample{'s' if n > 1 else ''}, {noise} noise", v) for (n, noise), v in shown.items()
    ]
    fig, axes = plt.subplots(2, len(panels), figsize=(2.6 * len(panels), 2.4))
    for col, (title, data) in enumerate(panels):
        for row, (name, cut) in enumerate((("sagittal", data[64, :, :]), ("coronal", data[:, 64, :]))):
            ax = axes[row, col]
            ax.imshow(np.rot90(cut), cmap="gray", vmin=0, vmax=1, aspect=2.0 * 128 / 192)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=8)
            if col == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.tight_layout()
    with tempfile.NamedTemporaryFile(suffix=".png") as handle:
        fig.savefig(handle.name, dpi=90)
        write_bytes_atomic(path, Path(handle.name).read_bytes())
    plt.close(fig)


if __name__ == "__main__":
    main()
