"""Know when not to trust a translation: the spread of several samples, per pixel and per slice.

The default translator draws ``num_samples`` translations of each slice with different noise and returns their mean
(``LMIGuidedInferer.translate``); their per-pixel standard deviation is the uncertainty map. Its mean inside the
source's head mask is the slice's uncertainty score. docs/README.md ("Uncertainty") says how well the score predicts
the error and what each sample costs.

- :class:`SampleStdd` puts the map (``pred_std``) and the score (``uncertainty``) into each output dict of an
  evaluator, from the inferer that translated the batch.
- :class:`UncertaintyScore` is the score as a MONAI metric, so ``IgniteMetricHandler``/``MetricsSaver`` record it
  per slice beside Dice and SSIM.
- :func:`through_plane_flicker` measures how much adjacent slices of a volume differ (0 for a constant volume).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.data import MetaTensor
from monai.metrics import CumulativeIterationMetric
from monai.transforms import MapTransform

from scripts.transforms import head_mask

__all__ = ["SampleStdd", "UncertaintyScore", "through_plane_flicker", "uncertainty_score"]


def uncertainty_score(std: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """Mean of `std` inside `head`, per image of a (B, 1, ...) batch (the whole image where the head mask is empty)."""
    std, head = torch.as_tensor(std).float().flatten(1), torch.as_tensor(head).float().flatten(1).to(std.device)
    inside = head.sum(1)
    masked = (std * head).sum(1) / inside.clamp(min=1.0)
    return torch.where(inside > 0, masked, std.mean(1))


def _head_of(source: np.ndarray, slice_axis: int) -> np.ndarray:
    """The head mask of a (1, H, W) slice or (1, X, Y, Z) volume, slice by slice along `slice_axis`."""
    image = source[0]
    if image.ndim == 2:
        return head_mask(image)[None]
    axis = slice_axis % 3
    slices = [head_mask(s) for s in np.moveaxis(image, axis, 0)]
    return np.moveaxis(np.stack(slices), 0, axis)[None]


class SampleStdd(MapTransform):
    """Add the inferer's sample spread to each decollated output: ``pred_std`` (the per-pixel standard deviation of
    the samples, with the prediction's meta data), ``head`` (the source's head mask) and ``uncertainty`` (the score).

    `inferer` is the object whose ``last_std`` holds the (B, 1, ...) spread of the batch just translated
    (``LMIGuidedInferer`` or ``SliceWiseInferer``); item i of the batch takes row i. A method that draws one sample
    has no spread: its map is zero and its score 0, or, with ``always=False``, the item is left as it is. For a
    volume, ``uncertainty_per_slice`` lists the score of each slice along `slice_axis` (all-zero source slices,
    which are not translated, score 0).
    """

    def __init__(
        self,
        keys: str = "pred",
        inferer=None,
        source_key: str = "image",
        std_key: str = "pred_std",
        score_key: str = "uncertainty",
        slice_axis: int = -1,
        always: bool = True,
    ) -> None:
        super().__init__(keys)
        self.always = always
        self.inferer = inferer
        self.source_key = source_key
        self.std_key = std_key
        self.score_key = score_key
        self.slice_axis = slice_axis
        self._batch: torch.Tensor | None = None
        self._row = 0

    def _next_row(self, like: torch.Tensor) -> torch.Tensor | None:
        spread = getattr(self.inferer, "last_std", None)
        if spread is None:
            return torch.zeros_like(torch.as_tensor(like), dtype=torch.float32) if self.always else None
        if spread is not self._batch:  # a new batch: its rows follow in order
            self._batch, self._row = spread, 0
        row = torch.as_tensor(spread[self._row]).float()
        self._row += 1
        return row

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            pred = d[key]
            std = self._next_row(pred)
            if std is None:
                continue
            std = std.to(torch.as_tensor(pred).device)
            if std.shape != pred.shape:
                raise ValueError(f"sample spread of shape {tuple(std.shape)} for a prediction of {tuple(pred.shape)}")
            meta = dict(pred.meta) if isinstance(pred, MetaTensor) else {}
            d[self.std_key] = MetaTensor(std, meta=meta) if meta else std
            source = np.asarray(torch.as_tensor(d[self.source_key]).detach().cpu().numpy(), dtype=np.float32)
            head = torch.from_numpy(_head_of(source, self.slice_axis).astype(np.float32))
            d["head"] = head
            d[self.score_key] = float(uncertainty_score(std[None], head[None])[0])
            if std.ndim == 4:  # a (1, X, Y, Z) volume: one score per slice as well
                axis = self.slice_axis % 3 + 1
                per_slice = uncertainty_score(std.movedim(axis, 0)[:, None], head.movedim(axis, 0)[:, None])
                d[f"{self.score_key}_per_slice"] = [round(float(v), 6) for v in per_slice]
        return d


class UncertaintyScore(CumulativeIterationMetric):
    """The uncertainty score (:func:`uncertainty_score`) as a MONAI metric: ``y_pred`` the spread map, ``y`` the head
    mask; one value per image, averaged by :meth:`aggregate`."""

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        if y is None:
            raise ValueError("UncertaintyScore needs the head mask as `y`.")
        return uncertainty_score(y_pred, y)[:, None]

    def aggregate(self) -> torch.Tensor:  # type: ignore[override]
        return self.get_buffer().float().mean()


def through_plane_flicker(volume: np.ndarray | torch.Tensor, slice_axis: int = -1, mask=None) -> float:
    """Mean absolute difference between adjacent slices of a 3D `volume` along `slice_axis` (inside `mask`, a
    boolean volume of the same shape, where given): how much a slice-by-slice translation flickers through the plane.
    Compare it with the same quantity of the real target volume."""
    array = np.asarray(volume, dtype=np.float64)
    if array.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {array.shape}")
    array = np.moveaxis(array, slice_axis, 0)
    difference = np.abs(np.diff(array, axis=0))
    if mask is None:
        return float(difference.mean()) if difference.size else 0.0
    inside = np.moveaxis(np.asarray(mask, dtype=bool), slice_axis, 0)
    both = inside[1:] & inside[:-1]
    return float(difference[both].mean()) if both.any() else 0.0
