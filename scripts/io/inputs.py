"""Reading source NIfTI files: checked before any network runs, each problem one error naming the file.

A missing file, a non-NIfTI file, 4D or multichannel data, NaN or an all-zero image each give one line
(:func:`exit_on_bad_input` turns it into exit status 1 instead of a traceback).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np

logger = logging.getLogger(__name__)


NIFTI_SUFFIXES = (".nii", ".nii.gz")
PATH_KEYS = ("image", "target", "label", "mask", "t2")


class InputError(ValueError):
    """A source file or datalist the translation cannot use; the message names the file and the problem."""


def is_nifti(path: str | os.PathLike) -> bool:
    """Whether `path` names a NIfTI file (``.nii`` or ``.nii.gz``)."""
    return Path(path).name.endswith(NIFTI_SUFFIXES)


def nifti_stem(path: str | os.PathLike) -> str:
    """The file name without ``.nii.gz`` / ``.nii`` (another file's name up to its first dot)."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name.split(".")[0]


def validate_nifti(path: str | os.PathLike) -> tuple[int, ...]:
    """Check that `path` is a readable single-channel 2D or 3D NIfTI image with finite, non-constant data.

    Trailing singleton axes are allowed, as in (H, W, 1) or (H, W, 1, 1) slices and (X, Y, Z, 1) volumes: the
    inference config loads with ``squeeze_non_spatial_dims``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"source image not found: {path}")
    if not is_nifti(path):
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
    if float(data.min()) == float(data.max()):
        raise InputError(f"{path}: image is constant ({float(data.min()):g} everywhere), nothing to translate")
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
        items = [{"image": str(p)} for p in sorted(folder.iterdir()) if p.is_file() and is_nifti(p)]
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
    output_stems([item["image"] for item in items], listed_as="an image to translate")  # each file once
    return items


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


def output_stems(sources: list[str], listed_as: str = "input") -> dict[str, str]:
    """Output name stems for source files: the file name when names are unique, else the path below the sources'
    common folder, so that ``a/x.nii.gz`` and ``b/x.nii.gz`` give ``a/x_...`` and ``b/x_...`` instead of one file."""
    paths = [Path(source) for source in sources]
    duplicates = sorted({str(p) for p in paths if paths.count(p) > 1})
    if duplicates:
        raise InputError(f"{duplicates[0]} is listed twice as {listed_as}; list each file once")
    stems = [nifti_stem(p) for p in paths]
    if len(set(stems)) == len(stems):
        return {str(p): stem for p, stem in zip(paths, stems, strict=True)}
    root = Path(os.path.commonpath([str(p.resolve().parent) for p in paths]))
    return {str(p): str(p.resolve().parent.relative_to(root) / nifti_stem(p)) for p in paths}
