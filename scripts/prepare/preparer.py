"""The data preparation workflow: paired PDw / T1w / T2w 2D slices, tissue labels and masks of one source's subjects,
written atomically with a MONAI (Decathlon-style) datalist.

``DatasetPreparer`` owns everything a source does not: argument checks, the slice grid, the per-subject seeds, the
output layout and the datalist, and the guarded, staged write (``scripts.io.publishing``): a failed or terminated run
leaves nothing behind, and a folder is only replaced when this bundle wrote it. ``prepare_dataset`` is the entry point
of ``configs/prepare.json``.
"""

from __future__ import annotations

import functools
import json
import logging
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from scripts.io.publishing import check_replaceable, write_staged
from scripts.prepare.errors import DataPreparationError, one_line, refusal
from scripts.prepare.geometry import SliceGrid
from scripts.prepare.simulation import MRSimulator
from scripts.prepare.sources import MNISource, Source, SubjectSlices

logger = logging.getLogger(__name__)

__all__ = ["CLASS_NAMES", "DatasetPreparer", "prepare_dataset", "save_slice", "simulate_volume", "subject_rng"]

CLASS_NAMES = {0: "background", 1: "CSF", 2: "GM", 3: "WM"}


class DatasetPreparer:
    """Prepare one dataset (``run``) from one source.

    Output: ``dataset_dir/slices/<subject>/<subject>_slice-<k>_<kind>.nii.gz`` with kind ``PDw``, ``T1w``, ``T2w``
    (float32 >= 0, raw signal), ``dseg`` (uint8 tissue classes 0 background/non-brain, 1 CSF, 2 GM, 3 WM) and
    ``mask`` (uint8 brain mask, = dseg > 0; a head mask for sources without labels), and ``dataset_dir/datalist.json``:

    - ``training``: ``{"image": T1w, "subject", "slice"}`` of training subjects only (target modality only);
    - ``source_training``: ``{"image": PDw, "subject", "slice"}`` of training subjects (for baselines that may
      see some source data, e.g. CycleGAN);
    - ``testing``: ``{"image": PDw, "target": T1w, "t2": T2w, "label": dseg, "mask": mask, "subject", "slice"}``
      (``t2`` and ``label`` only where the source has them);
    - metadata: ``name``, ``description``, ``source``, ``source_modality`` ("PDw"), ``target_modality`` ("T1w"),
      ``spatial_size``, ``pixel_mm``, ``seed``, ``mask_type``, ``subjects`` {training, testing}, ``labels``.

    Paths are relative to ``dataset_dir`` (``monai.data.load_decathlon_datalist(path, data_list_key=...,
    base_dir=dataset_dir)``). ``slice`` is the index along the source volume's own axial array axis. Every slice is
    an axial plane of the source volume resampled in-plane to ``spatial_size`` pixels of ``fov_mm / max(size)`` mm
    centred on the brain (``scripts.prepare.geometry``). Bad input raises ``DataPreparationError`` (a ``ValueError``;
    ``InputNotFoundError`` is also a ``FileNotFoundError``) with one line naming the file or argument.

    Args:
        source: a name of `sources` (how ``configs/prepare.json`` picks one: ``--source mni|labelmaps|ixi``), or a
            ``Source`` object (``MNISource(...)``, ``LabelMapSource(...)``, ``IXISource(...)``).
        dataset_dir: output folder; must not exist unless ``overwrite``.
        seed: the whole dataset is a deterministic function of the inputs and this seed.
        spatial_size: output slice size (pixels).
        fov_mm: field of view of the larger side (pixel size = fov_mm / max(spatial_size)).
        slice_step_mm: distance between chosen axial slices.
        min_brain_fraction: keep slices whose brain area (head area for ixi) is at least this fraction of the
            subject's largest.
        max_slices_per_subject: evenly thin the chosen slices to at most this many (None: no limit).
        simulator: ``scripts.prepare.MRSimulator`` (or its keyword arguments).
        sources: name -> a ``Source``, or a callable that builds one (in the config: a ``_target_`` with ``_mode_``
            "callable"). Only the chosen one is built, on first use, so that its input checks end in one-line errors.
        overwrite: replace an existing ``dataset_dir``.
        name: dataset name in the datalist.
    """

    def __init__(
        self,
        source: str | Source,
        dataset_dir: str,
        seed: int = 0,
        spatial_size: Sequence[int] = (128, 128),
        fov_mm: float = 256.0,
        slice_step_mm: float = 2.0,
        min_brain_fraction: float = 0.3,
        max_slices_per_subject: int | None = None,
        simulator: MRSimulator | Mapping | None = None,
        sources: Mapping[str, Source | Callable[[], Source]] | None = None,
        overwrite: bool = False,
        name: str | None = None,
    ):
        # nothing is checked here (a config parser would bury the message): ``run`` checks everything first
        self.source_name = source if isinstance(source, str) else getattr(source, "name", type(source).__name__)
        self.dataset_dir = dataset_dir
        self.seed = seed
        self.spatial_size = spatial_size
        self.fov_mm = fov_mm
        self.slice_step_mm = slice_step_mm
        self.min_brain_fraction = min_brain_fraction
        self.max_slices_per_subject = max_slices_per_subject
        self.simulator = simulator
        self.sources = dict(sources or {})
        self.overwrite = bool(overwrite)
        self.name = name or f"brain_mri_zero_shot_translation-{self.source_name}"
        self._choice = source
        self._source: Source | None = None
        self._checked = False

    def check(self) -> None:
        """Check the arguments (not yet the input files); errors are one-line ``DataPreparationError``."""
        if self._checked:
            return
        if isinstance(self._choice, str):
            if self.source_name not in self.sources:
                raise DataPreparationError(f"source '{self.source_name}' is not one of: {', '.join(self.sources)}")
        elif not isinstance(self._choice, Source):
            raise DataPreparationError(f"source: expected a source name or a Source, got {type(self._choice).__name__}")
        if self.dataset_dir is None or str(self.dataset_dir) == "":
            raise DataPreparationError("dataset_dir: no output directory given")
        try:
            size = tuple(int(s) for s in self.spatial_size)
        except (TypeError, ValueError):
            size = ()
        if len(size) != 2 or min(size) < 8:
            raise DataPreparationError(f"spatial_size {self.spatial_size}: expected two sizes of at least 8 pixels")
        if not 0 <= float(self.min_brain_fraction) <= 1:
            raise DataPreparationError(f"min_brain_fraction {self.min_brain_fraction}: expected a value in [0, 1]")
        if float(self.fov_mm) <= 0 or float(self.slice_step_mm) <= 0:
            raise DataPreparationError(f"fov_mm {self.fov_mm} / slice_step_mm {self.slice_step_mm}: must be positive")
        self.dataset_dir = Path(self.dataset_dir)
        self.seed = int(self.seed)
        self.grid = SliceGrid(size, float(self.fov_mm) / max(size))
        self.slice_step_mm = float(self.slice_step_mm)
        self.min_brain_fraction = float(self.min_brain_fraction)
        if self.max_slices_per_subject is not None:
            self.max_slices_per_subject = int(self.max_slices_per_subject)
        if self.simulator is None or isinstance(self.simulator, Mapping):
            try:
                self.simulator = MRSimulator(**dict(self.simulator or {}))
            except (TypeError, ValueError) as exc:
                raise DataPreparationError(f"simulator: {exc}") from exc
        self._checked = True

    @property
    def source(self) -> Source:
        """The source object (built, and its inputs checked, on first use)."""
        if self._source is None:
            self.check()
            self._source = self._choice if isinstance(self._choice, Source) else self._build(self.sources[self._choice])
        return self._source

    def _build(self, definition: Source | Callable[[], Source]) -> Source:
        if isinstance(definition, Source):
            return definition
        if not callable(definition):
            raise DataPreparationError(
                f"source '{self.source_name}': expected a Source or a callable that builds one (a _target_ with "
                f"_mode_ 'callable'), got {type(definition).__name__}"
            )
        try:
            source = definition()
        except TypeError as exc:
            raise DataPreparationError(f"{self.source_name} options: {exc}") from exc
        if not isinstance(source, Source):
            raise DataPreparationError(f"source '{self.source_name}': {type(source).__name__} is not a Source")
        return source

    def rng(self, subject: str) -> np.random.Generator:
        return subject_rng(self.seed, subject)

    def run(self) -> Path:
        """Write the dataset atomically; returns ``dataset_dir``.

        An existing ``dataset_dir`` is only replaced when it is empty or holds nothing but a dataset this bundle
        wrote (and then only with ``overwrite``); anything else is refused and left unchanged.
        """
        self.check()
        out = self.dataset_dir
        check_replaceable(out, "dataset", refusal("dataset_dir", out))
        if out.is_dir() and any(out.iterdir()) and not self.overwrite:
            raise DataPreparationError(f"dataset_dir {out}: already exists (set overwrite to true to replace it)")
        source = self.source  # checks the inputs before anything is written
        split = source.subjects()
        both = set(split["training"]) & set(split["testing"])
        if both:
            raise DataPreparationError(f"{self.source_name}: subjects {sorted(both)} are in both splits")
        result = {}

        def write(staging: Path) -> None:
            result["datalist"] = self._write(staging, source, split)
            with open(staging / "datalist.json", "w") as f:
                json.dump(result["datalist"], f, indent=2)

        write_staged(out, "dataset", write, refusal("dataset_dir", out))
        n = {k: len(result["datalist"][k]) for k in ("training", "source_training", "testing")}
        logger.info("wrote %s: %s", out, ", ".join(f"{v} {k}" for k, v in n.items()))
        return out

    def _write(self, root: Path, source: Source, split: dict[str, list[str]]) -> dict:
        entries: dict[str, list[dict]] = {"training": [], "source_training": [], "testing": []}
        subjects = [(s, "training") for s in split["training"]] + [(s, "testing") for s in split["testing"]]
        for subject, part in tqdm(subjects, desc=f"prepare {self.source_name}", unit="subject"):
            result = source.prepare(subject, self)
            if not result.indices:
                logger.warning("%s: no slice with enough brain/head, subject left out", subject)
                continue
            for e in self._write_subject(root, result):
                if part == "training":
                    entries["training"].append({"image": e["T1w"], "subject": subject, "slice": e["slice"]})
                    entries["source_training"].append({"image": e["PDw"], "subject": subject, "slice": e["slice"]})
                else:
                    item = {"image": e["PDw"], "target": e["T1w"]}
                    if "T2w" in e:
                        item["t2"] = e["T2w"]
                    if "dseg" in e:
                        item["label"] = e["dseg"]
                    item.update({"mask": e["mask"], "subject": subject, "slice": e["slice"]})
                    entries["testing"].append(item)
            logger.info("%s (%s): %d slices", subject, part, len(result.indices))
        return {
            "name": self.name,
            "description": (
                f"Paired 2D axial brain MR slices (PDw source, T1w target, T2w) from the '{self.source_name}' "
                "source; 'training' holds target (T1w) images of training subjects only, 'source_training' their "
                "PDw slices, 'testing' paired slices of the test subjects."
            ),
            "source": self.source_name,
            "source_modality": "PDw",
            "target_modality": "T1w",
            "spatial_size": list(self.grid.size),
            "pixel_mm": self.grid.pixel_mm,
            "seed": self.seed,
            "mask_type": source.mask_type,
            "subjects": {k: list(v) for k, v in split.items()},
            "labels": {str(k): v for k, v in CLASS_NAMES.items()},
            **entries,
        }

    @staticmethod
    def _write_subject(root: Path, result: SubjectSlices) -> list[dict]:
        folder = root / "slices" / result.subject
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for n, k in enumerate(result.indices):
            stem = f"{result.subject}_slice-{k:03d}"
            arrays = {c: img[n] for c, img in result.images.items()}
            if result.label is not None:
                arrays["dseg"] = result.label[n]
            arrays["mask"] = result.mask[n]
            row = {"slice": int(k)}
            for kind, arr in arrays.items():
                rel = f"slices/{result.subject}/{stem}_{kind}.nii.gz"
                save_slice(root / rel, arr, result.affines[n])
                row[kind] = rel
            rows.append(row)
        return rows


def prepare_dataset(preparer: DatasetPreparer) -> Path:
    """Entry point of ``configs/prepare.json``: ``preparer.run()``, with bad input reported as one line.

    A ``DataPreparationError`` is logged and turned into ``SystemExit`` with its message (exit status 1, no
    traceback: the message names the file or argument and the problem); other errors propagate unchanged. SIGTERM
    also ends in ``SystemExit`` after the staging folder is removed. Call ``DatasetPreparer.run`` directly to get
    the exception instead.
    """
    return one_line("data preparation", preparer.run)


def save_slice(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    """Write a 2D slice as NIfTI with its 4x4 world affine (sform and qform, mm)."""
    img = nib.Nifti1Image(np.ascontiguousarray(array), affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))


def subject_rng(seed: int, subject: str) -> np.random.Generator:
    """Per-subject generator: depends only on the seed and the subject id (not on the other subjects)."""
    return np.random.default_rng([int(seed), zlib.crc32(subject.encode())])


def simulate_volume(
    voxel_mm: float = 4.0,
    size: int = 48,
    subject: str = "sub-01",
    seed: int = 0,
    simulator: MRSimulator | Mapping | None = None,
    mni: Mapping | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """A small 3D simulated head (``mni`` pseudo-subject) with isotropic ``voxel_mm`` voxels.

    Stacks every axial slice of a ``size x size`` grid (``size * voxel_mm`` mm field of view) that holds brain.
    Returns ({contrast: (size, size, n) float32}, 4x4 RAS affine, tissue labels (size, size, n) uint8).
    Used to make synthetic registration problems (and handy for quick 3D experiments).
    """
    preparer = DatasetPreparer(
        "mni",
        dataset_dir="unused",
        seed=seed,
        spatial_size=(size, size),
        fov_mm=size * voxel_mm,
        slice_step_mm=voxel_mm,
        min_brain_fraction=0.0,
        simulator=simulator,
        sources={"mni": functools.partial(MNISource, **dict(mni or {}))},
    )
    result = preparer.source.prepare(subject, preparer)
    affine = result.affines[0].copy()
    affine[:3, 2] = result.affines[1][:3, 3] - result.affines[0][:3, 3]
    images = {c: np.ascontiguousarray(np.moveaxis(v, 0, -1)) for c, v in result.images.items()}
    return images, affine, np.ascontiguousarray(np.moveaxis(result.label, 0, -1))
