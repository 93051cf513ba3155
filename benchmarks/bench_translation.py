"""Translation quality and speed of the shipped model on the labelmaps test subjects (13-16), PDw -> T1w.

Protocol (DESIGN.md section 4): images on the 128 x 128 grid, each scaled to [0, 1] by its own 99.5th percentile;
PSNR and SSIM (MONAI, data_range 1, 2D Gaussian window 7) over the whole slice; K-means (k = 3) segmenter fitted on
target *training* images only (``models/segmenter.json``), applied inside the ground-truth brain mask; Dice per class
and mean over CSF/GM/WM against the ground-truth tissue labels, and against K-means applied to the real target.
Mean +- std over the test slices; seconds per slice measured around the inferer call, on this machine.

    python benchmarks/bench_translation.py                      # 40 slices spread over the 4 test subjects
    python benchmarks/bench_translation.py --quick              # 4 slices, for a smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BUNDLE_ROOT))

from monai.bundle import ConfigParser  # noqa: E402
from monai.metrics import PSNRMetric, SSIMMetric  # noqa: E402

from scripts.segmentation import KMeansTissueSegmenter  # noqa: E402
from scripts.training import spread  # noqa: E402
from scripts.transforms import robust_scale  # noqa: E402


def dice(prediction: np.ndarray, truth: np.ndarray) -> list[float]:
    scores = []
    for label in (1, 2, 3):
        a, b = prediction == label, truth == label
        denominator = a.sum() + b.sum()
        scores.append(float(2 * (a & b).sum() / denominator) if denominator else 1.0)
    return scores


def load(path: str) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj, dtype=np.float32)


def build(args) -> tuple[torch.nn.Module, dict]:
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "inference.json"))
    parser.read_meta(str(BUNDLE_ROOT / "configs" / "metadata.json"))
    parser.update(
        {
            "bundle_root": str(BUNDLE_ROOT),
            "model_path": args.model,
            "num_steps": args.steps,
            "sdedit_start": args.sdedit_start,
            "device": "$torch.device('cpu')",
            "progress": False,
        }
    )
    # SDEdit walks only the DDIM steps at or below its start: give it enough steps to walk as many as the others,
    # so every method makes the same number of network evaluations.
    parser["inferers"]["sdedit"]["num_inference_steps"] = round(args.steps * 1000 / args.sdedit_start)
    network = parser.get_parsed_content("network")
    inferers = {
        name: parser.get_parsed_content(f"inferers#{name}") for name in ("lmi", "lmi_paper", "lmi_projection", "sdedit")
    }
    return network, inferers


def summarise(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=str(BUNDLE_ROOT / "data" / "labelmaps"))
    parser.add_argument("--model", default=str(BUNDLE_ROOT / "models" / "model.pt"))
    parser.add_argument("--segmenter", default=str(BUNDLE_ROOT / "models" / "segmenter.json"))
    parser.add_argument("--slices", type=int, default=40)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sdedit-start", type=int, default=500)
    parser.add_argument("--methods", default="identity,sdedit,lmi_paper,lmi_projection,lmi")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--update-docs", action="store_true", help="write the table into docs/README.md")
    parser.add_argument("--output", default=str(BUNDLE_ROOT / "benchmarks" / "results" / "translation.json"))
    args = parser.parse_args()
    if args.quick:
        args.slices = 4
    torch.set_num_threads(2)

    datalist = json.loads((Path(args.dataset) / "datalist.json").read_text())
    cases = spread(datalist["testing"], args.slices)
    root = Path(args.dataset)
    source = torch.from_numpy(np.stack([robust_scale(load(str(root / c["image"]))) for c in cases]))[:, None]
    target = torch.from_numpy(np.stack([robust_scale(load(str(root / c["target"]))) for c in cases]))[:, None]
    labels = np.stack([load(str(root / c["label"])).astype(np.uint8) for c in cases])
    masks = np.stack([load(str(root / c["mask"])) > 0 for c in cases])
    segmenter = KMeansTissueSegmenter.load(args.segmenter)
    oracle = np.stack([segmenter(t[0].numpy(), m) for t, m in zip(target, masks, strict=True)])

    network, inferers = build(args)
    ssim_metric = SSIMMetric(spatial_dims=2, data_range=1.0, win_size=7)
    psnr_metric = PSNRMetric(max_val=1.0)
    rows = {}
    oracle_dice = [float(np.mean(dice(o, lab))) for o, lab in zip(oracle, labels, strict=True)]
    rows["oracle (K-means on the real T1w)"] = {"steps": 0, "seconds_per_slice": 0.0, "dice_gt": summarise(oracle_dice)}
    for method in args.methods.split(","):
        if method != "identity":
            inferers[method](source[:1], network)  # warm-up: first-call allocations are not per-slice cost
        start = time.perf_counter()
        if method == "identity":
            translated = source.clone()
        else:
            translated = torch.cat([torch.as_tensor(inferers[method](s[None], network)) for s in source])
        seconds = (time.perf_counter() - start) / len(cases)
        translated = torch.stack([robust_scale(t) for t in translated])  # protocol: each image by its own p99.5
        segs = np.stack([segmenter(t[0].numpy(), m) for t, m in zip(translated, masks, strict=True)])
        per_class = np.array([dice(s, lab) for s, lab in zip(segs, labels, strict=True)])
        if method == "identity":
            steps = 0
        else:  # network evaluations actually made (SDEdit skips the steps above its start)
            inferer = inferers[method]
            inferer.scheduler.set_timesteps(inferer.num_inference_steps)
            t0 = getattr(inferer, "start_timestep", None)
            timesteps = inferer.scheduler.timesteps
            steps = int((timesteps <= t0).sum()) if t0 is not None else len(timesteps)
        rows[method] = {
            "steps": steps,
            "seconds_per_slice": seconds,
            "dice_gt": summarise(per_class.mean(1).tolist()),
            "dice_gt_per_class": {n: summarise(per_class[:, i].tolist()) for i, n in enumerate(("CSF", "GM", "WM"))},
            "dice_vs_oracle": summarise([float(np.mean(dice(s, o))) for s, o in zip(segs, oracle, strict=True)]),
            "psnr": summarise(psnr_metric(translated, target).flatten().tolist()),
            "ssim": summarise(ssim_metric(translated, target).flatten().tolist()),
        }
        print(f"{method}: done in {seconds:.2f} s/slice", flush=True)

    result = {
        "command": "python " + " ".join(sys.argv),
        "machine": {"platform": platform.platform(), "cpus": torch.get_num_threads(), "torch": torch.__version__},
        "protocol": "128x128, per-image 99.5th-percentile scaling, SSIM window 7 (Gaussian), PSNR data_range 1",
        "num_slices": len(cases),
        "cases": [f"{c['subject']}:{c.get('slice')}" for c in cases],
        "results": rows,
    }
    print(markdown_table(result))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    print(f"wrote {output}")
    if args.update_docs:
        update_docs(result, BUNDLE_ROOT / "docs" / "README.md")


START, END = "<!-- translation-benchmark:start -->", "<!-- translation-benchmark:end -->"


def markdown_table(result: dict) -> str:
    """The benchmark as a Markdown table, for docs/README.md (generated, never typed by hand)."""
    lines = [
        f"Measured by `{result['command']}` on {result['num_slices']} test slices ({result['protocol']}).",
        "",
        "| method | steps | s/slice | Dice vs GT | Dice vs oracle | PSNR (dB) | SSIM |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in result["results"].items():

        def cell(key: str, digits: int = 3, row=row) -> str:
            return f"{row[key]['mean']:.{digits}f} ± {row[key]['std']:.{digits}f}" if key in row else "-"

        lines.append(
            f"| {name} | {row['steps']} | {row['seconds_per_slice']:.2f} | {cell('dice_gt')} | "
            f"{cell('dice_vs_oracle')} | {cell('psnr', 2)} | {cell('ssim')} |"
        )
    return "\n".join(lines)


def update_docs(result: dict, readme: Path) -> None:
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme} has no {START} ... {END} block to fill")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{markdown_table(result)}\n{END}{tail}")
    print(f"updated {readme}")


if __name__ == "__main__":
    main()
