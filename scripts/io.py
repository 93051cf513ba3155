"""Reading source NIfTI files and writing translated ones, with clear errors and no partial outputs.

Inputs are checked before any network runs (a missing file, a non-NIfTI file, 4D or multichannel data, NaN or an
all-zero image each give one error naming the file), and outputs are written under a temporary name then renamed, so
an interrupted run never leaves a half-written NIfTI or datalist behind. A run's output folder is staged and published
whole by :class:`PublishOutputs` (through ``scripts.publishing``).
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Hashable, Mapping
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.transforms import MapTransform

from scripts.publishing import Terminated, check_replaceable, exit_on_sigterm, publish, signals_held, start_staging

logger = logging.getLogger(__name__)

__all__ = [
    "InputError",
    "PublishOutputs",
    "check_output_dir",
    "output_stems",
    "SaveTranslationd",
    "TranslatedDatalistWriter",
    "exit_on_bad_input",
    "is_nifti",
    "nifti_stem",
    "source_datalist",
    "validate_nifti",
    "write_bytes_atomic",
    "write_text_atomic",
    "write_torch_atomic",
]

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


def write_torch_atomic(obj, path: str | os.PathLike) -> None:
    """:func:`write_bytes_atomic` for what ``torch.save`` writes (weights, checkpoints)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes_atomic(path, buffer.getvalue())


# Published output folders ------------------------------------------------------------------------------------------

OUTPUTS = "outputs"  # the kind of folder (scripts.publishing) that inference and evaluation runs publish


def _refusal(output_dir: Path):
    """The one-line error for an `output_dir` that must not be replaced (``scripts.publishing.check_replaceable``)."""
    fix = "give a folder that is new, empty or an earlier output of this bundle"
    rule = "it never replaces one that holds files this bundle did not write"
    return lambda problem: InputError(f"output_dir {output_dir} {problem}; {fix}: {rule}")


def check_output_dir(output_dir: str | os.PathLike) -> Path:
    """Refuse, before any work, an `output_dir` a run could not publish into or must not replace.

    It may be absent (its parent is then created), an empty folder, or a folder an earlier run of this bundle
    published with nothing added since (``scripts.publishing.check_replaceable``); a file, a symbolic link, an
    unwritable place or a folder holding other files is an error.
    """
    output_dir = Path(output_dir)
    check_replaceable(output_dir, OUTPUTS, _refusal(output_dir))
    try:
        output_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"output_dir {output_dir} cannot be created ({error.strerror})") from None
    if not os.access(output_dir.parent, os.W_OK | os.X_OK) or (
        output_dir.is_dir() and not os.access(output_dir, os.W_OK | os.X_OK)
    ):
        raise InputError(f"output_dir {output_dir} is not writable; give a folder you can write to")
    return output_dir


class PublishOutputs:
    """Ignite handler: the run writes into `work_dir`, which replaces `output_dir` on completion.

    `work_dir` is a staging folder next to `output_dir` whose name the config knows when it is parsed
    (``$scripts.publishing.new_staging_dir(@output_dir)``), so that the writers can be pointed at it; this handler
    creates it when the run starts. A reader sees the previous run or the new one, never a mix. A run that fails
    (bad input, exception, SIGTERM) removes its staging folder and leaves `output_dir` as it was; staging folders of
    killed runs are removed at the next start. Only a folder :func:`check_output_dir` accepts is ever replaced, and
    the published folder carries the bundle's marker, so that a later run may replace it.
    """

    def __init__(self, output_dir: str | os.PathLike, work_dir: str | os.PathLike) -> None:
        self.output_dir = Path(output_dir)
        self.work_dir = Path(work_dir)
        self._restore_signal = None
        self._staged = False  # only a staging folder this handler created is ever removed

    def attach(self, engine: Engine) -> None:
        """Attach first among the handlers, so that its clean-up runs before a handler (MONAI's StatsHandler)
        re-raises the exception; it publishes after the other handlers have written at completion."""
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._failed)

    def _started(self, engine: Engine) -> None:
        if not engine.has_event_handler(self._completed, Events.COMPLETED):
            engine.add_event_handler(Events.COMPLETED, self._completed)  # after every handler attached before run
        check_output_dir(self.output_dir)
        message = f"error: terminated by SIGTERM: nothing was published, {self.output_dir} is as it was"
        self._restore_signal = exit_on_sigterm(message)  # before the staging folder exists
        start_staging(self.output_dir, OUTPUTS, self.work_dir)
        self._staged = True

    def _restore(self) -> None:
        if self._restore_signal is not None:
            self._restore_signal()
            self._restore_signal = None

    def _completed(self, engine: Engine) -> None:
        with signals_held():  # a SIGTERM held during the renames meets the previous handler, not "nothing published"
            publish(self.work_dir, self.output_dir, OUTPUTS, _refusal(self.output_dir))
            self._staged = False
            self._restore()
        logger.info(f"results in {self.output_dir}")

    def _failed(self, engine: Engine, error: BaseException) -> None:
        if self._staged:
            shutil.rmtree(self.work_dir, ignore_errors=True)
            self._staged = False
        self._restore()
        if isinstance(error, Terminated):
            logger.error("%s", error)
        raise error


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
