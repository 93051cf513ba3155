"""Time the data preparation workflow (``configs/prepare.json``) end to end, as a user runs it.

Runs ``python -m monai.bundle run --config_file configs/prepare.json --source <source> --dataset_dir <tmp>``
in a fresh process for the ``mni`` default (6 subjects; target < 60 s) and for ``labelmaps`` (all 16 SynthSeg
label maps of ../shared/data; target < 180 s), prints a table and writes ``benchmarks/results/prepare.json``.
With ``--figure PATH`` it also draws PDw/T1w/T2w/labels of test slices of both datasets
(``scripts.prepare.save_examples_figure``; the docs figure is ``docs/images/simulated_examples.png``).

    python benchmarks/bench_prepare.py [--figure docs/images/simulated_examples.png] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
TARGETS_S = {"mni": 60.0, "labelmaps": 180.0}


def run_source(source: str, dataset_dir: Path) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        "configs/prepare.json",
        "--source",
        source,
        "--dataset_dir",
        str(dataset_dir),
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=BUNDLE_ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    dl = json.loads((dataset_dir / "datalist.json").read_text())
    n_subjects = len(dl["subjects"]["training"]) + len(dl["subjects"]["testing"])
    n_slices = len(dl["training"]) + len(dl["testing"])
    return {
        "source": source,
        "seconds": round(seconds, 1),
        "target_seconds": TARGETS_S[source],
        "within_target": seconds < TARGETS_S[source],
        "subjects": n_subjects,
        "slices": n_slices,
        "files": sum(1 for _ in (dataset_dir / "slices").rglob("*.nii.gz")),
        "seconds_per_subject": round(seconds / n_subjects, 2),
        "command": " ".join(["python"] + cmd[1:6] + ["--source", source]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", nargs="+", default=["mni", "labelmaps"], choices=sorted(TARGETS_S))
    parser.add_argument("--figure", type=Path, default=None, help="also write the examples figure here")
    parser.add_argument("--keep", type=Path, default=None, help="keep the datasets in this folder")
    parser.add_argument("--out", type=Path, default=BUNDLE_ROOT / "benchmarks" / "results" / "prepare.json")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_prepare_")) if args.keep is None else args.keep
    work.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for source in args.sources:
            target = work / source
            if target.exists():
                shutil.rmtree(target)
            results.append(run_source(source, target))
            r = results[-1]
            print(f"{source}: {r['seconds']} s for {r['subjects']} subjects, {r['slices']} slices", flush=True)
        if args.figure is not None:
            sys.path.insert(0, str(BUNDLE_ROOT))
            from scripts.prepare import save_examples_figure

            datasets = {s: work / s for s in ("labelmaps", "mni") if s in args.sources}
            rows = {"labelmaps": 3, "mni": 1}
            save_examples_figure(args.figure, datasets, {k: rows[k] for k in datasets})
            print(f"figure: {args.figure}")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)

    header = f"{'source':<10} {'subjects':>8} {'slices':>7} {'files':>6} {'seconds':>8} {'s/subject':>9} {'target':>7}"
    print(header)
    print("-" * len(header))
    for r in results:
        ok = "ok" if r["within_target"] else "SLOW"
        print(
            f"{r['source']:<10} {r['subjects']:>8} {r['slices']:>7} {r['files']:>6} {r['seconds']:>8.1f} "
            f"{r['seconds_per_subject']:>9.2f} {r['target_seconds']:>5.0f}s {ok}"
        )
    record = {
        "benchmark": "data preparation (configs/prepare.json), wall clock of a fresh process",
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
