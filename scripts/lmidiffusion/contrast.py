"""Target-only contrast randomisation: a T1w training image becomes a random-contrast reference of the same anatomy.

The translator is trained on target (T1w) images only. To make it translate *any* source contrast, each training
image ``x`` is turned into a reference ``r = f(x)`` by a random intensity map ``f`` (plus scanner effects applied by
MONAI transforms in the training config), and the denoiser learns to recover ``x`` from ``r``. At translation time the
source image (PDw, T2w, ...) is just one more contrast in the family of ``f``. No source-modality image is involved.

The map keeps tissue contrast informative (in the spirit of SynthSeg/SynthSR): its knots sit at the image's own tissue
intensities and each tissue is sent to a random level, in random order, at least ``min_separation`` away from every
other level. With a tissue label map (CSF 1, GM 2, WM 3, as the prepare workflow writes next to every slice) the knots
are the median intensities of CSF, GM and WM plus two clusters of the non-brain head (bone and fat/scalp); without one,
the clusters of a 1D k-means inside the head. Plain random knots, or k-means knots that fall between grey and white
matter, often send the two to nearly the same value, which teaches the network to ignore that contrast (what the
training campaign showed: docs/method.md, "What each measured choice bought"). Air maps to 0 (every MR contrast has
dark air), and a random gamma bends the map between knots.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform

from scripts.transforms import head_mask, robust_scale

__all__ = ["RandContrastRemapd", "intensity_clusters", "random_levels", "remap_intensities"]


def intensity_clusters(values: np.ndarray, num_clusters: int, iterations: int = 20) -> np.ndarray:
    """Sorted centres of a 1D k-means of `values` (Lloyd's algorithm started at evenly spaced quantiles)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("intensity_clusters needs at least one value.")
    centres = np.quantile(values, (np.arange(num_clusters) + 0.5) / num_clusters)
    for _ in range(iterations):
        nearest = np.argmin(np.abs(values[:, None] - centres[None]), axis=1)
        updated = np.array(
            [values[nearest == k].mean() if np.any(nearest == k) else centres[k] for k in range(num_clusters)]
        )
        if np.allclose(updated, centres, atol=1e-5):
            break
        centres = updated
    return np.sort(centres)


def random_levels(
    count: int, rng: np.random.RandomState, low: float = 0.08, high: float = 1.0, min_separation: float = 0.12
) -> np.ndarray:
    """`count` levels drawn uniformly in [low, high], in random order, pairwise at least `min_separation` apart."""
    if (count - 1) * min_separation > high - low:
        raise ValueError(f"cannot place {count} levels {min_separation} apart in [{low}, {high}].")
    for _ in range(1000):
        levels = rng.uniform(low, high, size=count)
        if count < 2 or np.min(np.diff(np.sort(levels))) >= min_separation:
            return levels
    # Rejection is rarely that unlucky; fall back to an evenly spread, shuffled set with a random offset.
    slack = (high - low) - (count - 1) * min_separation
    levels = low + rng.uniform(0, slack) + np.arange(count) * min_separation
    return rng.permutation(levels)


def remap_intensities(
    image: np.ndarray, knots: np.ndarray, levels: np.ndarray, gamma: float = 1.0, air: float = 0.05
) -> np.ndarray:
    """Piecewise-linear map through (0, 0), (a, 0) and (knots[i], levels[i]), flat beyond the last knot, then
    ``** gamma``; ``a = min(air, knots.min() / 2)`` keeps air and its noise dark whatever level the darkest tissue
    is sent to (a steep ramp from 0 would amplify the background noise many times)."""
    corner = min(float(air), float(np.min(knots)) / 2)
    xs = np.concatenate([[0.0, corner], knots])
    ys = np.concatenate([[0.0, 0.0], levels])
    order = np.argsort(xs, kind="stable")
    mapped = np.interp(np.clip(image, 0.0, None), xs[order], ys[order])
    return np.power(np.clip(mapped, 0.0, None), gamma).astype(np.float32)


class RandContrastRemapd(RandomizableTransform, MapTransform):
    """Write a random-contrast copy of `keys` under `reference_key` (training only; see the module docstring).

    Args:
        keys: the target-modality image(s), channel-first 2D, scaled to [0, 1].
        reference_key: where the reference goes; with several keys, ``<reference_key>_<key>``.
        label_key: a tissue label map (1 CSF, 2 GM, 3 WM) of the same grid, when the data has one.
        num_clusters: range (inclusive) of the number of k-means clusters that become knots without a label map.
        min_separation: smallest distance between the levels two clusters are sent to.
        gamma_range: range of the log-uniform gamma applied after the map.
        max_samples: head pixels used to find the clusters (a random subset keeps it fast).
        prob: probability of randomising; otherwise the reference is a copy of the image.
        tissue_orders: orders of the tissue labels from darkest to brightest that MR contrasts produce, e.g.
            ``[[1, 2, 3], [3, 2, 1], [1, 3, 2]]`` (T1w-like, PDw/T2w-like, FLAIR-like); with `order_prob` > 0 a
            reference follows one of them (chosen uniformly), otherwise the CSF/GM/WM levels come in random order.
            Needs a label map; the non-brain levels stay random.
        order_prob: probability that a reference with a label map follows one of `tissue_orders` (0: never, and no
            random number is drawn for it, so the default stream of references is unchanged).
    """

    def __init__(
        self,
        keys: KeysCollection,
        reference_key: str = "reference",
        label_key: str | None = "label",
        num_clusters: Sequence[int] = (3, 5),
        min_separation: float = 0.12,
        gamma_range: Sequence[float] = (0.7, 1.4),
        max_samples: int = 4000,
        prob: float = 1.0,
        tissue_orders: Sequence[Sequence[int]] = (),
        order_prob: float = 0.0,
    ) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        low, high = int(num_clusters[0]), int(num_clusters[1])
        if not 1 <= low <= high:
            raise ValueError(f"num_clusters must be a range 1 <= low <= high, got {num_clusters}.")
        if not 0 < gamma_range[0] <= gamma_range[1]:
            raise ValueError(f"gamma_range must be positive and ordered, got {gamma_range}.")
        orders = [tuple(int(k) for k in order) for order in tissue_orders]
        if any(sorted(order) != [1, 2, 3] for order in orders):
            raise ValueError(f"tissue_orders must be orders of the labels 1, 2, 3 (CSF, GM, WM), got {tissue_orders}.")
        if not 0.0 <= order_prob <= 1.0 or (order_prob > 0 and not orders):
            raise ValueError(f"order_prob must be in [0, 1] and needs tissue_orders, got {order_prob}.")
        self.tissue_orders = orders
        self.order_prob = float(order_prob)
        self.reference_key = reference_key
        self.label_key = label_key
        self.num_clusters = (low, high)
        self.min_separation = float(min_separation)
        self.gamma_range = (float(gamma_range[0]), float(gamma_range[1]))
        self.max_samples = int(max_samples)

    def _sample(self, values: np.ndarray) -> np.ndarray:
        return self.R.choice(values, self.max_samples, replace=False) if values.size > self.max_samples else values

    def knots(self, image: np.ndarray, label: np.ndarray | None = None) -> np.ndarray:
        """The tissue intensities of `image` that become the map's knots (see the module docstring)."""
        head = head_mask(image).astype(bool)
        if label is not None and np.count_nonzero(label) >= 50:
            knots = list(self._tissue_medians(image, label).values())
            outside = head & (label == 0)
            if np.count_nonzero(outside) >= 50:
                knots += intensity_clusters(self._sample(image[outside]), 2).tolist()
            merged: list[float] = []
            for knot in sorted(knots):  # two knots at nearly one intensity would make a near-vertical map
                if not merged or knot - merged[-1] > 0.02:
                    merged.append(knot)
            return np.asarray(merged)
        values = image[head] if head.any() else image.ravel()
        count = int(self.R.randint(self.num_clusters[0], self.num_clusters[1] + 1))
        return intensity_clusters(self._sample(values), count)

    def remap(self, image: np.ndarray, label: np.ndarray | None = None) -> np.ndarray:
        """One random-contrast version of a 2D [0, 1] image (uses this transform's random state)."""
        knots = self.knots(image, label)
        levels = random_levels(len(knots), self.R, min_separation=self.min_separation)
        if label is not None and self.order_prob > 0 and self.R.uniform() < self.order_prob:
            order = self.tissue_orders[self.R.randint(len(self.tissue_orders))]
            levels = self._ordered(levels, knots, image, label, order)
        gamma = float(np.exp(self.R.uniform(np.log(self.gamma_range[0]), np.log(self.gamma_range[1]))))
        return robust_scale(remap_intensities(image, knots, levels, gamma))

    @staticmethod
    def _tissue_medians(image: np.ndarray, label: np.ndarray) -> dict[int, float]:
        """{tissue: median intensity} of CSF (1), GM (2) and WM (3), for the tissues with at least 10 pixels."""
        return {k: float(np.median(image[label == k])) for k in (1, 2, 3) if np.count_nonzero(label == k) >= 10}

    def _ordered(
        self, levels: np.ndarray, knots: np.ndarray, image: np.ndarray, label: np.ndarray, order: tuple[int, ...]
    ) -> np.ndarray:
        """`levels` with those of the CSF, GM and WM knots swapped among themselves so that the tissues run from
        darkest to brightest in `order` (the levels stay the same set, so their separation is kept)."""
        medians = self._tissue_medians(image, label)
        index = {tissue: int(np.argmin(np.abs(knots - median))) for tissue, median in medians.items()}
        if len(set(index.values())) < len(index) or len(index) < 2:
            return levels  # merged or missing tissue knots: nothing to order
        present = [tissue for tissue in order if tissue in index]
        slots = [index[tissue] for tissue in present]
        ordered = levels.copy()
        ordered[slots] = np.sort(levels[slots])
        return ordered

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        for key in keys:
            self.randomize(None)
            image = torch.as_tensor(d[key])
            array = image.detach().cpu().float().numpy()
            if array.ndim != 3 or array.shape[0] != 1:
                raise ValueError(f"RandContrastRemapd expects a (1, H, W) image under '{key}', got {array.shape}.")
            label = d.get(self.label_key) if self.label_key else None
            if label is not None:
                label = np.rint(torch.as_tensor(label).detach().cpu().numpy().reshape(array.shape[1:]))
            reference = self.remap(array[0], label)[None] if self._do_transform else array.copy()
            out_key = self.reference_key if len(keys) == 1 else f"{self.reference_key}_{key}"
            d[out_key] = torch.from_numpy(np.ascontiguousarray(reference, dtype=np.float32))
        return d
