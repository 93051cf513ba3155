"""Reading source NIfTI files and writing translated ones, with clear errors and no partial outputs.

Inputs are checked before any network runs (a missing file, a non-NIfTI file, 4D or multichannel data, NaN or an
all-zero image each give one error naming the file), and outputs are written under a temporary name then renamed, so
an interrupted run never leaves a half-written NIfTI or datalist behind.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import tempfile
from collections.abc import Hashable, Mapping
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.transforms import MapTransform

logger = logging.getLogger(__name__)

__all__ = [
    "InputError",
    "SaveTranslationd",
    "TranslatedDatalistWriter",
    "exit_on_bad_input",
    "source_datalist",
    "validate_nifti",
    "write_bytes_atomic",
    "write_text_atomic",
]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
PATH_KEYS = ("image", "target", "label", "mask", "t2")


class InputError(ValueError):
    """A source file or datalist the translation cannot use; the message names the file and the problem."""


def _is_nifti(path: Path) -> bool:
    return path.name.endswith(NIFTI_SUFFIXES)


def validate_nifti(path: str | os.PathLike) -> tuple[int, ...]:
    """Check that `path` is a readable single-channel 2D or 3D NIfTI image with finite, non-zero data."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"source image not found: {path}")
    if not _is_nifti(path):
        raise InputError(f"{path}: not a NIfTI file (expected .nii or .nii.gz)")
    try:
        image = nib.load(str(path))
        data = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as error:  # nibabel raises several types for corrupt files
        raise InputError(f"{path}: cannot be read as NIfTI ({error})") from error
    shape = tuple(int(s) for s in data.shape)
    while len(shape) > 2 and shape[-1] == 1:  # (H, W, 1) is a 2D slice
        shape = shape[:-1]
    if len(shape) == 4:
        raise InputError(f"{path}: 4D or multichannel image of shape {data.shape}; give one 2D slice or 3D volume")
    if len(shape) not in (2, 3):
        raise InputError(f"{path}: expected a 2D slice or a 3D volume, got shape {data.shape}")
    if not np.isfinite(data).all():
        raise InputError(f"{path}: contains NaN or Inf values")
    if not np.any(data):
        raise InputError(f"{path}: image is all zero, nothing to translate")
    return shape


def source_datalist(
    input_dir: str | os.PathLike | None = None,
    datalist: str | os.PathLike | None = None,
    data_list_key: str = "testing",
    base_dir: str | os.PathLike | None = None,
) -> list[dict]:
    """The source images to translate, as ``[{"image": path}, ...]``, from a folder or a Decathlon datalist.

    A folder (`input_dir`) takes precedence over a datalist, so ``--input_dir`` alone overrides the demo datalist.

    Every file is validated up front (:func:`validate_nifti`), so a bad file fails before minutes of sampling.
    """
    if input_dir is None and datalist is None:
        raise InputError("give input_dir (a folder of NIfTI files) or datalist (a JSON datalist)")
    if input_dir is not None:
        folder = Path(input_dir)
        if not folder.is_dir():
            raise FileNotFoundError(f"input_dir not found: {folder}")
        items = [{"image": str(p)} for p in sorted(folder.iterdir()) if p.is_file() and _is_nifti(p)]
        if not items:
            raise InputError(f"{folder}: no NIfTI file (.nii / .nii.gz) in this folder")
    else:
        path = Path(datalist)
        if not path.is_file():
            raise FileNotFoundError(f"datalist not found: {path}")
        try:
            content = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise InputError(f"{path}: not valid JSON ({error})") from error
        entries = content.get(data_list_key) if isinstance(content, dict) else None
        if not entries:
            raise InputError(f"{path}: no entries under the key '{data_list_key}'")
        root = Path(base_dir) if base_dir is not None else path.parent
        items = []
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict) or "image" not in entry:
                raise InputError(f"{path}: entry {index} of '{data_list_key}' has no 'image' key")
            resolved = dict(entry)
            for key, value in entry.items():  # paths relative to the datalist's folder, as MONAI resolves them
                if key in PATH_KEYS and isinstance(value, str) and not Path(value).is_absolute():
                    resolved[key] = str(root / value)
            items.append(resolved)
    for item in items:
        validate_nifti(item["image"])
    return items


def _output_name(source: str, postfix: str) -> str:
    name = Path(source).name
    stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else name[: -len(".nii")]
    return f"{stem}_{postfix}.nii.gz"


def _atomic_save(array: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header | None, path: Path) -> None:
    """Write a gzipped NIfTI through an unpredictable temporary name that no input pattern matches, then rename."""
    image = nib.Nifti1Image(array, affine, header=header)
    image.set_data_dtype(array.dtype)
    write_bytes_atomic(path, gzip.compress(image.to_bytes(), compresslevel=6))


class SaveTranslationd(MapTransform):
    """Write `keys` (the translated image, channel-first) as NIfTI next to nothing else: same affine as the input.

    The output keeps the source file's affine, spacing and header (read back from the source file itself, so the
    geometry cannot drift through preprocessing), with float32 intensities in [0, 1].
    """

    def __init__(
        self,
        keys: str = "pred",
        output_dir: str | os.PathLike = "outputs",
        postfix: str = "trans",
        enabled: bool = True,
    ) -> None:
        super().__init__(keys)
        self.output_dir = Path(output_dir)
        self.postfix = postfix
        self.enabled = enabled

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
            path = self.output_dir / _output_name(source, self.postfix)
            _atomic_save(array, affine, header, path)
            d[f"{key}_path"] = str(path)
            logger.info(f"wrote {path}")
        return d


class TranslatedDatalistWriter:
    """Ignite handler: collect the written files and save ``datalist_translated.json`` when the run completes.

    The file is a Decathlon/Auto3DSeg datalist (``{"testing": [{"image": ...}, ...]}``, paths relative to
    `output_dir`), so a downstream segmentation bundle or Auto3DSeg can take the translated images directly.
    """

    def __init__(self, output_dir: str | os.PathLike, key: str = "pred_path", modality: str = "T1w") -> None:
        self.output_dir = Path(output_dir)
        self.key = key
        self.modality = modality
        self.entries: list[dict] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: self.entries.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def collect(self, engine: Engine) -> None:
        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        for item in outputs:
            if isinstance(item, Mapping) and self.key in item:
                path = Path(item[self.key])
                source = (
                    item["image"].meta.get("filename_or_obj", "") if isinstance(item.get("image"), MetaTensor) else ""
                )
                self.entries.append({"image": str(path.relative_to(self.output_dir)), "source_image": str(source)})

    def write(self, engine: Engine) -> None:
        content = {"name": "translated", "modality": {"0": self.modality}, "testing": self.entries}
        path = self.output_dir / "datalist_translated.json"
        write_text_atomic(path, json.dumps(content, indent=2) + "\n")
        logger.info(f"wrote {path} ({len(self.entries)} images)")


def exit_on_bad_input(function, *args, **kwargs):
    """Call `function`; turn a bad-input error into one clear line and exit status 1 instead of a traceback.

    The bundle runner wraps any exception raised while evaluating a config expression in a ``RuntimeError`` with
    a long traceback; ``SystemExit`` passes through it. Use this for the config's entry points that read user input.
    """
    try:
        return function(*args, **kwargs)
    except (InputError, FileNotFoundError, ValueError) as error:
        logger.error("%s", error)
        raise SystemExit(f"error: {error}") from None


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through an unpredictable temporary file in the same folder, then rename: a reader
    sees the old file or the new one, never half of it, and a symlink placed at a predictable name is not followed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """:func:`write_bytes_atomic` for UTF-8 text."""
    write_bytes_atomic(path, text.encode("utf-8"))
