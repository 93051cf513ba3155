"""Modality-independent preprocessing shared by training, inference and evaluation.

Everything here is computed the same way from any MR contrast, so feeding it to a model trained on T1w only stays
zero-shot: a robust [0, 1] intensity scaling and a head (foreground) mask from an automatic threshold.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, SpatialPad, Transform
from scipy import ndimage

logger = logging.getLogger(__name__)

__all__ = [
    "HeadMask",
    "HeadMaskd",
    "PadToSquareFieldOfViewd",
    "RobustScaled",
    "head_mask",
    "robust_scale",
    "square_field_of_view",
]


def robust_scale(image: np.ndarray | torch.Tensor, percentile: float = 99.5) -> np.ndarray | torch.Tensor:
    """Scale to [0, 1] by the image's own `percentile` (clipped): docs/method.md, "Evaluation protocol".

    A percentile rather than the maximum keeps a few hot voxels (Rician noise, vessels) from squashing the contrast.
    """
    if isinstance(image, torch.Tensor):
        top = torch.quantile(image.detach().float().flatten(), percentile / 100.0)
        return (image / top.clamp_min(1e-8)).clamp(0.0, 1.0)
    top = float(np.percentile(image, percentile))
    return np.clip(image / max(top, 1e-8), 0.0, 1.0).astype(np.float32)


def _otsu_threshold(values: np.ndarray, bins: int = 128) -> float:
    """Otsu's threshold: the split maximising the between-class variance of the intensity histogram."""
    hist, edges = np.histogram(values, bins=bins)
    centres = 0.5 * (edges[:-1] + edges[1:])
    weight0 = np.cumsum(hist)
    weight1 = weight0[-1] - weight0
    mean0 = np.cumsum(hist * centres) / np.maximum(weight0, 1)
    mean1 = (np.sum(hist * centres) - np.cumsum(hist * centres)) / np.maximum(weight1, 1)
    between = weight0 * weight1 * (mean0 - mean1) ** 2
    return float(centres[int(np.argmax(between))])


def head_mask(image: np.ndarray, fraction_of_otsu: float = 0.5) -> np.ndarray:
    """Head (foreground) mask of a 2D slice of any MR contrast.

    Threshold at a fraction of Otsu's threshold (air is dark in every contrast used here, while dark tissues such as
    CSF on T1w or bone must stay inside), keep the largest connected component, fill holes. Returns uint8 {0, 1}.
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise ValueError(f"head_mask expects a 2D slice, got shape {image.shape}.")
    if not np.any(image > 0):
        return np.zeros(image.shape, dtype=np.uint8)
    mask = image > fraction_of_otsu * _otsu_threshold(image[np.isfinite(image)])
    labels, count = ndimage.label(mask)
    if count > 1:
        sizes = ndimage.sum(mask, labels, index=np.arange(1, count + 1))
        mask = labels == (1 + int(np.argmax(sizes)))
    mask = ndimage.binary_closing(mask, iterations=2)
    return ndimage.binary_fill_holes(mask).astype(np.uint8)


class HeadMask(Transform):
    """Array transform: channel-first (1, H, W) image -> (1, H, W) float head mask with the image's meta."""

    backend = [MetaTensor.__name__]

    def __init__(self, fraction_of_otsu: float = 0.5) -> None:
        self.fraction_of_otsu = fraction_of_otsu

    def __call__(self, image: torch.Tensor | np.ndarray) -> torch.Tensor:
        array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        if array.ndim != 3 or array.shape[0] != 1:
            raise ValueError(f"HeadMask expects a channel-first single-channel 2D image (1, H, W), got {array.shape}.")
        mask = torch.from_numpy(head_mask(array[0], self.fraction_of_otsu)[None].astype(np.float32))
        if isinstance(image, MetaTensor):
            return MetaTensor(mask, meta=dict(image.meta), affine=image.affine)
        return mask


class HeadMaskd(MapTransform):
    """Dictionary version of :class:`HeadMask`: writes the mask of `keys` under `mask_key`."""

    def __init__(self, keys: KeysCollection, mask_key: str = "head", fraction_of_otsu: float = 0.5) -> None:
        super().__init__(keys)
        self.mask_key = mask_key
        self.transform = HeadMask(fraction_of_otsu)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.mask_key] = self.transform(d[key])
        return d


class RobustScaled(MapTransform):
    """Dictionary transform: scale `keys` to [0, 1] by each image's own 99.5th percentile (:func:`robust_scale`).

    The evaluation protocol applies it to the target and to every method's output, so that no method gains or loses
    PSNR/SSIM from a global intensity offset or gain.
    """

    def __init__(self, keys: KeysCollection, percentile: float = 99.5) -> None:
        super().__init__(keys)
        self.percentile = percentile

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = robust_scale(torch.as_tensor(d[key]).float(), self.percentile)
        return d


def square_field_of_view(shape: tuple[int, ...], spacing: tuple[float, ...]) -> tuple[int, ...]:
    """The in-plane grid that pads `shape` (pixels of `spacing` mm) to a physically square field of view.

    Resizing that grid to the model's square one keeps the head's aspect ratio, where resizing a 217 x 181 slice
    directly would squash it. Square isotropic slices come back unchanged.
    """
    side = max(n * float(s) for n, s in zip(shape, spacing, strict=True))
    return tuple(max(n, int(round(side / float(s)))) for n, s in zip(shape, spacing, strict=True))


def in_plane_spacing(image: torch.Tensor, axes: tuple[int, int] = (0, 1)) -> tuple[float, float]:
    """Pixel spacing (mm) of two spatial `axes` of a MetaTensor, from its affine; 1 mm without meta data."""
    affine = getattr(image, "affine", None)
    if affine is None:
        return (1.0, 1.0)
    affine = torch.as_tensor(affine, dtype=torch.float64)
    affine = affine[0] if affine.ndim == 3 else affine
    norms = torch.linalg.norm(affine[:-1, :-1], dim=0)
    return tuple(float(norms[a]) if a < norms.numel() and norms[a] > 0 else 1.0 for a in axes)


class PadToSquareFieldOfViewd(MapTransform):
    """Pad the 2D images of `keys` (channel-first) with zeros to the square field of view of the first key's
    geometry (:func:`square_field_of_view`), so that a following resize keeps the anatomy's aspect ratio."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        first = d[keys[0]]
        shape = tuple(first.shape[1:3])
        target = square_field_of_view(shape, in_plane_spacing(first))
        if target != shape:
            pad = SpatialPad(spatial_size=list(target) + [-1] * (first.ndim - 3), method="symmetric")
            for key in keys:
                d[key] = pad(d[key])
        return d
