"""Atomic file writes: an unpredictable temporary file in the same folder, fsync, rename."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import torch


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
