"""The downstream segmenter that only ever saw the target modality: K-means (k = 3) on T1w brain intensities.

Fitted on brain-voxel intensities of target training images (each scaled to [0, 1] by its 99.5th percentile), the
clusters are ordered by mean intensity and named CSF < GM < WM, as T1w contrast orders them (docs/method.md,
"Evaluation protocol").
It is stored as plain JSON (cluster centres, scaling, versions), never as a pickle, and applied by nearest centre, so
applying it needs neither scikit-learn nor trust in a binary file.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from sklearn.cluster import KMeans

from scripts.io import write_text_atomic

logger = logging.getLogger(__name__)

__all__ = ["KMeansTissueSegmenter", "TissueSegmentd", "fit_from_datalist", "fit_segmenter", "tissue_dice"]

FORMAT = "kmeans-tissue-segmenter/1"
CLASS_NAMES = ("CSF", "GM", "WM")


def tissue_dice(labels: np.ndarray, truth: np.ndarray) -> float:
    """Mean Dice over CSF/GM/WM (labels 1-3) of two label maps; 1 for a class empty in both, as MONAI's DiceMetric
    with ``ignore_empty=False`` scores it (for benchmarks that segment outside the evaluation workflow)."""
    scores = []
    for label in (1, 2, 3):
        x, y = labels == label, truth == label
        total = x.sum() + y.sum()
        scores.append(2.0 * (x & y).sum() / total if total else 1.0)
    return float(np.mean(scores))


class KMeansTissueSegmenter:
    """Nearest-centre tissue classifier: intensity in [0, 1] -> 1 CSF, 2 GM, 3 WM (0 outside the mask)."""

    def __init__(self, centres: Sequence[float], percentile: float = 99.5, metadata: dict | None = None) -> None:
        centres = [float(c) for c in centres]
        if len(centres) != 3 or not all(np.isfinite(centres)) or sorted(centres) != centres:
            raise ValueError(f"a tissue segmenter needs 3 finite centres in increasing order, got {centres}.")
        self.centres = np.asarray(centres, dtype=np.float64)
        self.percentile = float(percentile)
        self.metadata = dict(metadata or {})

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Labels 0-3 for a [0, 1] `image` inside `mask` (same shape)."""
        image = np.asarray(image, dtype=np.float64)
        mask = np.asarray(mask) > 0
        if image.shape != mask.shape:
            raise ValueError(f"image shape {image.shape} and mask shape {mask.shape} differ.")
        labels = np.zeros(image.shape, dtype=np.uint8)
        distance = np.abs(image[mask][:, None] - self.centres[None, :])
        labels[mask] = 1 + np.argmin(distance, axis=1)
        return labels

    def save(self, path: str | os.PathLike) -> None:
        content = {
            "format": FORMAT,
            "classes": {str(i + 1): name for i, name in enumerate(CLASS_NAMES)},
            "centres": self.centres.tolist(),
            "scaling": {"method": "divide by percentile, clip to [0, 1]", "percentile": self.percentile},
            "versions": {"scikit-learn": version("scikit-learn"), "numpy": version("numpy")},
            **({"fitted_on": self.metadata} if self.metadata else {}),
        }
        write_text_atomic(path, json.dumps(content, indent=2))

    @classmethod
    def load(cls, path: str | os.PathLike) -> KMeansTissueSegmenter:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"segmenter file not found: {path}")
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path}: not a valid segmenter file (not JSON: {error})") from error
        if not isinstance(content, dict) or content.get("format") != FORMAT:
            raise ValueError(f"{path}: not a valid segmenter file (expected format '{FORMAT}')")
        try:
            return cls(content["centres"], content["scaling"]["percentile"], content.get("fitted_on"))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}: malformed segmenter file ({error})") from error


def fit_segmenter(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    max_samples: int = 200_000,
    seed: int = 0,
    percentile: float = 99.5,
) -> KMeansTissueSegmenter:
    """Fit K-means (k = 3) on brain voxels of target-modality images (each scaled by its own `percentile`)."""
    if len(images) == 0 or len(images) != len(masks):
        raise ValueError(f"need as many masks as images (and at least one), got {len(images)} and {len(masks)}.")
    values = []
    for image, mask in zip(images, masks, strict=True):
        image = np.asarray(image, dtype=np.float64)
        top = max(float(np.percentile(image, percentile)), 1e-8)
        values.append(np.clip(image / top, 0.0, 1.0)[np.asarray(mask) > 0])
    samples = np.concatenate(values)
    if samples.size < 3:
        raise ValueError("the masks hold fewer than 3 voxels: nothing to cluster.")
    rng = np.random.default_rng(seed)
    if samples.size > max_samples:
        samples = rng.choice(samples, size=max_samples, replace=False)
    kmeans = KMeans(n_clusters=3, n_init=10, random_state=seed).fit(samples[:, None])
    centres = np.sort(kmeans.cluster_centers_[:, 0])
    logger.info(f"K-means tissue centres (CSF, GM, WM): {np.round(centres, 4).tolist()} from {samples.size} voxels")
    return KMeansTissueSegmenter(centres, percentile, {"num_images": len(images), "num_voxels": int(samples.size)})


class TissueSegmentd(MapTransform):
    """Dictionary transform: segment `keys` (channel-first [0, 1] images) inside `mask_key` into `<key>_seg`."""

    def __init__(
        self, keys: KeysCollection, segmenter: KMeansTissueSegmenter | str, mask_key: str = "mask", postfix="seg"
    ) -> None:
        super().__init__(keys)
        self.segmenter = (
            segmenter if isinstance(segmenter, KMeansTissueSegmenter) else KMeansTissueSegmenter.load(segmenter)
        )
        self.mask_key = mask_key
        self.postfix = postfix

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        mask = torch.as_tensor(d[self.mask_key]).detach().cpu().numpy()
        for key in self.key_iterator(d):
            image = d[key]
            array = torch.as_tensor(image).detach().cpu().numpy()
            if array.shape != mask.shape:
                raise ValueError(f"'{key}' shape {array.shape} and '{self.mask_key}' shape {mask.shape} differ.")
            labels = torch.from_numpy(self.segmenter(array, mask).astype(np.float32))
            d[f"{key}_{self.postfix}"] = (
                MetaTensor(labels, meta=dict(image.meta)) if isinstance(image, MetaTensor) else labels
            )
        return d


def _training_mask_path(entry: dict, base_dir: Path) -> Path:
    """The brain mask of a training slice: its `mask` key, else the prepare workflow's sibling `*_mask` file."""
    if "mask" in entry:
        return base_dir / entry["mask"]
    image = Path(entry["image"])
    name = image.name.replace("_T1w.", "_mask.")
    if name == image.name:
        raise ValueError(f"training entry {entry['image']} has no 'mask' key and no '_T1w.' name to derive one from.")
    return base_dir / image.parent / name


def fit_from_datalist(
    datalist: str | os.PathLike, dataset_dir: str | os.PathLike, output: str | os.PathLike, seed: int = 0
) -> KMeansTissueSegmenter:
    """Fit on the datalist's `training` (target-only) slices inside their brain masks and save the JSON."""
    import nibabel as nib

    base = Path(dataset_dir)
    entries = json.loads(Path(datalist).read_text()).get("training") or []
    if not entries:
        raise ValueError(f"{datalist}: no 'training' entries to fit the segmenter on.")
    images, masks = [], []
    for entry in entries:
        mask_path = _training_mask_path(entry, base)
        if not mask_path.is_file():
            raise FileNotFoundError(f"brain mask not found for training image {entry['image']}: {mask_path}")
        images.append(np.asarray(nib.load(str(base / entry["image"])).dataobj, dtype=np.float32))
        masks.append(np.asarray(nib.load(str(mask_path)).dataobj) > 0)
    segmenter = fit_segmenter(images, masks, seed=seed)
    segmenter.metadata["datalist"] = str(datalist)
    segmenter.save(output)
    logger.info(f"wrote {output}")
    return segmenter
