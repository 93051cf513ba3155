"""The example figure of prepared datasets (``docs/images/simulated_examples.png``): PDw, T1w, T2w and tissue labels of
a few test slices, drawn by ``benchmarks/bench_prepare.py --figure`` to show what the simulator produces."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = ["save_examples_figure"]


def save_examples_figure(
    out_path: str | os.PathLike,
    datasets: Mapping[str, str | os.PathLike],
    rows_per_dataset: Mapping[str, int] | None = None,
    split: str = "testing",
) -> Path:
    """Plot PDw, T1w, T2w and tissue labels of a few slices from several subjects of written datasets.

    Args:
        out_path: PNG to write.
        datasets: title -> dataset_dir (written by ``DatasetPreparer``).
        rows_per_dataset: title -> number of rows (slices; each row a different subject where possible).
        split: "testing" (paired entries with labels) is the split that has every image.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    rows = []
    for title, ddir in datasets.items():
        ddir = Path(ddir)
        with open(ddir / "datalist.json") as f:
            dl = json.load(f)
        items = dl[split]
        n_rows = (rows_per_dataset or {}).get(title, 2)
        by_subject: dict[str, list[dict]] = {}
        for it in items:
            by_subject.setdefault(it["subject"], []).append(it)
        subj = sorted(by_subject)
        for r in range(n_rows):
            its = by_subject[subj[r % len(subj)]]
            frac = (0.35, 0.6, 0.8, 0.5, 0.7)[r % 5]
            it = its[int(frac * (len(its) - 1))]
            rows.append((title, it, ddir))
    cmap = ListedColormap([[0, 0, 0], [0.2, 0.4, 1.0], [0.6, 0.6, 0.6], [1.0, 1.0, 0.85]])
    fig, axes = plt.subplots(len(rows), 4, figsize=(8, 2.1 * len(rows)), squeeze=False)
    for r, (title, it, ddir) in enumerate(rows):
        for c, (key, name) in enumerate((("image", "PDw"), ("target", "T1w"), ("t2", "T2w"), ("label", "labels"))):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if key not in it:
                ax.set_facecolor("k")
                continue
            a = np.asarray(nib.load(str(ddir / it[key])).dataobj)
            img = np.rot90(a)  # canonical RAS array -> anterior up, subject's right on the right
            if key == "label":
                ax.imshow(img, cmap=cmap, vmin=0, vmax=3, interpolation="nearest")
            else:
                ax.imshow(img, cmap="gray", vmin=0, vmax=float(np.percentile(a, 99.5)), interpolation="nearest")
            if r == 0:
                ax.set_title(name, fontsize=10)
            if c == 0:
                ax.set_ylabel(f"{title}\n{it['subject']} z{it['slice']}", fontsize=8)
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=80)
    plt.close(fig)
    return out_path
