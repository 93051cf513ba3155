"""Evaluation of a translation method against the ground truth, as ``configs/evaluate.json`` wires it.

A ``SupervisedEvaluator`` whose inferer is the method, the K-means tissue segmenter in postprocessing, and MONAI
metrics (SSIM, PSNR, Dice) saved by ``MetricsSaver`` (the protocol: docs/method.md, "Evaluation protocol"). This
package holds what MONAI does not have:

- :mod:`.segmenter`: the downstream segmenter that only ever saw the target modality (K-means on T1w).
- :mod:`.datalist`: the up-front check of an evaluation datalist.
- :mod:`.inferers`: the identity "method" (the untranslated source) and a per-slice timer.

The output folder is published by ``scripts.io.PublishOutputs`` only when the run has completed.
"""

from scripts.evaluation.datalist import EVALUATION_KEYS, NUM_TISSUE_LABELS, load_evaluation_datalist
from scripts.evaluation.inferers import IdentityInferer, TimedInferer
from scripts.evaluation.segmenter import (
    CLASS_NAMES,
    KMeansTissueSegmenter,
    TissueSegmentd,
    fit_from_datalist,
    fit_segmenter,
    tissue_dice,
)

__all__ = [
    "CLASS_NAMES",
    "EVALUATION_KEYS",
    "NUM_TISSUE_LABELS",
    "IdentityInferer",
    "KMeansTissueSegmenter",
    "TimedInferer",
    "TissueSegmentd",
    "fit_from_datalist",
    "fit_segmenter",
    "load_evaluation_datalist",
    "tissue_dice",
]
