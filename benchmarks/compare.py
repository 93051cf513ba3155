"""The paper's comparison (Wang et al., Table: Dice / PSNR / SSIM per method), reproduced on our data.

Runs ``configs/evaluate.json`` once per method through the bundle runner, on the same test slices with the same seed,
then writes ``results/comparison.md`` and ``results/comparison.json`` (method columns, mean ± std rows, steps,
seconds per slice, the commands used), the figure ``docs/images/comparison.png`` (source | each method | target,
with the K-means segmentations under them) and, with ``--update-docs``, the Performance table of docs/README.md.

    python benchmarks/compare.py --update-docs                  # full: 40 labelmaps test slices, 20 steps
    python benchmarks/compare.py --quick                        # CI smoke: the 4 shipped demo slices, 2 steps

Protocol (DESIGN.md section 4): 128 x 128 grid; the target and each method's output scaled to [0, 1] by their own
99.5th percentile; SSIM (MONAI, 2D, Gaussian window 7, data_range 1) and PSNR over the whole slice; the K-means
(k = 3) segmenter fitted on target *training* images only, applied inside the ground-truth brain mask; Dice per class
and mean over CSF/GM/WM against the ground-truth labels and against K-means on the real target. "Steps" counts network
evaluations per slice (SDEdit is given a DDIM schedule that walks `steps` below its start; StyleGAN counts
inversion iterations, each a generator forward and backward).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BUNDLE_ROOT))

METHOD_LABELS = {
    "identity": "Identity (source)",
    "sdedit": "SDEdit",
    "cyclegan": "CycleGAN (11% source)",
    "stylegan": "StyleGAN2-ADA + inversion",
    "lmi_paper": "LMIDiffusion (paper)",
    "lmi": "LMIDiffusion + guidance (ours)",
    "lmi_projection": "LMIDiffusion + projection",
}
DEFAULT_METHODS = ["identity", "sdedit", "cyclegan", "stylegan", "lmi_paper", "lmi"]
# Wang et al., PDw -> T1w on real IXI slices at 128 x 128 (their table; not comparable to our simulated data)
PAPER = {
    "LMIDiffusion (paper)": {"dice": 0.88, "psnr": 20.22, "ssim": 0.69},
    "SDEdit": {"dice": 0.82, "psnr": 15.96, "ssim": 0.50},
    "CycleGAN (11% source)": {"dice": 0.85, "psnr": 18.88, "ssim": 0.27},
    "StyleGAN2-ADA + inversion": {"dice": 0.66, "psnr": 10.15, "ssim": 0.06},
}
CLASSES = ("CSF", "GM", "WM")
START, END = "<!-- comparison:start -->", "<!-- comparison:end -->"


def read_summary(path: Path) -> dict:
    """A MetricsSaver ``*_summary.csv``: {row name: {"mean": .., "std": ..}} (rows class0.. and mean)."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return {row["class"]: {"mean": float(row["mean"]), "std": float(row["std"])} for row in rows}


def read_raw(path: Path) -> dict[str, float]:
    """A MetricsSaver ``*_raw.csv``: {case file name: per-case mean}."""
    with open(path) as f:
        return {row["filename"]: float(row["mean"]) for row in csv.DictReader(f)}


def network_evaluations(method: str, steps: int, sdedit_start: int, stylegan_steps: int) -> int:
    if method == "identity":
        return 0
    if method == "cyclegan":
        return 1
    if method == "stylegan":
        return stylegan_steps
    return steps  # the diffusion methods; SDEdit's schedule is stretched to walk `steps` below its start


def run_method(method: str, args, run_dir: Path) -> tuple[dict, str]:
    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        "configs/evaluate.json",
        "--method",
        method,
        "--dataset_dir",
        str(args.dataset),
        "--num_slices",
        str(args.slices),
        "--num_steps",
        str(args.steps),
        "--sdedit_start",
        str(args.sdedit_start),
        "--stylegan_steps",
        str(args.stylegan_steps),
        "--seed",
        str(args.seed),
        "--output_dir",
        str(run_dir),
        "--save_outputs",
        "True",
    ]
    shown = {str(args.dataset): os.path.relpath(args.dataset, BUNDLE_ROOT), str(run_dir): "<run_dir>"}
    printable = shlex.join(["python", *[shown.get(part, part) for part in command[1:]]])
    print(f"[{method}] {printable}", flush=True)
    completed = subprocess.run(command, cwd=BUNDLE_ROOT, capture_output=True, text=True)
    if completed.returncode != 0:
        tail = "\n".join((completed.stdout + completed.stderr).strip().splitlines()[-15:])
        raise SystemExit(f"evaluation of '{method}' failed (exit {completed.returncode}):\n{tail}")
    folder = run_dir / method
    result = {name: read_summary(folder / f"{name}_summary.csv") for name in ("ssim", "psnr", "dice", "dice_vs_oracle")}
    result["oracle_dice"] = read_summary(folder / "oracle_dice_summary.csv")
    result["seconds"] = read_summary(folder / "seconds_summary.csv")
    result["psnr_cases"] = read_raw(folder / "psnr_raw.csv")
    return result, printable


def summarise(method: str, raw: dict, args) -> dict:
    dice = raw["dice"]
    return {
        "label": METHOD_LABELS.get(method, method),
        "steps": network_evaluations(method, args.steps, args.sdedit_start, args.stylegan_steps),
        "seconds_per_slice": raw["seconds"]["mean"]["mean"],
        "dice": dice["mean"],
        "dice_per_class": {name: dice[f"class{i}"] for i, name in enumerate(CLASSES)},
        "dice_vs_oracle": raw["dice_vs_oracle"]["mean"],
        "psnr": raw["psnr"]["mean"],
        "ssim": raw["ssim"]["mean"],
    }


def markdown(result: dict) -> str:
    """The table in the paper's layout: methods as columns, metrics as mean ± std rows (generated, never typed)."""
    rows = result["methods"]
    names = list(rows)

    def cells(key: str, digits: int) -> str:
        return " | ".join(f"{rows[n][key]['mean']:.{digits}f} ± {rows[n][key]['std']:.{digits}f}" for n in names)

    header = "| | " + " | ".join(rows[n]["label"] for n in names) + " |"
    lines = [
        f"Our simulated data ({result['dataset_name']}): {result['num_slices']} test slices, PDw -> T1w, seed "
        f"{result['seed']}, measured by `{result['command']}` on {result['machine']}.",
        "",
        header,
        "|---" * (len(names) + 1) + "|",
        f"| Dice (CSF/GM/WM mean, vs ground truth) | {cells('dice', 3)} |",
        f"| PSNR (dB) | {cells('psnr', 2)} |",
        f"| SSIM | {cells('ssim', 3)} |",
        f"| Dice vs K-means on the real T1w | {cells('dice_vs_oracle', 3)} |",
    ]
    for name in CLASSES:
        per_class = " | ".join(
            f"{rows[n]['dice_per_class'][name]['mean']:.3f} ± {rows[n]['dice_per_class'][name]['std']:.3f}"
            for n in names
        )
        lines.append(f"| Dice {name} | {per_class} |")
    lines += [
        "| network evaluations per slice | " + " | ".join(str(rows[n]["steps"]) for n in names) + " |",
        "| seconds per slice | " + " | ".join(f"{rows[n]['seconds_per_slice']:.2f}" for n in names) + " |",
        "",
        f"Oracle (the same K-means on the real T1w) Dice vs ground truth: {result['oracle_dice']['mean']:.3f} ± "
        f"{result['oracle_dice']['std']:.3f}: the ceiling of any translation under this segmenter.",
        "",
        "Published (Wang et al., real IXI PDw -> T1w, 128 x 128; a different dataset, for orientation only):",
        "",
        "| | " + " | ".join(PAPER) + " |",
        "|---" * (len(PAPER) + 1) + "|",
    ]
    for key, title, digits in (("dice", "Dice", 2), ("psnr", "PSNR (dB)", 2), ("ssim", "SSIM", 2)):
        lines.append(f"| {title} | " + " | ".join(f"{v[key]:.{digits}f}" for v in PAPER.values()) + " |")
    lines += ["", "Commands:", ""] + [f"- `{c}`" for c in result["commands"]]
    return "\n".join(lines)


def load_slice(path: Path) -> np.ndarray:
    import nibabel as nib

    return np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)


def figure(result: dict, run_dir: Path, dataset: Path, path: Path, rows: int = 3) -> None:
    """source | each method | target, with the segmentations under them, for `rows` test slices."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    from scripts.evaluation import load_evaluation_datalist
    from scripts.segmentation import KMeansTissueSegmenter
    from scripts.transforms import robust_scale

    segmenter = KMeansTissueSegmenter.load(BUNDLE_ROOT / "models" / "segmenter.json")

    entries = load_evaluation_datalist(dataset / "datalist.json", dataset, num_slices=result["num_slices"])
    picked = [entries[i] for i in np.linspace(0, len(entries) - 1, min(rows, len(entries))).round().astype(int)]
    methods = list(result["methods"])
    tissue = ListedColormap(["black", "#4c72b0", "#dd8452", "#f2f2f2"])
    columns = len(methods) + 2
    fig, axes = plt.subplots(2 * len(picked), columns, figsize=(1.9 * columns, 2.0 * 2 * len(picked)))
    axes = np.atleast_2d(axes)
    for r, entry in enumerate(picked):
        stem = Path(entry["image"]).name.replace(".nii.gz", "")
        images = [robust_scale(load_slice(Path(entry["image"])))]
        segs = [load_slice(Path(entry["label"]))]
        titles = ["source (PDw)"]
        for method in methods:
            folder = run_dir / method / "images"
            images.append(load_slice(folder / f"{stem}_to_t1w_{method}.nii.gz"))
            segs.append(load_slice(folder / f"{stem}_seg_{method}.nii.gz"))
            titles.append(result["methods"][method]["label"])
        target = robust_scale(load_slice(Path(entry["target"])))
        images.append(target)
        segs.append(segmenter(target[None], load_slice(Path(entry["mask"]))[None] > 0)[0])  # the oracle
        titles.append("target (T1w)")
        for c in range(columns):
            top, bottom = axes[2 * r, c], axes[2 * r + 1, c]
            top.imshow(np.rot90(images[c]), cmap="gray", vmin=0, vmax=1)
            bottom.imshow(np.rot90(segs[c]), cmap=tissue, vmin=0, vmax=3, interpolation="nearest")
            if r == 0:
                top.set_title(titles[c], fontsize=7)
            top.axis("off")
            bottom.axis("off")
        axes[2 * r + 1, 0].set_title("ground-truth labels", fontsize=6)
        axes[2 * r + 1, -1].set_title("oracle: K-means on the target", fontsize=6)
    fig.suptitle("PDw -> T1w on held-out test slices: images (top) and K-means CSF/GM/WM (bottom)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial.png")
    fig.savefig(partial, dpi=110)
    plt.close(fig)
    os.replace(partial, path)
    print(f"wrote {path}")


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def update_docs(result: dict, readme: Path) -> None:
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme} has no {START} ... {END} block to fill")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    write_atomic(readme, f"{head}{START}\n{markdown(result)}\n{END}{tail}")
    print(f"updated {readme}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=BUNDLE_ROOT / "data" / "labelmaps")
    parser.add_argument("--slices", type=int, default=40)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--stylegan-steps", type=int, default=200)
    parser.add_argument("--sdedit-start", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--output", type=Path, default=BUNDLE_ROOT / "results" / "comparison")
    parser.add_argument("--figure", type=Path, default=BUNDLE_ROOT / "docs" / "images" / "comparison.png")
    parser.add_argument("--quick", action="store_true", help="CI smoke run: the demo slices, few steps")
    parser.add_argument("--update-docs", action="store_true", help="write the table into docs/README.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.dataset, args.slices, args.steps, args.stylegan_steps = BUNDLE_ROOT / "demo", 4, 2, 3
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHOD_LABELS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {sorted(METHOD_LABELS)}")
    if not (args.dataset / "datalist.json").is_file():
        raise SystemExit(f"no datalist.json under {args.dataset}: prepare it with configs/prepare.json")

    with tempfile.TemporaryDirectory(prefix="compare-") as tmp:
        run_dir = Path(tmp)
        raws, commands = {}, []
        for method in methods:
            raws[method], command = run_method(method, args, run_dir)
            commands.append(command)
        first = raws[methods[0]]
        dataset_name = json.loads((args.dataset / "datalist.json").read_text()).get("name", args.dataset.name)
        result = {
            "command": "python " + shlex.join([os.path.relpath(__file__, BUNDLE_ROOT), *(argv or sys.argv[1:])]),
            "commands": commands,
            "machine": f"{platform.machine()} {os.cpu_count()} CPU cores, {platform.system()}",
            "dataset_name": dataset_name,
            "num_slices": len(first["psnr_cases"]),
            "cases": sorted(first["psnr_cases"]),
            "seed": args.seed,
            "protocol": "DESIGN.md section 4: 128x128, per-image 99.5th-percentile scaling, SSIM Gaussian window 7",
            "oracle_dice": first["oracle_dice"]["mean"],
            "methods": {m: summarise(m, raws[m], args) for m in methods},
        }
        table = markdown(result)
        print(table)
        write_atomic(args.output.with_suffix(".json"), json.dumps(result, indent=2))
        write_atomic(args.output.with_suffix(".md"), "# PDw -> T1w comparison\n\n" + table + "\n")
        print(f"wrote {args.output.with_suffix('.md')} and .json")
        if args.figure:
            figure(result, run_dir, args.dataset, args.figure)
    if args.update_docs:
        update_docs(result, BUNDLE_ROOT / "docs" / "README.md")
    return result


if __name__ == "__main__":
    main()
