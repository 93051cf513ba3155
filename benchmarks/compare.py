"""The paper's comparison (Wang et al., Table: Dice / PSNR / SSIM per method), reproduced on our data.

Runs ``configs/evaluate.json`` once per method and block through the bundle runner, on the same test slices with the
same seed, then writes ``results/comparison.md`` and ``results/comparison.json`` (method columns, mean ± std rows,
steps, seconds per slice, each learned method's training budget, the commands used), the figure
``docs/images/comparison.png`` (source | each method | target, with the K-means segmentations under them) and, with
``--update-docs``, the Performance table of docs/README.md and the Model Zoo ``eval_metrics`` of configs/metadata.json
(the default method's Dice, PSNR and SSIM on the main test block; :func:`update_metadata` also fills them from an
existing ``results/comparison.json``).

    python benchmarks/compare.py --update-docs                  # full: 40 labelmaps test slices
    python benchmarks/compare.py --quick                        # CI smoke: the 4 shipped demo slices, 2 steps

Each diffusion method samples with its own configured DDIM step count (``num_steps`` of its method config, else
``configs/inference.json``'s, the default method's), as each was tuned on validation slices; ``--steps`` runs them
all at one count instead.

Blocks, all in one run (each one skipped with a one-line note when its data is absent):

- main: PDw -> T1w on the test slices of ``--dataset``;
- t2: T2w -> T1w with the same models on the same test slices (``--source_key t2``; CycleGAN was trained on PDw only
  and is reported with that label);
- physics2: PDw -> T1w on the test slices of ``--physics2-dataset`` (the same label maps simulated with a second
  physics model, ``configs/prepare_second_physics.json``), same slice count and selection;
- brainweb: the real BrainWeb PD/T1 pair of ``--real-fixtures`` (converted to NIfTI in a temporary folder), scored
  against K-means of the BrainWeb T1; the real IXI PD slice rides along for the figure only (it has no T1w).

Protocol: 128 x 128 grid; the target and each method's output scaled to [0, 1] by their own 99.5th percentile; SSIM
(MONAI, 2D, Gaussian window 7, data_range 1) and PSNR over the whole slice; the K-means (k = 3) segmenter fitted on
target *training* images only, applied inside the ground-truth brain mask; Dice per class and mean over CSF/GM/WM
against the ground-truth labels and against K-means on the real target. "Steps" counts network evaluations per slice
(SDEdit is given a DDIM schedule that walks `steps` below its start; StyleGAN counts inversion iterations, each a
generator forward and backward).
"""

from __future__ import annotations

import argparse
import csv
import io
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

from scripts.configs import DEFAULT_METHOD, config_files  # noqa: E402  (DEFAULT_METHOD: metadata's eval_metrics)
from scripts.evaluation import tissue_dice  # noqa: E402
from scripts.io import write_bytes_atomic, write_text_atomic  # noqa: E402

METHOD_LABELS = {
    "identity": "Identity (source)",
    "sdedit": "SDEdit",
    "cyclegan": "CycleGAN (11% source)",
    "stylegan": "StyleGAN2-ADA + inversion",
    "lmi_paper": "LMIDiffusion (paper)",
    "lmi": "Ours: contrast-randomised diffusion (default)",
    "lmi_projection": "LMIDiffusion + projection",
}
DEFAULT_METHODS = ["identity", "sdedit", "cyclegan", "stylegan", "lmi_paper", "lmi"]
DIFFUSION_METHODS = ("sdedit", "lmi_paper", "lmi", "lmi_projection")  # the methods that sample with DDIM steps
METADATA = BUNDLE_ROOT / "configs" / "metadata.json"
INFERENCE_CONFIG = BUNDLE_ROOT / "configs" / "inference.json"  # the default method's settings
# Wang et al., PDw -> T1w on real IXI slices at 128 x 128 (their table; not comparable to our simulated data)
PAPER = {
    "LMIDiffusion (paper)": {"dice": 0.88, "psnr": 20.22, "ssim": 0.69},
    "SDEdit": {"dice": 0.82, "psnr": 15.96, "ssim": 0.50},
    "CycleGAN (11% source)": {"dice": 0.85, "psnr": 18.88, "ssim": 0.27},
    "StyleGAN2-ADA + inversion": {"dice": 0.66, "psnr": 10.15, "ssim": 0.06},
}
CLASSES = ("CSF", "GM", "WM")
START, END = "<!-- comparison:start -->", "<!-- comparison:end -->"
PROTOCOL = (
    "128x128 grid, per-image 99.5th-percentile scaling to [0, 1], SSIM (Gaussian window 7) and PSNR over the whole "
    "slice, K-means (k = 3, fitted on T1w training slices) inside the brain mask, Dice mean over CSF/GM/WM"
)
BUDGETS = BUNDLE_ROOT / "models" / "training_budgets.json"
REAL_FIXTURES = BUNDLE_ROOT.parent / "shared" / "data" / "real_fixtures"
BRAINWEB_FILES = ("brainweb_pd_slice.png", "brainweb_t1_slice.png")
IXI_PD_FILE = "IXI040-Guys-0724-PD_69.mat"
# methods trained on one source contrast, per block: reported with this mark and note
OUT_OF_DOMAIN = {
    "t2": {
        "cyclegan": "CycleGAN was trained on PDw -> T1w only (72 PDw slices): T2w input is outside its training data"
    }
}
BLOCK_TITLES = {
    "t2": "T2w -> T1w with the same models (the test entries' `t2` slices, `--source_key t2`)",
    "physics2": "PDw -> T1w on slices simulated with a second physics model",
    "brainweb": "Real BrainWeb PD -> T1 pair (one slice)",
}


# ----------------------------------------------------------------------------------------------------- reading results
def read_summary(path: Path) -> dict:
    """A MetricsSaver ``*_summary.csv``: {row name: {"mean": .., "std": ..}} (rows class0.. and mean)."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return {row["class"]: {"mean": float(row["mean"]), "std": float(row["std"])} for row in rows}


def read_raw_rows(path: Path) -> dict[str, dict[str, float]]:
    """A MetricsSaver ``*_raw.csv``: {case file name: {column (class0.., mean): value}}."""
    with open(path) as f:
        return {row.pop("filename"): {k: float(v) for k, v in row.items()} for row in csv.DictReader(f)}


def read_raw(path: Path) -> dict[str, float]:
    """A MetricsSaver ``*_raw.csv``: {case file name: per-case mean}."""
    return {name: row["mean"] for name, row in read_raw_rows(path).items()}


def summary_of_cases(path: Path, keep) -> dict:
    """The ``read_summary`` layout computed from the raw rows whose file name passes `keep` (one block's cases)."""
    rows = [row for name, row in read_raw_rows(path).items() if keep(name)]
    if not rows:
        raise SystemExit(f"{path} holds none of the expected cases")
    return {
        col: {"mean": float(np.mean([r[col] for r in rows])), "std": float(np.std([r[col] for r in rows]))}
        for col in rows[0]
    }


METRICS = ("ssim", "psnr", "dice", "dice_vs_oracle", "oracle_dice", "seconds")


def read_method(folder: Path, keep=None) -> dict:
    """One method's published evaluation folder; `keep` restricts it to some cases (None: every case)."""
    result = {}
    for name in METRICS:
        result[name] = (
            read_summary(folder / f"{name}_summary.csv")
            if keep is None
            else summary_of_cases(folder / f"{name}_raw.csv", keep)
        )
    result["psnr_cases"] = {k: v for k, v in read_raw(folder / "psnr_raw.csv").items() if keep is None or keep(k)}
    return result


# --------------------------------------------------------------------------------------------------------- portability
def portable(path: str | os.PathLike, base: Path = BUNDLE_ROOT, placeholder: str | None = None) -> str:
    """`path` relative to `base` when inside it, else `<placeholder>` (or `<external>/name`): no absolute paths."""
    path = Path(path)
    if not path.is_absolute():
        return path.as_posix()
    try:
        return path.resolve().relative_to(Path(base).resolve()).as_posix()
    except ValueError:
        return f"<{placeholder}>" if placeholder else f"<external>/{path.name}"


def portable_argv(argv: list[str]) -> list[str]:
    """Command-line arguments with absolute paths made relative to the bundle (or replaced by a placeholder)."""
    shown = []
    for arg in argv:
        flag, sep, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
        shown.append(f"{flag}{sep}{portable(value)}" if os.path.isabs(value) else arg)
    return shown


# ------------------------------------------------------------------------------------------------------ training budget
def read_training_log(path: Path) -> dict | None:
    """The last row of a campaign log (iteration, epoch, wall_s, images_seen, val_*): the budget so far."""
    if not path.is_file():
        return None
    with open(path) as f:
        rows = [row for row in csv.DictReader(f) if row.get("iteration")]
    if not rows:
        return None
    last = rows[-1]
    return {
        "steps": int(float(last["iteration"])),
        "epochs": int(float(last["epoch"])) if last.get("epoch") else None,
        "images_seen": int(float(last["images_seen"])),
        "wall_s": float(last["wall_s"]),
    }


def training_budgets(path: Path = BUDGETS, root: Path = BUNDLE_ROOT) -> dict[str, dict]:
    """{method: {steps, images_seen, wall_s, hardware, source, ...}} from `path`, logs read under `root`.

    A campaign log's last row fills the numbers its entry leaves out; numbers the entry states win, because they can
    cover what the log does not (stages run before the log existed, such as CycleGAN's GPU epochs).
    """
    if not path.is_file():
        return {}
    spec = json.loads(path.read_text())["methods"]
    budgets = {}
    for method, entry in spec.items():
        if "same_as" in entry:
            continue
        budget = {key: entry.get(key) for key in ("steps", "images_seen", "wall_s", "hardware", "model", "source")}
        if "log" in entry:
            budget["log"] = entry["log"]
            logged = read_training_log(root / entry["log"])
            if logged is None:
                budget["note"] = f"{entry['log']} not found or empty: budget unknown"
            else:
                budget.update({key: value for key, value in logged.items() if budget.get(key) is None})
        budgets[method] = budget
    for method, entry in spec.items():
        if "same_as" in entry and entry["same_as"] in budgets:
            budgets[method] = {**budgets[entry["same_as"]], "same_as": entry["same_as"], "source": entry["source"]}
    return budgets


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.1f} min"


# ------------------------------------------------------------------------------------------------------- real fixtures
def _to_grid(image: np.ndarray, size: int = 256, pool: int = 2) -> np.ndarray:
    """Zero-pad a 2D slice to `size` x `size` (centred), mean-pool by `pool`; rows/columns to the NIfTI (x, y) layout.

    The bundle's slices are stored so that ``np.rot90`` shows them anterior-up, as these images are drawn.
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2 or max(image.shape) > size:
        raise ValueError(f"expected a 2D slice at most {size} wide, got shape {image.shape}")
    padded = np.zeros((size, size), dtype=np.float32)
    top, left = (size - image.shape[0]) // 2, (size - image.shape[1]) // 2
    padded[top : top + image.shape[0], left : left + image.shape[1]] = image
    pooled = padded.reshape(size // pool, pool, size // pool, pool).mean(axis=(1, 3))
    return np.ascontiguousarray(np.rot90(pooled, k=-1))


def real_fixture_dataset(
    fixtures: Path, folder: Path, segmenter_path: Path = BUNDLE_ROOT / "models" / "segmenter.json"
):
    """The BrainWeb PD/T1 pair (and the IXI PD slice, when present) as an evaluation dataset in `folder`.

    BrainWeb (217 x 181 uint8 at 1 mm): zero-padded to 256 x 256 and 2 x 2 mean-pooled to the simulated slices' grid
    (128 x 128 at 2 mm). Mask: ``head_mask`` of the T1 at its native 1 mm, where the dark skull cuts the scalp off so
    the largest component is the intracranial region (brain and CSF), pooled and kept where above 0.5. Label: the
    shipped K-means segmenter on the (99.5th-percentile scaled) T1 inside the mask, i.e. what the evaluation calls the
    oracle; ``label_refit`` (ignored by the evaluator) is a K-means refitted on this T1 alone, for the note on how well
    the shipped segmenter's T1w intensity centres fit BrainWeb. IXI (256 x 256 int16, about 0.94 mm): pooled the same
    way; it has no T1w, so its target is a placeholder (the PD itself), its label empty and its metrics are never
    reported: it rides along so that every method translates it for the figure in the same run.

    Returns ``(datalist path, info)``; `info` describes the mask and label choices and the label's class counts.
    """
    import nibabel as nib
    import scipy.io
    from matplotlib.image import imread

    from scripts.evaluation import KMeansTissueSegmenter, fit_segmenter
    from scripts.transforms import head_mask, robust_scale

    folder.mkdir(parents=True, exist_ok=True)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])

    def save(array: np.ndarray, name: str, dtype=np.float32) -> str:
        nib.save(nib.Nifti1Image(np.asarray(array, dtype=dtype), affine), str(folder / name))
        return name

    def png(name: str) -> np.ndarray:
        image = imread(fixtures / name)  # 8-bit grey PNG: floats in [0, 1]
        return np.round((image[..., 0] if image.ndim == 3 else image) * 255)

    pd, t1 = (png(name) for name in BRAINWEB_FILES)
    if pd.shape != t1.shape:
        raise SystemExit(f"BrainWeb PD {pd.shape} and T1 {t1.shape} differ in shape")
    mask = (_to_grid(head_mask(t1)) > 0.5).astype(np.uint8)
    pd, t1 = _to_grid(pd), _to_grid(t1)
    segmenter = KMeansTissueSegmenter.load(segmenter_path)
    label = segmenter(robust_scale(t1), mask)
    refit = fit_segmenter([t1], [mask])(robust_scale(t1), mask)
    testing = [
        {
            "image": save(pd, "brainweb_PD.nii.gz"),
            "target": save(t1, "brainweb_T1.nii.gz"),
            "label": save(label, "brainweb_T1_kmeans_dseg.nii.gz", np.uint8),
            "label_refit": save(refit, "brainweb_T1_kmeans_refit_dseg.nii.gz", np.uint8),
            "mask": save(mask, "brainweb_mask.nii.gz", np.uint8),
            "case": "brainweb",
            "paired": True,
        }
    ]
    if (fixtures / IXI_PD_FILE).is_file():
        ixi = _to_grid(scipy.io.loadmat(fixtures / IXI_PD_FILE)["dcm"])
        name = save(ixi, "IXI040-Guys-0724-PD_69.nii.gz")
        testing.append(
            {
                "image": name,
                "target": name,  # placeholder: IXI040 has no T1w here; never reported
                "label": save(np.zeros(ixi.shape), "ixi_empty_dseg.nii.gz", np.uint8),
                "mask": save(head_mask(ixi), "ixi_head_mask.nii.gz", np.uint8),
                "case": "ixi",
                "paired": False,
            }
        )
    counts = {name: int((label == i + 1).sum()) for i, name in enumerate(CLASSES)}
    refit_counts = {name: int((refit == i + 1).sum()) for i, name in enumerate(CLASSES)}
    info = {
        "grid": "zero-padded to 256 x 256 at 1 mm, 2 x 2 mean-pooled: 128 x 128 at 2 mm, like the simulated slices",
        "mask": "head_mask of the BrainWeb T1 at 1 mm (the dark skull cuts the scalp off: brain and CSF), pooled > 0.5",
        "label": "the shipped K-means segmenter (models/segmenter.json) on the T1 inside the mask",
        "label_pixels": counts,
        "refit_label_pixels": refit_counts,
        "mask_pixels": int(mask.sum()),
    }
    datalist = {
        "name": "BrainWeb PD/T1 pair (real fixtures), with the IXI040 PD slice for the figure",
        "description": "converted by benchmarks/compare.py; "
        + "; ".join(f"{k}: {info[k]}" for k in ("grid", "mask", "label")),
        "testing": testing,
    }
    (folder / "datalist.json").write_text(json.dumps(datalist, indent=2))
    return folder / "datalist.json", info


# ------------------------------------------------------------------------------------------------------------- running
def network_evaluations(
    method: str, steps: int, sdedit_start: int, stylegan_steps: int, samples: int = 1, stop_timestep: int = 0
) -> int:
    if method == "identity":
        return 0
    if method == "cyclegan":
        return 1
    if method == "stylegan":
        return stylegan_steps
    if method not in ("lmi", "sdedit"):
        return steps  # the other diffusion methods walk every step
    from monai.networks.schedulers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=json.loads(INFERENCE_CONFIG.read_text())["num_train_timesteps"])
    if method == "sdedit":  # the DDIM schedule stretched to round(steps * T / start) steps, walked below the start
        scheduler.set_timesteps(round(steps * scheduler.num_train_timesteps / sdedit_start))
        return int((scheduler.timesteps <= sdedit_start).sum())
    scheduler.set_timesteps(steps)  # the default walks the steps at or above its stop (at least one) per sample
    return max(int((scheduler.timesteps >= stop_timestep).sum()), 1) * samples


def configured_steps(method: str) -> int:
    """The DDIM step count `method` samples with: its method config's ``num_steps``, else the default method's."""
    method_config = BUNDLE_ROOT / "configs" / "methods" / f"{method}.json"
    if method_config.is_file():
        steps = json.loads(method_config.read_text()).get("num_steps")
        if steps is not None:
            return int(steps)
    return int(json.loads(INFERENCE_CONFIG.read_text())["num_steps"])


def method_steps(method: str, args) -> int:
    """`args.steps` when given (one count for every method), else the method's configured count."""
    return configured_steps(method) if args.steps is None else args.steps


def run_method(
    method: str,
    args,
    run_dir: Path,
    dataset: Path | None = None,
    slices: int | None = None,
    source_key: str = "image",
    shown_dataset: str | None = None,
) -> tuple[dict, str]:
    """Evaluate `method` on `dataset` (default ``args.dataset``) into ``run_dir/method``; the printable command."""
    dataset = args.dataset if dataset is None else dataset
    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        json.dumps(config_files("evaluate", method)),
    ]
    command += ["--dataset_dir", str(dataset)]
    if slices is not None:
        command += ["--num_slices", str(slices)]
    if source_key != "image":
        command += ["--source_key", source_key]
    if method in DIFFUSION_METHODS:
        command += ["--num_steps", str(method_steps(method, args))]
    command += ["--num_samples", str(args.num_samples), "--seed", str(args.seed)]
    command += {
        "sdedit": ["--sdedit_start", str(args.sdedit_start)],
        "stylegan": ["--stylegan_steps", str(args.stylegan_steps)],
    }.get(method, [])
    command += ["--output_dir", str(run_dir), "--save_outputs", "True"]
    shown = {str(dataset): shown_dataset or portable(dataset), str(run_dir): "<run_dir>"}
    printable = shlex.join(["python", *[shown.get(part, part) for part in command[1:]]])
    print(f"[{method}] {printable}", flush=True)
    completed = subprocess.run(command, cwd=BUNDLE_ROOT, capture_output=True, text=True)
    if completed.returncode != 0:
        tail = "\n".join((completed.stdout + completed.stderr).strip().splitlines()[-15:])
        raise SystemExit(f"evaluation of '{method}' failed (exit {completed.returncode}):\n{tail}")
    return read_method(run_dir / method), printable


def summarise(method: str, raw: dict, args) -> dict:
    dice = raw["dice"]
    return {
        "label": METHOD_LABELS.get(method, method),
        "ddim_steps": method_steps(method, args) if method in DIFFUSION_METHODS else None,
        "steps": network_evaluations(
            method,
            method_steps(method, args),
            args.sdedit_start,
            args.stylegan_steps,
            args.num_samples,
            json.loads(INFERENCE_CONFIG.read_text())["stop_timestep"],
        ),
        "seconds_per_slice": raw["seconds"]["mean"]["mean"],
        "dice": dice["mean"],
        "dice_per_class": {name: dice[f"class{i}"] for i, name in enumerate(CLASSES)},
        "dice_vs_oracle": raw["dice_vs_oracle"]["mean"],
        "psnr": raw["psnr"]["mean"],
        "ssim": raw["ssim"]["mean"],
    }


def relative_cases(cases, dataset: Path) -> list[str]:
    """Case file names relative to their dataset folder (MetricsSaver writes them as given, often absolute)."""
    out = []
    for case in cases:
        path = Path(case)
        try:
            out.append(path.resolve().relative_to(Path(dataset).resolve()).as_posix())
        except ValueError:
            out.append(path.name)
    return sorted(out)


def dataset_name(dataset: Path) -> str:
    return json.loads((dataset / "datalist.json").read_text()).get("name", Path(dataset).name)


def has_source_key(dataset: Path, key: str) -> bool:
    entries = json.loads((dataset / "datalist.json").read_text()).get("testing") or []
    return bool(entries) and all(isinstance(e, dict) and key in e for e in entries)


def run_block(name: str, methods, args, run_dir: Path, dataset: Path, slices, source_key="image", shown=None):
    """One block: every method of `methods` on `dataset`, results under ``run_dir/name``."""
    folder = run_dir / name
    raws, commands = {}, []
    for method in methods:
        raws[method], command = run_method(method, args, folder, dataset, slices, source_key, shown)
        commands.append(command)
    first = raws[methods[0]]
    marks = OUT_OF_DOMAIN.get(name, {})
    rows = {}
    for method in methods:
        rows[method] = summarise(method, raws[method], args)
        if method in marks:
            rows[method]["label"] += " *"
            rows[method]["out_of_domain"] = marks[method]
    block = {
        "title": BLOCK_TITLES[name],
        "dataset": shown or portable(dataset),
        "dataset_name": dataset_name(dataset),
        "source_key": source_key,
        "num_slices": len(first["psnr_cases"]),
        "cases": relative_cases(first["psnr_cases"], dataset),
        "oracle_dice": first["oracle_dice"]["mean"],
        "methods": rows,
        "notes": [f"* {note}" for method, note in marks.items() if method in methods],
    }
    return block, commands


def run_brainweb_block(methods, args, run_dir: Path, fixtures: Path) -> tuple[dict, list[str], Path]:
    """The BrainWeb pair (and the IXI PD slice for the figure): one evaluation per method, BrainWeb rows reported."""
    folder = run_dir / "real_fixtures"
    datalist, info = real_fixture_dataset(fixtures, folder)
    raws, commands = {}, []
    brainweb = "brainweb_PD.nii.gz"
    for method in methods:
        _, command = run_method(method, args, run_dir / "brainweb", folder, None, "image", "<brainweb_dir>")
        raws[method] = read_method(run_dir / "brainweb" / method, keep=lambda case: Path(case).name == brainweb)
        commands.append(command)
    import nibabel as nib

    entry = json.loads(datalist.read_text())["testing"][0]
    refit = np.asarray(nib.load(str(folder / entry["label_refit"])).dataobj)
    rows = {}
    for method in methods:
        rows[method] = summarise(method, raws[method], args)
        seg = np.asarray(
            nib.load(str(run_dir / "brainweb" / method / "images" / f"brainweb_PD_seg_{method}.nii.gz")).dataobj
        )
        rows[method]["dice_vs_refit"] = tissue_dice(np.round(seg), refit)
    pixels = ", ".join(f"{k} {v}" for k, v in info["label_pixels"].items())
    refit_pixels = ", ".join(f"{k} {v}" for k, v in info["refit_label_pixels"].items())
    block = {
        "title": BLOCK_TITLES["brainweb"],
        "dataset": "<brainweb_dir>",
        "dataset_name": "BrainWeb PD/T1 (../shared/data/real_fixtures/brainweb_{pd,t1}_slice.png)",
        "source_key": "image",
        "num_slices": 1,
        "cases": [brainweb],
        "oracle_dice": raws[methods[0]]["oracle_dice"]["mean"],
        "methods": rows,
        "conversion": info,
        "notes": [
            f"Grid: {info['grid']}. Mask: {info['mask']} ({info['mask_pixels']} pixels).",
            f"Label: {info['label']} (pixels: {pixels}); 'Dice' and 'Dice vs K-means on the real T1' both compare "
            "against it. The shipped segmenter's centres come from the simulated T1w; on BrainWeb they put most of "
            f"the brain in WM, so the last row also compares with K-means refitted on this T1 alone ({refit_pixels}).",
            "The IXI040 PD slice is translated in the same runs for the figure only: it has no T1w, no metrics.",
        ],
    }
    return block, commands, folder


# ------------------------------------------------------------------------------------------------------------ markdown
def block_table(block: dict, main: bool = False) -> list[str]:
    """Methods as columns, metrics as mean ± std rows (a single-case block shows plain values)."""
    rows = block["methods"]
    names = list(rows)
    single = block["num_slices"] == 1

    def cells(key: str, digits: int) -> str:
        if single:
            return " | ".join(f"{rows[n][key]['mean']:.{digits}f}" for n in names)
        return " | ".join(f"{rows[n][key]['mean']:.{digits}f} ± {rows[n][key]['std']:.{digits}f}" for n in names)

    dice_title = (
        "Dice (CSF/GM/WM mean, vs ground truth)"
        if "label_pixels" not in block.get("conversion", {})
        else ("Dice (CSF/GM/WM mean, vs the shipped K-means on the BrainWeb T1)")
    )
    lines = [
        "| | " + " | ".join(rows[n]["label"] for n in names) + " |",
        "|---" * (len(names) + 1) + "|",
        f"| {dice_title} | {cells('dice', 3)} |",
        f"| PSNR (dB) | {cells('psnr', 2)} |",
        f"| SSIM | {cells('ssim', 3)} |",
    ]
    if "conversion" not in block:
        lines.append(f"| Dice vs K-means on the real T1w | {cells('dice_vs_oracle', 3)} |")
    if main or single:
        for name in CLASSES:
            if single:
                per_class = " | ".join(f"{rows[n]['dice_per_class'][name]['mean']:.3f}" for n in names)
            else:
                per_class = " | ".join(
                    f"{rows[n]['dice_per_class'][name]['mean']:.3f} ± {rows[n]['dice_per_class'][name]['std']:.3f}"
                    for n in names
                )
            lines.append(f"| Dice {name} | {per_class} |")
    if "conversion" in block:
        lines.append(
            "| Dice vs K-means refitted on the BrainWeb T1 | "
            + " | ".join(f"{rows[n]['dice_vs_refit']:.3f}" for n in names)
            + " |"
        )
    lines += [
        "| DDIM steps per sample | "
        + " | ".join("–" if rows[n].get("ddim_steps") is None else str(rows[n]["ddim_steps"]) for n in names)
        + " |",
        "| network evaluations per slice | " + " | ".join(str(rows[n]["steps"]) for n in names) + " |",
        "| seconds per slice | " + " | ".join(f"{rows[n]['seconds_per_slice']:.2f}" for n in names) + " |",
    ]
    if main:
        budgets = [rows[n].get("training") for n in names]

        def budget_cells(fmt) -> str:
            return " | ".join("–" if b is None else fmt(b) for b in budgets)

        lines += [
            "| training steps | " + budget_cells(lambda b: "?" if b["steps"] is None else f"{b['steps']:,}") + " |",
            "| training images seen | "
            + budget_cells(lambda b: "?" if b["images_seen"] is None else f"{b['images_seen']:,}")
            + " |",
            "| training wall time | " + budget_cells(lambda b: _duration(b["wall_s"])) + " |",
            "| training hardware | " + budget_cells(lambda b: str(b["hardware"])) + " |",
        ]
    return lines


def markdown(result: dict) -> str:
    """The tables in the paper's layout: methods as columns, metrics as mean ± std rows (generated, never typed)."""
    lines = [
        f"Our simulated data ({result['dataset_name']}): {result['num_slices']} test slices, PDw -> T1w, seed "
        f"{result['seed']}, measured by `{result['command']}` on {result['machine']}.",
        "",
        *block_table(result, main=True),
        "",
        f"Oracle (the same K-means on the real T1w) Dice vs ground truth: {result['oracle_dice']['mean']:.3f} ± "
        f"{result['oracle_dice']['std']:.3f}: the ceiling of any translation under this segmenter.",
    ]
    shared = sorted({m for m, row in result["methods"].items() if (row.get("training") or {}).get("same_as")})
    if shared:
        lines += [
            "",
            "Training budgets: models/training_budgets.json (where each number comes from is stated there); "
            + "; ".join(f"{m} samples the `{result['methods'][m]['training']['same_as']}` network" for m in shared)
            + ", so its budget is that network's.",
        ]
    for name, block in result.get("blocks", {}).items():
        lines += [
            "",
            f"**{BLOCK_TITLES[name]}**" + (f" ({block['dataset_name']})" if "skipped" not in block else ""),
            "",
        ]
        if "skipped" in block:
            lines.append(f"Skipped: {block['skipped']}")
            continue
        if name != "brainweb":
            lines += [f"{block['num_slices']} test slices, source key `{block['source_key']}`.", ""]
        lines += block_table(block)
        if name != "brainweb":
            lines += ["", f"Oracle Dice vs ground truth: {block['oracle_dice']['mean']:.3f}."]
        if block.get("notes"):
            lines += [""] + [f"- {note}" for note in block["notes"]]
    lines += [
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


# -------------------------------------------------------------------------------------------------------------- figure
def load_slice(path: Path) -> np.ndarray:
    import nibabel as nib

    return np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)


def figure(result: dict, run_dir: Path, dataset: Path, path: Path, rows: int = 3, real_dir: Path | None = None):
    """source | each method | target, with the segmentations under them, for `rows` test slices; then the BrainWeb
    pair (images and segmentations) and the IXI PD slice (images only) when the brainweb block ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    from scripts.evaluation import KMeansTissueSegmenter, load_evaluation_datalist
    from scripts.transforms import robust_scale

    segmenter = KMeansTissueSegmenter.load(BUNDLE_ROOT / "models" / "segmenter.json")
    methods = list(result["methods"])
    tissue = ListedColormap(["black", "#4c72b0", "#dd8452", "#f2f2f2"])

    entries = load_evaluation_datalist(dataset / "datalist.json", dataset, num_slices=result["num_slices"])
    picked = [entries[i] for i in np.linspace(0, len(entries) - 1, min(rows, len(entries))).round().astype(int)]
    # each group: (row title, method -> images folder, entry, has segmentations, has a target)
    groups = [("simulated test slice", run_dir / "main", entry, True, True) for entry in picked]
    if real_dir is not None:
        real = load_evaluation_datalist(real_dir / "datalist.json", real_dir)
        for entry in real:
            if entry.get("paired"):
                groups.append(("real BrainWeb PD/T1 pair", run_dir / "brainweb", entry, True, True))
            else:
                groups.append(("real IXI040 PD (no T1w: for the eye)", run_dir / "brainweb", entry, False, False))
    height = sum(2 if g[3] else 1 for g in groups)
    columns = len(methods) + 2
    fig, axes = plt.subplots(height, columns, figsize=(1.9 * columns, 2.0 * height), squeeze=False)
    r = 0
    for g, (title, folder, entry, with_seg, with_target) in enumerate(groups):
        stem = Path(entry["image"]).name.replace(".nii.gz", "")
        source = robust_scale(load_slice(Path(entry["image"])))
        images, segs, titles = [source], [load_slice(Path(entry["label"])) if with_seg else None], ["source"]
        for method in methods:
            image_path = folder / method / "images" / f"{stem}_to_t1w_{method}.nii.gz"
            seg_path = folder / method / "images" / f"{stem}_seg_{method}.nii.gz"
            images.append(load_slice(image_path) if image_path.is_file() else None)
            segs.append(load_slice(seg_path) if seg_path.is_file() else None)
            titles.append(result["methods"][method]["label"])
        if with_target:
            target = robust_scale(load_slice(Path(entry["target"])))
            images.append(target)
            segs.append(segmenter(target[None], load_slice(Path(entry["mask"]))[None] > 0)[0])  # the oracle
        else:
            images.append(None)
            segs.append(None)
        titles.append("target (T1w)")
        for c in range(columns):
            top = axes[r, c]
            if images[c] is None:
                top.text(0.5, 0.5, "no T1w" if c == columns - 1 else "not run", ha="center", va="center", fontsize=7)
            else:
                top.imshow(np.rot90(images[c]), cmap="gray", vmin=0, vmax=1)
            if g == 0:
                top.set_title(titles[c], fontsize=7)
            top.axis("off")
            if with_seg:
                bottom = axes[r + 1, c]
                if segs[c] is not None and images[c] is not None:
                    bottom.imshow(np.rot90(segs[c]), cmap=tissue, vmin=0, vmax=3, interpolation="nearest")
                bottom.axis("off")
        axes[r, 0].set_title(f"source: {title}\n{stem}" if g else f"source\n{stem}", fontsize=6)
        if with_seg:
            first_seg = "ground-truth labels" if title.startswith("simulated") else "label: K-means of the T1"
            axes[r + 1, 0].set_title(first_seg, fontsize=6)
            axes[r + 1, -1].set_title("oracle: K-means on the target", fontsize=6)
        r += 2 if with_seg else 1
    fig.suptitle(
        "-> T1w: simulated PDw test slices, then real BrainWeb and IXI: images and K-means CSF/GM/WM", fontsize=9
    )
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())
    print(f"wrote {path}")


def update_docs(result: dict, readme: Path) -> None:
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme} has no {START} ... {END} block to fill")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    write_text_atomic(readme, f"{head}{START}\n{markdown(result)}\n{END}{tail}")
    print(f"updated {readme}")


def eval_metrics(result: dict, method: str = DEFAULT_METHOD) -> dict[str, float] | None:
    """metadata.json's ``eval_metrics`` from a comparison `result` (``results/comparison.json``): `method`'s mean Dice
    (CSF/GM/WM, vs the ground-truth labels), PSNR (dB) and SSIM on the main test block, rounded as in the docs table.

    None when `method` is not among the result's methods (a run with ``--methods`` that left it out).
    """
    row = result.get("methods", {}).get(method)
    if row is None:
        return None
    return {
        "mean_dice": round(row["dice"]["mean"], 3),
        "psnr": round(row["psnr"]["mean"], 2),
        "ssim": round(row["ssim"]["mean"], 3),
    }


def update_metadata(result: dict, path: Path = METADATA, method: str = DEFAULT_METHOD) -> dict[str, float] | None:
    """Write :func:`eval_metrics` of `result` into the metadata file `path` (the Model Zoo's JSON style: 4-space
    indent, final newline, key order kept); leaves the file alone and returns None when `method` was not run."""
    metrics = eval_metrics(result, method)
    if metrics is None:
        print(f"{portable(path)} not updated: the comparison did not run the default method '{method}'")
        return None
    metadata = json.loads(Path(path).read_text())
    metadata["eval_metrics"] = metrics
    write_text_atomic(path, json.dumps(metadata, indent=4, ensure_ascii=False) + "\n")
    print(f"updated eval_metrics of {portable(path)}: {metrics}")
    return metrics


# ---------------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=BUNDLE_ROOT / "data" / "labelmaps")
    parser.add_argument("--slices", type=int, default=40)
    shipped = json.loads(INFERENCE_CONFIG.read_text())  # the shipped sampling settings
    sdedit = json.loads((BUNDLE_ROOT / "configs" / "methods" / "sdedit.json").read_text())
    stylegan = json.loads((BUNDLE_ROOT / "configs" / "methods" / "stylegan.json").read_text())
    parser.add_argument(
        "--steps", type=int, default=None, help="DDIM steps of every diffusion method (default: each its own count)"
    )
    parser.add_argument("--stylegan-steps", type=int, default=stylegan["stylegan_steps"])
    parser.add_argument("--sdedit-start", type=int, default=sdedit["sdedit_start"])
    parser.add_argument("--num-samples", type=int, default=shipped["num_samples"], help="samples averaged per slice")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--blocks", default="t2,physics2,brainweb", help="extra blocks to run ('' for none)")
    parser.add_argument("--block-methods", default=None, help="methods of the extra blocks (default: --methods)")
    parser.add_argument("--block-slices", type=int, default=None, help="slices of the t2/physics2 blocks")
    parser.add_argument("--t2-dataset", type=Path, default=None, help="dataset of the t2 block (default: --dataset)")
    parser.add_argument("--physics2-dataset", type=Path, default=BUNDLE_ROOT / "data" / "labelmaps_physics2")
    parser.add_argument("--real-fixtures", type=Path, default=REAL_FIXTURES)
    parser.add_argument("--budgets", type=Path, default=BUDGETS, help="training budgets of the learned methods")
    parser.add_argument("--output", type=Path, default=BUNDLE_ROOT / "results" / "comparison")
    parser.add_argument("--figure", type=Path, default=BUNDLE_ROOT / "docs" / "images" / "comparison.png")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="CI smoke run: the demo slices, few steps; the extra blocks with `lmi` only on 2 slices",
    )
    parser.add_argument(
        "--update-docs",
        action="store_true",
        help="write the table into docs/README.md and the default method's scores into configs/metadata.json",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.dataset, args.slices, args.steps, args.stylegan_steps = BUNDLE_ROOT / "demo", 4, 2, 3
        args.block_methods = args.block_methods or "lmi"
        args.block_slices = args.block_slices or 2
    # absolute from here on: the evaluations run from the bundle root, whatever the caller's working directory
    for key in ("dataset", "t2_dataset", "physics2_dataset", "real_fixtures", "budgets"):
        if getattr(args, key) is not None:
            setattr(args, key, getattr(args, key).resolve())
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    block_methods = [m.strip() for m in (args.block_methods or args.methods).split(",") if m.strip()]
    blocks = [b.strip() for b in args.blocks.split(",") if b.strip()]
    unknown = [m for m in methods + block_methods if m not in METHOD_LABELS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {sorted(METHOD_LABELS)}")
    if [b for b in blocks if b not in BLOCK_TITLES]:
        raise SystemExit(f"unknown block(s) in '{args.blocks}'; choose from {sorted(BLOCK_TITLES)}")
    if not (args.dataset / "datalist.json").is_file():
        raise SystemExit(f"no datalist.json under {args.dataset}: prepare it with configs/prepare.json")
    block_slices = args.block_slices or args.slices
    budgets = training_budgets(args.budgets)

    with tempfile.TemporaryDirectory(prefix="compare-") as tmp:
        run_dir = Path(tmp)
        raws, commands = {}, []
        for method in methods:
            raws[method], command = run_method(method, args, run_dir / "main", args.dataset, args.slices)
            commands.append(command)
        first = raws[methods[0]]
        rows = {m: summarise(m, raws[m], args) for m in methods}
        for method, row in rows.items():
            row["training"] = budgets.get(method)
        result = {
            "command": "python " + shlex.join([portable(__file__), *portable_argv(argv or sys.argv[1:])]),
            "commands": commands,
            "machine": f"{platform.machine()} {os.cpu_count()} CPU cores, {platform.system()}",
            "dataset_name": dataset_name(args.dataset),
            "num_slices": len(first["psnr_cases"]),
            "cases": relative_cases(first["psnr_cases"], args.dataset),
            "seed": args.seed,
            "protocol": PROTOCOL,
            "oracle_dice": first["oracle_dice"]["mean"],
            "methods": rows,
            "training_budgets": budgets,
            "blocks": {},
        }

        real_dir = None
        for name in blocks:
            block, skipped = None, None
            if name == "t2":
                dataset = args.t2_dataset or args.dataset
                if not (dataset / "datalist.json").is_file():
                    skipped = f"no datalist.json under {portable(dataset)}"
                elif not has_source_key(dataset, "t2"):
                    skipped = f"the testing entries of {portable(dataset)} have no 't2' key"
                else:
                    block, extra = run_block(name, block_methods, args, run_dir, dataset, block_slices, "t2")
            elif name == "physics2":
                dataset = args.physics2_dataset
                if not (dataset / "datalist.json").is_file():
                    skipped = (
                        f"{portable(dataset)} has no datalist.json "
                        "(prepare it with configs/prepare_second_physics.json)"
                    )
                else:
                    block, extra = run_block(name, block_methods, args, run_dir, dataset, block_slices)
            elif name == "brainweb":
                missing = [f for f in BRAINWEB_FILES if not (args.real_fixtures / f).is_file()]
                if missing:
                    skipped = f"{', '.join(missing)} not found under {portable(args.real_fixtures)}"
                else:
                    block, extra, real_dir = run_brainweb_block(block_methods, args, run_dir, args.real_fixtures)
            if skipped:
                print(f"[{name}] skipped: {skipped}", flush=True)
                result["blocks"][name] = {"title": BLOCK_TITLES[name], "skipped": skipped}
            else:
                result["blocks"][name] = block
                commands += extra
        table = markdown(result)
        print(table)
        write_text_atomic(args.output.with_suffix(".json"), json.dumps(result, indent=2))
        write_text_atomic(args.output.with_suffix(".md"), "# Translation to T1w: comparison\n\n" + table + "\n")
        print(f"wrote {args.output.with_suffix('.md')} and .json")
        if args.figure:
            figure(result, run_dir, args.dataset, args.figure, real_dir=real_dir)
    if args.update_docs:
        update_docs(result, BUNDLE_ROOT / "docs" / "README.md")
        update_metadata(result)
    return result


if __name__ == "__main__":
    main()
