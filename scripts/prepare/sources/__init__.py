"""Where prepared subjects come from: one ``Source`` per kind of input, chosen in ``configs/prepare.json`` by
``_target_`` (``--source mni|labelmaps|ixi`` picks one of the config's ``sources``).

- ``MNISource`` (``mni``, offline default): pseudo-subjects from the MNI152 template in the nilearn wheel;
- ``LabelMapSource`` (``labelmaps``): FreeSurfer-convention label maps simulated with partial volume;
- ``IXISource`` (``ixi``): real IXI PD / T1 (/ T2) volumes, T1 registered to PD.

A new kind of input is a new ``Source`` subclass and a ``_target_`` entry in the config; nothing else changes.
"""

from scripts.prepare.sources.base import Source, SubjectSlices
from scripts.prepare.sources.ixi import IXI_QUALITY, IXISource, volume_head_mask
from scripts.prepare.sources.labelmaps import FREESURFER_LABELS, MIXTURES, LabelMapSource
from scripts.prepare.sources.mni import MNI_HEAD_LAYERS, MNI_SKULL_BASE, MNISource

__all__ = [
    "FREESURFER_LABELS",
    "IXI_QUALITY",
    "IXISource",
    "LabelMapSource",
    "MIXTURES",
    "MNI_HEAD_LAYERS",
    "MNI_SKULL_BASE",
    "MNISource",
    "Source",
    "SubjectSlices",
    "volume_head_mask",
]
