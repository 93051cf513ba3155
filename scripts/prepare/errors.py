"""Errors of data preparation, and how the config entry points report them: one line naming the file or argument.

A config parser would bury a traceback under its own, so the entry points (``prepare_dataset``, ``make_demo``) turn a
``DataPreparationError`` into that one line on stderr and exit status 1, and SIGTERM into a clean exit.
"""

from __future__ import annotations

import logging
from pathlib import Path

from scripts.io.publishing import sigterm_exits

logger = logging.getLogger(__name__)

__all__ = ["DataPreparationError", "InputNotFoundError", "one_line", "refusal"]


class DataPreparationError(ValueError):
    """Bad input for data preparation; the message is one line naming the file or argument and the problem."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class InputNotFoundError(DataPreparationError, FileNotFoundError):
    """A required input file or directory does not exist (or holds nothing usable)."""


def refusal(what: str, folder: Path):
    """The one-line error for a `what` folder (dataset_dir, output_dir) that must not be replaced."""
    fix = f"nothing was changed (give a new or empty {what}, or move that content elsewhere first)"
    return lambda problem: DataPreparationError(f"{what} {folder}: {problem}; {fix}")


def one_line(what: str, function, *args, **kwargs):
    """Call `function` with SIGTERM as ``SystemExit``; a ``DataPreparationError`` becomes one line, exit status 1."""
    with sigterm_exits(f"{what} stopped by SIGTERM; its temporary folder was removed, earlier results are unchanged"):
        try:
            return function(*args, **kwargs)
        except DataPreparationError as exc:
            logger.error("%s", exc)
            raise SystemExit(f"{what} failed: {exc}") from None
