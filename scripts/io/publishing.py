"""Folders the bundle writes (prepared datasets, the demo input, inference and evaluation outputs): one marker, one
rule for replacing a folder, staging, atomic publishing, and SIGTERM as a clean exit.

Nothing is lost and nothing overwritten: a folder is replaced only when it is absent, empty, or holds
nothing but what the bundle wrote there, as its marker file ``MARKER`` lists (datasets and demo inputs written before
the marker existed are recognised by their datalist). A run writes into a hidden staging folder with an unpredictable
name next to the target, ``.<name>.tmp-<hex>``, and renames it onto the target when it has finished: the old folder
is moved aside (``.<name>.old-<hex>``) and removed last, with SIGTERM and SIGINT held during the renames, so a reader
sees the old folder or the new one, never a mix. SIGTERM raises :class:`Terminated`, so clean-up code runs and the
run ends with one line and exit status 1; what killed runs left (staging folders of ended processes, folders moved
aside) is removed at the next start.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
import signal
import socket
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = [
    "MARKER",
    "Terminated",
    "check_replaceable",
    "exit_on_sigterm",
    "new_staging_dir",
    "publish",
    "read_marker",
    "remove_leftovers",
    "sigterm_exits",
    "signals_held",
    "start_staging",
    "write_marker",
    "write_staged",
]

BUNDLE_NAME = "brain_mri_zero_shot_translation"
MARKER = ".written_by_brain_mri_zero_shot_translation"
_LEGACY_SOURCES = ("mni", "labelmaps", "ixi")  # the sources of datasets written before the marker existed

Refuse = Callable[[str], BaseException]  # the caller's one-line error for a problem ("is a file", ...)


# ----------------------------------------------------------------------------------------------------------------
# the marker and the rule for replacing a folder


def _read_json(path: Path):
    try:
        return json.loads(path.read_text()) if path.is_file() and not path.is_symlink() else None
    except (OSError, ValueError):
        return None


def write_marker(folder: str | os.PathLike, kind: str, names: Iterable[str] = ()) -> None:
    """Mark `folder` as written by this bundle: its ``kind`` ("dataset", "demo", "outputs"), the writing process
    (pid and host, so that a later run can tell a killed run's staging folder from a running one) and the files
    (`names`, relative POSIX paths) it wrote there."""
    info = {"written_by": BUNDLE_NAME, "kind": kind, "pid": os.getpid(), "host": socket.gethostname()}
    info["names"] = sorted(str(name) for name in names)
    (Path(folder) / MARKER).write_text(json.dumps(info, indent=4) + "\n")


def read_marker(folder: str | os.PathLike, kind: str) -> dict | None:
    """The marker of a ``kind`` folder written by this bundle, or None."""
    info = _read_json(Path(folder) / MARKER)
    if isinstance(info, dict) and info.get("written_by") == BUNDLE_NAME and info.get("kind") == kind:
        return info
    return None


def _layout_names(folder: Path, kind: str, marked: bool) -> set[str] | None:
    """What a dataset or demo folder of the bundle's own layout holds, for folders whose marker lists no names:
    those written before the marker existed (recognised by their datalist) or marked without names. None for any
    other folder."""
    datalist = _read_json(folder / "datalist.json")
    datalist = datalist if isinstance(datalist, dict) else {}
    if kind == "dataset" and (marked or datalist.get("source") in _LEGACY_SOURCES and "subjects" in datalist):
        return {"datalist.json", "slices"}
    testing = datalist.get("testing") if isinstance(datalist.get("testing"), list) else None
    if kind == "demo" and (marked or testing is not None and str(datalist.get("name", "")).startswith("demo input")):
        listed = (v for e in testing or [] if isinstance(e, dict) for v in e.values() if isinstance(v, str))
        return {"datalist.json"} | {v for v in listed if v.endswith((".nii", ".nii.gz")) and Path(v).name == v}
    return None


def _files(folder: Path) -> list[str]:
    """Every file below `folder` (symbolic links included, not followed), as sorted POSIX paths relative to it."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_symlink() or not p.is_dir())


def _own_names(folder: Path, kind: str) -> set[str] | None:
    """The files (or, for older folders recognised by their layout, top-level names) this bundle wrote into
    `folder`, or None when it was not written by it."""
    info = read_marker(folder, kind)
    names = info.get("names") if info else None
    if isinstance(names, list):
        return {str(name) for name in names} | {MARKER}
    layout = _layout_names(folder, kind, info is not None)
    return None if layout is None else layout | {MARKER}


def _replace_problem(folder: Path, kind: str) -> str | None:
    """Why `folder` must not be replaced by a new ``kind`` folder; None when it may be: it does not exist, is empty,
    or holds nothing but what this bundle wrote there."""
    if folder.is_symlink():
        return "is a symbolic link"
    if not folder.exists():
        return None
    if not folder.is_dir():
        return "is a file"
    try:
        present = _files(folder)
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    own = _own_names(folder, kind) if present else set()
    if own is None:
        more = f" and {len(present) - 1} more" if len(present) > 1 else ""
        return f"was not written by this bundle (it holds {present[0]}{more})"
    extra = [name for name in present if not any(name == n or name.startswith(n + "/") for n in own)]
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        return f"holds {extra[0]}{more}, which this bundle did not write"
    return None


def check_replaceable(folder: str | os.PathLike, kind: str, refuse: Refuse) -> None:
    """Raise ``refuse(problem)`` unless `folder` may be replaced by a new ``kind`` folder: it must be absent, empty,
    or hold nothing but what the marker (or, for older datasets and demo inputs, the datalist) says this bundle
    wrote. A symbolic link or a file is refused."""
    problem = _replace_problem(Path(folder), kind)
    if problem:
        raise refuse(problem)


# ----------------------------------------------------------------------------------------------------------------
# staging folders and what killed runs left


def new_staging_dir(out: str | os.PathLike) -> Path:
    """A new, unpredictable name for the staging folder of `out`: ``.<name>.tmp-<hex>`` next to it (on the same file
    system, so that it can be renamed onto `out`). Nothing is created; :func:`start_staging` does that."""
    out = Path(out)
    return out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:16]}"


def _process_gone(info: dict) -> bool:
    """Whether the process that wrote a marker has ended (same host only; anything unclear counts as running)."""
    try:
        pid = int(info.get("pid"))
    except (TypeError, ValueError):
        return False
    if info.get("host") != socket.gethostname() or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def remove_leftovers(out: str | os.PathLike, kind: str) -> None:
    """Remove what killed runs of this bundle left next to `out`: staging folders ``.<name>.tmp-*`` with the marker
    of a process that has ended, and (once `out` exists) replaced copies ``.<name>.old-*`` holding only their own
    files. Anything else is left alone."""
    out = Path(out)
    if not out.parent.is_dir():
        return
    prefix = glob.escape(f".{out.name}.")
    for path in sorted(out.parent.glob(prefix + "tmp-*")):
        info = read_marker(path, kind) if path.is_dir() and not path.is_symlink() else None
        if info is not None and _process_gone(info):
            shutil.rmtree(path, ignore_errors=True)
            logger.warning("removed %s, left behind by an interrupted run", path)
    if out.is_dir() and not out.is_symlink():
        for path in sorted(out.parent.glob(prefix + "old-*")):
            if path.is_dir() and not path.is_symlink() and _own_names(path, kind) is not None:
                if _replace_problem(path, kind) is None:
                    shutil.rmtree(path, ignore_errors=True)
                    logger.warning("removed %s, left behind by an interrupted run", path)


def start_staging(out: str | os.PathLike, kind: str, staging: str | os.PathLike | None = None) -> Path:
    """Remove the leftovers of killed runs next to `out`, then create the marked staging folder `staging` (default:
    :func:`new_staging_dir`) and return it. An existing path is never reused (``OSError``, as for any failure)."""
    out = Path(out)
    remove_leftovers(out, kind)
    staging = new_staging_dir(out) if staging is None else Path(staging)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging.mkdir()
    write_marker(staging, kind)
    return staging


# ----------------------------------------------------------------------------------------------------------------
# publishing


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGTERM and SIGINT back (delivered on exit) around a few renames that must not be split."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def publish(staging: str | os.PathLike, out: str | os.PathLike, kind: str, refuse: Refuse) -> None:
    """Rename `staging` onto `out`, its marker now listing every file it holds.

    `out` is checked again first (:func:`check_replaceable`: nothing foreign may have arrived while the run worked);
    an existing `out` is moved aside, and removed only once `staging` is in its place."""
    staging, out = Path(staging), Path(out)
    write_marker(staging, kind, (name for name in _files(staging) if name != MARKER))
    check_replaceable(out, kind, refuse)
    old = None
    try:
        with signals_held():
            if out.exists():
                old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:16]}"
                os.replace(out, old)
                try:
                    os.replace(staging, out)
                except BaseException:
                    os.replace(old, out)
                    old = None
                    raise
            else:
                os.replace(staging, out)
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def write_staged(out: str | os.PathLike, kind: str, write: Callable[[Path], None], refuse: Refuse) -> None:
    """Create a staging folder for `out` (:func:`start_staging`), call ``write(staging)`` and :func:`publish` it onto
    `out`; on any error or exit (SIGTERM under :func:`sigterm_exits` too) the staging folder is removed. `refuse`
    makes the caller's one-line error when nothing can be written next to `out` or `out` may no longer be replaced."""
    out = Path(out)
    try:
        staging = start_staging(out, kind)
    except OSError as exc:
        raise refuse(f"cannot write next to it ({exc.strerror})") from None
    try:
        write(staging)
        publish(staging, out, kind, refuse)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------------------------------
# SIGTERM


class Terminated(SystemExit):
    """SIGTERM, raised where the program is: a ``SystemExit`` (exit status 1, the message the one line on stderr)
    that ``except Exception`` does not swallow, so that ``finally`` blocks, clean-up code and ignite's
    ``EXCEPTION_RAISED`` handlers run."""


def exit_on_sigterm(message: str) -> Callable[[], None]:
    """From now on SIGTERM raises ``Terminated(message)``, and a second SIGTERM during the clean-up is ignored;
    returns the function that puts the previous handler back. Only in the main thread (elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated(message)

    previous = signal.signal(signal.SIGTERM, stop)
    return lambda: signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def sigterm_exits(message: str) -> Iterator[None]:
    """:func:`exit_on_sigterm` for the duration of a ``with`` block."""
    restore = exit_on_sigterm(message)
    try:
        yield
    finally:
        restore()
