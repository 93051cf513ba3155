"""Speed and peak memory of the LMI operator (``scripts/lmidiffusion/lmi.py``) against a plain per-pair implementation.

For K = 8, 16, 27 bins, 128 x 128 and 256 x 256 images, batch 1 and 8, forward and forward + backward (gradient
with respect to ``y``, the guidance-energy use), it times the accelerated layer and the plain one in the same run
and prints a table plus the speed ratio; results go to ``benchmarks/results/lmi.json``.

How it measures:
- every configuration runs in a fresh subprocess (so that peak memory is per configuration);
- time: wall-clock milliseconds per call, median of the repeats after one warm-up call (the plain version at
  batch 8 or 256 x 256 is sampled with one call and no warm-up); CPU time per call is recorded too, because the
  2-core machine is shared and wall time then depends on the other load (the 1-minute load average is recorded);
- memory on CPU: increase of the process's peak resident set size (``resource.getrusage`` ``ru_maxrss``) during
  the first call, over the RSS after imports and input creation, i.e. everything the call itself allocated at
  its peak (torch tensors are invisible to ``tracemalloc``); on CUDA, ``torch.cuda.max_memory_allocated`` minus
  the memory allocated before the call;
- inputs: a synthetic head phantom with PD-like (s) and T1-like (y) contrasts and 2 % noise ("phantom"); the
  accelerated layer is also run with y = uniform noise ("noise", like an early diffusion sample), its worst case
  because no patch then fits a narrow bin window;
- threads: the full grid runs with 1 torch intra-op thread (``--threads``, first value), which is what the
  2-core machine, shared with other jobs, measures reproducibly; the second value (default 2) repeats the
  accelerated rows and the plain 128 x 128 batch-1 rows. With 2 threads the plain version's OpenMP barriers
  stall whenever the other jobs hold a core (wall time several times its CPU time); the accelerated layer runs
  its chunks on its own threads, one intra-op thread each (see ``scripts/lmidiffusion/lmi.py``);
- the plain forward processes one image at a time (its per-shift K x K tensors would otherwise need
  B*H*W*K^2 floats at once); plain forward + backward keeps every image's graph, and configurations whose
  estimated graph exceeds 3 GB are skipped (reported as skipped).

    python benchmarks/bench_lmi.py [--quick] [--device cuda] [--threads 1,2] [--output benchmarks/results/lmi.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = BUNDLE_ROOT / "benchmarks" / "results" / "lmi.json"
QUICK_OUTPUT = BUNDLE_ROOT / "benchmarks" / "results" / "lmi_quick.json"
PLAIN_GRAPH_LIMIT_BYTES = 3 << 30
TARGETS = {
    "K8_speedup_min": 3.0,
    "K8_forward_128_batch1_ms_max": 80.0,
    "K27_speedup_min": 1.0,
    "batch8_256_peak_mb_max": 1024.0,
}


# ----------------------------------------------------------------------------------------------------------------
# the plain implementation: every patch pair gets its own K x K histogram


def plain_lmi(s, y, patch_size=3, search_size=3, num_bins=27, sigma=8 / 255):
    """LMI straight from the definition, vectorised over pixels, one image at a time, r*r shifts in a loop."""
    import torch
    import torch.nn.functional as F

    eps = 1e-10
    p, r = patch_size, search_size
    a, h = p // 2, r // 2
    B, _, H, W = s.shape
    centres = torch.linspace(0.0, 1.0, num_bins, device=s.device, dtype=s.dtype)

    def entropy(hist):
        prob = hist / (hist.sum(-1, keepdim=True) + eps)
        return -(prob * torch.log2(prob + eps)).sum(-1)

    rows = torch.arange(H, device=s.device)[:, None].expand(H, W).reshape(-1)
    cols = torch.arange(W, device=s.device)[None, :].expand(H, W).reshape(-1)
    lmis, aligned_all = [], []
    for b in range(B):
        ps = F.unfold(s[b : b + 1], p, padding=a)[0].t()  # HW, P
        ws = torch.exp(-0.5 * ((ps.unsqueeze(-1) - centres) / sigma) ** 2)  # HW, P, K
        hs = entropy(ws.sum(1))
        y_pad = F.pad(y[b : b + 1], (h, h, h, h))
        py = F.unfold(y_pad, p, padding=a)[0].t().reshape(H + 2 * h, W + 2 * h, p * p)
        best = torch.full((H * W,), -math.inf, device=s.device, dtype=s.dtype)
        aligned = torch.zeros(H * W, device=s.device, dtype=s.dtype)
        for dy in range(-h, h + 1):
            for dx in range(-h, h + 1):
                cand = py[h + dy : h + dy + H, h + dx : h + dx + W].reshape(H * W, p * p)
                wy = torch.exp(-0.5 * ((cand.unsqueeze(-1) - centres) / sigma) ** 2)
                hy = entropy(wy.sum(1))
                joint = torch.bmm(ws.transpose(1, 2), wy).flatten(1)  # HW, K*K: one histogram per pair
                nmi = 2.0 * (hs + hy - entropy(joint)) / (hs + hy + eps)
                inside = (rows + dy >= 0) & (rows + dy < H) & (cols + dx >= 0) & (cols + dx < W)
                nmi = torch.where(inside, nmi, torch.full_like(nmi, -math.inf))
                better = nmi > best
                best = torch.where(better, nmi, best)
                value = y_pad[0, 0, h + dy : h + dy + H, h + dx : h + dx + W].reshape(-1)
                aligned = torch.where(better, value, aligned)
        lmis.append(best.reshape(1, 1, H, W))
        aligned_all.append(aligned.reshape(1, 1, H, W))
    return torch.cat(lmis), torch.cat(aligned_all)


# ----------------------------------------------------------------------------------------------------------------
# inputs


def phantom_pair(batch: int, size: int, device: str, noise_target: bool):
    """Head phantoms (ellipses: scalp, CSF, grey and white matter, ventricles) in PD-like and T1-like contrast."""
    import torch

    gen = torch.Generator().manual_seed(size * 31 + batch)
    sources, targets = [], []
    axis = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    for b in range(batch):
        ang = 0.2 * b
        xr = xx * math.cos(ang) - yy * math.sin(ang)
        yr = xx * math.sin(ang) + yy * math.cos(ang)
        radius = torch.hypot(yr / 0.9, xr / 0.75)
        labels = torch.zeros(size, size, dtype=torch.long)
        labels[radius < 0.95] = 1  # scalp
        labels[radius < 0.82] = 2  # CSF
        labels[radius < 0.78] = 3  # grey matter
        wavy = 0.62 + 0.06 * torch.sin(7 * torch.atan2(yr, xr))
        labels[radius < wavy] = 4  # white matter with a folded boundary
        labels[(torch.hypot(yr / 0.25, (xr.abs() - 0.12) / 0.08) < 1)] = 2  # ventricles
        pd = torch.tensor([0.0, 0.75, 1.0, 0.85, 0.7])[labels]
        t1 = torch.tensor([0.0, 0.9, 0.15, 0.5, 0.8])[labels]
        bias = 1 + 0.1 * xr
        noise = 0.02 * torch.randn(2, size, size, generator=gen)
        sources.append((pd * bias + noise[0]).clamp(0, 1))
        targets.append((t1 * bias + noise[1]).clamp(0, 1))
    s = torch.stack(sources)[:, None]
    y = torch.rand(batch, 1, size, size, generator=gen) if noise_target else torch.stack(targets)[:, None]
    return s.to(device), y.to(device)


# ----------------------------------------------------------------------------------------------------------------
# one configuration (runs in its own process)


def run_worker(cfg: dict) -> dict:
    import torch

    sys.path.insert(0, str(BUNDLE_ROOT))
    from scripts.lmidiffusion.lmi import local_mutual_information

    device = cfg["device"]
    torch.set_num_threads(cfg["threads"])
    fn = local_mutual_information if cfg["impl"] == "accelerated" else plain_lmi
    s, y = phantom_pair(cfg["batch"], cfg["size"], device, cfg["input"] == "noise")
    backward = cfg["mode"] == "forward+backward"

    def call():
        if backward:
            yg = y.clone().requires_grad_(True)
            lmi, _ = fn(s, yg, num_bins=cfg["bins"])
            lmi.sum().backward()
        else:
            with torch.no_grad():
                fn(s, y, num_bins=cfg["bins"])
        if device == "cuda":
            torch.cuda.synchronize()

    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    base_rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    wall, cpu = [], []
    for i in range(cfg["calls"]):
        t0, c0 = time.perf_counter(), time.process_time()
        call()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        if i == 0:
            if device == "cuda":
                peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
            else:
                peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss_kb) / 1024
    timed = slice(1, None) if cfg["calls"] > 1 else slice(None)
    return {
        "ms": round(1000 * statistics.median(wall[timed]), 1),
        "cpu_ms": round(1000 * statistics.median(cpu[timed]), 1),
        "timed_calls": len(wall[timed]),
        "peak_mb": round(peak_mb, 1),
        "threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------------------------------------------------------
# driver


def plain_graph_bytes(batch: int, size: int, bins: int) -> int:
    """Rough size of the plain implementation's autograd graph: ~4 saved (H*W, K*K) float32 tensors per shift."""
    return batch * size * size * bins * bins * 9 * 4 * 4


def configurations(quick: bool, device: str, repeats: int, threads: list[int]) -> list[dict]:
    """The full grid at the first thread count; at the others, only 128 x 128 batch 1 (plain) and all accelerated."""
    bins = (8, 27) if quick else (8, 16, 27)
    sizes = (128,) if quick else (128, 256)
    configs = []
    for n_threads in threads:
        main = n_threads == threads[0]
        for k in bins:
            for size in sizes:
                for batch in (1, 8):
                    for mode in ("forward", "forward+backward"):
                        big = batch > 1 or size > 128
                        base = {"bins": k, "size": size, "batch": batch, "mode": mode, "device": device}
                        base["threads"] = n_threads
                        configs.append({**base, "impl": "accelerated", "input": "phantom", "calls": repeats + 1})
                        if mode == "forward" and main:
                            configs.append({**base, "impl": "accelerated", "input": "noise", "calls": repeats + 1})
                        if not main and big:
                            continue
                        plain = {**base, "impl": "plain", "input": "phantom", "calls": 1 if big else repeats + 1}
                        graph = plain_graph_bytes(batch, size, k)
                        if mode == "forward+backward" and graph > PLAIN_GRAPH_LIMIT_BYTES:
                            plain["skipped"] = f"plain graph ~{graph / 2**30:.0f} GB"
                        configs.append(plain)
    return configs


def run_config(cfg: dict) -> dict:
    if "skipped" in cfg:
        return dict(cfg)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(cfg)]
    proc = subprocess.run(cmd, cwd=BUNDLE_ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        return {**cfg, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return {**cfg, **json.loads(proc.stdout.strip().splitlines()[-1])}


def add_ratios(rows: list[dict]) -> None:
    def key(r):
        return r["bins"], r["size"], r["batch"], r["mode"], r["threads"]

    plain = {key(r): r for r in rows if r["impl"] == "plain" and "ms" in r}
    for r in rows:
        ref = plain.get(key(r))
        if r["impl"] == "accelerated" and ref is not None and "ms" in r:
            r["speedup_vs_plain"] = round(ref["ms"] / r["ms"], 2)
            r["cpu_speedup_vs_plain"] = round(ref["cpu_ms"] / r["cpu_ms"], 2)


def check_targets(rows: list[dict]) -> dict:
    """Targets per thread count (speed ratios against the plain version run with the same threads)."""
    out = {}
    for n_threads in sorted({r["threads"] for r in rows}):
        acc = [
            r
            for r in rows
            if r["impl"] == "accelerated" and r["input"] == "phantom" and r["threads"] == n_threads and "ms" in r
        ]
        k8 = [r["speedup_vs_plain"] for r in acc if r["bins"] == 8 and "speedup_vs_plain" in r]
        k27 = [r["speedup_vs_plain"] for r in acc if r["bins"] == 27 and "speedup_vs_plain" in r]
        fwd = [r["ms"] for r in acc if (r["bins"], r["size"], r["batch"], r["mode"]) == (8, 128, 1, "forward")]
        big = [r["peak_mb"] for r in acc if r["batch"] == 8 and r["size"] == 256]
        out[f"threads={n_threads}"] = {
            "K8_min_speedup": min(k8) if k8 else None,
            "K8_speedup_met": bool(k8) and min(k8) >= TARGETS["K8_speedup_min"],
            "K8_forward_128_batch1_ms": fwd[0] if fwd else None,
            "K8_forward_128_batch1_met": bool(fwd) and fwd[0] < TARGETS["K8_forward_128_batch1_ms_max"],
            "K27_min_speedup": min(k27) if k27 else None,
            "K27_never_slower_met": bool(k27) and min(k27) >= TARGETS["K27_speedup_min"],
            "batch8_256_max_peak_mb": max(big) if big else None,
            "batch8_256_peak_met": (max(big) < TARGETS["batch8_256_peak_mb_max"]) if big else None,
        }
    return out


def print_table(rows: list[dict]) -> None:
    head = f"{'thr':>3} {'impl':<12}{'input':<9}{'K':>3}{'size':>6}{'batch':>6}  {'mode':<17}{'ms':>10}{'cpu ms':>10}"
    head += f"{'peak MB':>9}{'speedup':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        line = f"{r['threads']:>3} {r['impl']:<12}{r['input']:<9}{r['bins']:>3}{r['size']:>6}{r['batch']:>6}  "
        line += f"{r['mode']:<17}"
        if "skipped" in r or "error" in r:
            print(line + f"  {r.get('skipped') or r.get('error')}")
            continue
        speed = f"{r['speedup_vs_plain']:.1f}x" if "speedup_vs_plain" in r else ""
        print(line + f"{r['ms']:>10.1f}{r['cpu_ms']:>10.1f}{r['peak_mb']:>9.0f}{speed:>9}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=None, help=f"JSON results path (default {DEFAULT_OUTPUT.name})")
    parser.add_argument("--quick", action="store_true", help="K = 8 and 27, 128 x 128 only, 1 timed repeat")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=None, help="timed calls after the warm-up (default 3)")
    parser.add_argument(
        "--threads",
        default="1,2",
        help="torch intra-op thread counts, comma-separated; the full grid runs at the first (default 1,2)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return
    repeats = args.repeats or (1 if args.quick else 3)
    output = args.output or (QUICK_OUTPUT if args.quick else DEFAULT_OUTPUT)
    threads = [int(t) for t in args.threads.split(",")]
    configs = configurations(args.quick, args.device, repeats, threads)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    rows = []
    for i, cfg in enumerate(configs, 1):
        row = run_config(cfg)
        rows.append(row)
        status = row.get("skipped") or row.get("error") or f"{row['ms']} ms, {row['peak_mb']} MB"
        print(
            f"[{i}/{len(configs)}] threads={cfg['threads']} {cfg['impl']} {cfg['input']} K={cfg['bins']} "
            f"{cfg['size']}^2 b{cfg['batch']} {cfg['mode']}: {status}",
            flush=True,
        )
    add_ratios(rows)
    print()
    print_table(rows)
    targets = check_targets(rows)
    print()
    for name, value in targets.items():
        print(f"{name}: {value}")
    import torch

    result = {
        "benchmark": "LMI operator, accelerated (scripts/lmidiffusion/lmi.py) vs plain per-pair implementation",
        "command": "python benchmarks/bench_lmi.py"
        + (" --quick" if args.quick else "")
        + (f" --device {args.device}" if args.device != "cpu" else ""),
        "device": args.device,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_default_threads": torch.get_num_threads(),
        "threads_run": threads,
        "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
        "load_average_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "seconds_total": round(time.perf_counter() - start, 1),
        "timing": "wall ms per call, median over the timed calls after one warm-up call (plain at batch 8 or "
        "256x256: one call, no warm-up); cpu_ms is process CPU time per call (all threads)",
        "memory": "CPU: increase of peak RSS (getrusage ru_maxrss) during the first call, fresh process per row; "
        "CUDA: max_memory_allocated minus allocated before the call",
        "inputs": "phantom: synthetic head, PD-like s vs T1-like y, 2% noise; noise: y uniform noise",
        "targets": TARGETS,
        "target_check": targets,
        "rows": rows,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {output}")


if __name__ == "__main__":
    main()
