"""Writing translated images and their datalist, each file atomically, so an interrupted run leaves no half-written
NIfTI or datalist behind.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from collections.abc import Hashable, Mapping
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.transforms import MapTransform

from scripts.io.atomic import write_bytes_atomic, write_text_atomic
from scripts.io.inputs import PATH_KEYS, InputError, nifti_stem

logger = logging.getLogger(__name__)


def _output_name(source: str, postfix: str, stems: Mapping[str, str] | None = None) -> str:
    stem = stems[source] if stems and source in stems else nifti_stem(source)
    return f"{stem}_{postfix}.nii.gz"


def _atomic_save(array: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header | None, path: Path) -> None:
    """Write a gzipped NIfTI through an unpredictable temporary name that no input pattern matches, then rename."""
    image = nib.Nifti1Image(array, affine, header=header)
    image.set_data_dtype(array.dtype)
    write_bytes_atomic(path, gzip.compress(image.to_bytes(), compresslevel=6))


class SaveTranslationd(MapTransform):
    """Write `keys` (the translated image, channel-first) as NIfTI with the source file's geometry.

    The output keeps the source file's affine, spacing and header (read back from the source file itself, so the
    geometry cannot drift through preprocessing), with float32 intensities in [0, 1]. Its name is the source's stem
    (or its entry in `stems`, see :func:`output_stems`) followed by `postfix`.
    """

    def __init__(
        self,
        keys: str = "pred",
        output_dir: str | os.PathLike = "outputs",
        postfix: str = "trans",
        enabled: bool = True,
        stems: Mapping[str, str] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_dir = Path(output_dir)
        self.postfix = postfix
        self.enabled = enabled
        self.stems = dict(stems or {})

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        if not self.enabled:  # lets a config keep the step in its pipeline and switch it with one override
            return d
        for key in self.key_iterator(d):
            pred = d[key]
            meta = pred.meta if isinstance(pred, MetaTensor) else {}
            source = str(meta.get("filename_or_obj", ""))
            if not source:
                raise InputError("the translated image carries no source file name; cannot name the output")
            reference = nib.load(source)
            array = np.asarray(torch.as_tensor(pred).detach().cpu().numpy()[0], dtype=np.float32)
            if array.size == int(np.prod(reference.shape)):
                array, affine, header = array.reshape(reference.shape), reference.affine, reference.header.copy()
            else:  # resampled by the pipeline (evaluation grid): keep the grid the pipeline's affine describes
                affine = np.asarray(pred.affine) if isinstance(pred, MetaTensor) else reference.affine
                header = None
            path = self.output_dir / _output_name(source, self.postfix, self.stems)
            _atomic_save(array, affine, header, path)
            d[f"{key}_path"] = str(path)
            logger.info(f"wrote {path}")
        return d


class TranslatedDatalistWriter:
    """Ignite handler: collect the written files and save ``datalist_translated.json`` when the run completes.

    The file is a Decathlon/Auto3DSeg datalist: ``{list_key: [{"image": ..., "source_image": ..., <the input
    entry's other keys, e.g. "label">}, ...]}``, plus ``uncertainty_image`` and the ``uncertainty`` score (and
    ``uncertainty_per_slice`` for a volume) when the translator drew several samples
    (``scripts.lmidiffusion.uncertainty``).
    Every path is relative to `output_dir`, so Auto3DSeg's ``DataAnalyzer``/``AutoRunner`` or a segmentation bundle
    takes it with ``dataroot=output_dir`` (``list_key="training"`` for Auto3DSeg, which trains on labelled entries).
    `entries` are the input entries (paths resolved, as :func:`source_datalist` returns them); `work_dir` is where the
    run writes before it is published as `output_dir` (see :class:`PublishOutputs`).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        key: str = "pred_path",
        modality: str = "T1w",
        list_key: str = "testing",
        entries: list[dict] | None = None,
        work_dir: str | os.PathLike | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.work_dir = Path(work_dir) if work_dir is not None else self.output_dir
        self.key = key
        self.modality = modality
        self.list_key = list_key
        self.inputs = {str(Path(e["image"])): e for e in entries or []}
        self.entries: list[dict] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: self.entries.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def _relative(self, path: str) -> str:
        return os.path.relpath(Path(path).resolve(), self.output_dir.resolve())

    def collect(self, engine: Engine) -> None:
        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        for item in outputs:
            if isinstance(item, Mapping) and self.key in item:
                image = item.get("image")
                source = str(image.meta.get("filename_or_obj", "")) if isinstance(image, MetaTensor) else ""
                entry = {
                    k: self._relative(v) if k in PATH_KEYS and isinstance(v, str) else v
                    for k, v in self.inputs.get(str(Path(source)), {}).items()
                }
                entry["image"] = str(Path(item[self.key]).relative_to(self.work_dir))
                if source:
                    entry["source_image"] = self._relative(source)
                if "pred_std_path" in item:  # the spread of the samples (scripts.lmidiffusion.uncertainty)
                    entry["uncertainty_image"] = str(Path(item["pred_std_path"]).relative_to(self.work_dir))
                for key in ("uncertainty", "uncertainty_per_slice"):
                    if key in item:
                        entry[key] = round(item[key], 6) if isinstance(item[key], float) else item[key]
                self.entries.append(entry)

    def write(self, engine: Engine) -> None:
        content = {"name": "translated", "modality": {"0": self.modality}, self.list_key: self.entries}
        path = self.work_dir / "datalist_translated.json"
        write_text_atomic(path, json.dumps(content, indent=4) + "\n")
        logger.info(f"wrote {path.name} ({len(self.entries)} images, key '{self.list_key}')")
