"""The output folder of an inference or evaluation run: checked before any work, staged, and published whole
(through :mod:`scripts.io.publishing`).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from ignite.engine import Engine, Events

from scripts.io.inputs import InputError
from scripts.io.publishing import Terminated, check_replaceable, exit_on_sigterm, publish, signals_held, start_staging

logger = logging.getLogger(__name__)


OUTPUTS = "outputs"  # the kind of folder (scripts.io.publishing) that inference and evaluation runs publish


def _refusal(output_dir: Path):
    """The one-line error for an `output_dir` that must not be replaced (``publishing.check_replaceable``)."""
    fix = "give a folder that is new, empty or an earlier output of this bundle"
    rule = "it never replaces one that holds files this bundle did not write"
    return lambda problem: InputError(f"output_dir {output_dir} {problem}; {fix}: {rule}")


def check_output_dir(output_dir: str | os.PathLike) -> Path:
    """Refuse, before any work, an `output_dir` a run could not publish into or must not replace.

    It may be absent (its parent is then created), an empty folder, or a folder an earlier run of this bundle
    published with nothing added since (``scripts.io.publishing.check_replaceable``); a file, a symbolic link, an
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
    (``$scripts.io.publishing.new_staging_dir(@output_dir)``), so that the writers can be pointed at it; this handler
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
