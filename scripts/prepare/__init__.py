"""Data preparation: paired PDw / T1w / T2w 2D slices, tissue labels, masks and a MONAI datalist from one source of
subjects (``configs/prepare.json``; the demo input: ``configs/make_demo.json``).

- ``sources``: where subjects come from (``MNISource``, ``LabelMapSource``, ``IXISource``), chosen by ``_target_``;
- ``simulation``: the MR physics that turns tissue fractions into images; ``registration``: ITK T1 -> PD for IXI;
- ``geometry``: the axial slice grid shared by every source;
- ``preparer``: the workflow (``DatasetPreparer``, ``prepare_dataset``), written atomically;
- ``errors``: one-line errors for bad input; ``demo`` and ``figures``: the shipped demo input and docs figure.
"""

from scripts.prepare.demo import make_demo, make_demo_input
from scripts.prepare.errors import DataPreparationError, InputNotFoundError
from scripts.prepare.figures import save_examples_figure
from scripts.prepare.geometry import SliceGrid
from scripts.prepare.preparer import CLASS_NAMES, DatasetPreparer, prepare_dataset, simulate_volume
from scripts.prepare.registration import RegistrationError, register_rigid_affine
from scripts.prepare.simulation import MRSimulator
from scripts.prepare.sources import (
    FREESURFER_LABELS,
    IXI_QUALITY,
    IXISource,
    LabelMapSource,
    MNISource,
    Source,
    SubjectSlices,
)

__all__ = [
    "CLASS_NAMES",
    "FREESURFER_LABELS",
    "IXI_QUALITY",
    "DataPreparationError",
    "DatasetPreparer",
    "IXISource",
    "InputNotFoundError",
    "LabelMapSource",
    "MNISource",
    "MRSimulator",
    "RegistrationError",
    "SliceGrid",
    "Source",
    "SubjectSlices",
    "make_demo",
    "make_demo_input",
    "prepare_dataset",
    "register_rigid_affine",
    "save_examples_figure",
    "simulate_volume",
]
