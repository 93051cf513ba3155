"""The shipped demo input (``demo/``, ``configs/make_demo.json``): a few test slices copied from a prepared dataset,
so that the README's commands run on a fresh clone without preparing data first."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from scripts.io.publishing import check_replaceable, write_staged
from scripts.prepare.errors import DataPreparationError, InputNotFoundError, one_line, refusal

logger = logging.getLogger(__name__)

__all__ = ["DEMO_KEYS", "make_demo", "make_demo_input"]

DEMO_KEYS = ("image", "target", "label", "mask")


def make_demo_input(datalist: str | os.PathLike, output_dir: str | os.PathLike, count: int = 4) -> Path:
    """Copy `count` test slices of a prepared dataset into `output_dir`: the source, and for the figure and the
    quick evaluation only, the target, the tissue labels and the brain mask.

    This is how the shipped demo input (``demo/``) was made from the offline ``mni`` source; the translation never
    reads the target. The folder is written next to `output_dir` and renamed onto it; an existing `output_dir` is
    only replaced when it is empty or holds nothing but a demo input this function wrote (else
    ``DataPreparationError``, nothing changed).
    """
    datalist = Path(datalist)
    if not datalist.is_file():
        raise InputNotFoundError(f"datalist {datalist}: file does not exist")
    try:
        content = json.loads(datalist.read_text())
    except (OSError, ValueError):
        content = None
    testing = content.get("testing") if isinstance(content, dict) else None
    if not isinstance(testing, list):
        raise DataPreparationError(f"datalist {datalist}: not a JSON datalist with a 'testing' list")
    count = int(count)
    if count < 1 or len(testing) < count:
        raise DataPreparationError(f"datalist {datalist}: {len(testing)} testing entries, {count} asked for")
    for i, entry in enumerate(testing):
        if not isinstance(entry, dict) or not {"image", "subject", "slice"} <= set(entry):
            raise DataPreparationError(f"datalist {datalist}: testing entry {i} lacks 'image', 'subject' or 'slice'")
    output = Path(output_dir)
    check_replaceable(output, "demo", refusal("output_dir", output))
    by_subject: dict[str, list[dict]] = {}
    for entry in testing:
        by_subject.setdefault(entry["subject"], []).append(entry)
    per_subject = max(1, -(-count // len(by_subject)))  # mid-brain slices of each subject, not the skull base
    fractions = [0.45 + 0.25 * i / max(1, per_subject - 1) for i in range(per_subject)]
    picked = [
        sorted(entries, key=lambda e: e["slice"])[int(f * (len(entries) - 1))]
        for entries in by_subject.values()
        for f in fractions
    ][:count]
    for entry in picked:
        for key in DEMO_KEYS:
            if key in entry and not (datalist.parent / entry[key]).is_file():
                raise InputNotFoundError(f"datalist {datalist}: {key} {datalist.parent / entry[key]} does not exist")
    entries = []

    def write(staging: Path) -> None:
        for entry in picked:
            names = {}
            for key in DEMO_KEYS:
                if key in entry:
                    source = datalist.parent / entry[key]
                    shutil.copyfile(source, staging / source.name)
                    names[key] = source.name
            entries.append({**names, "subject": entry["subject"], "slice": entry["slice"]})
        demo = {"name": "demo input (PDw slices simulated from the MNI152 2009a template)", "testing": entries}
        (staging / "datalist.json").write_text(json.dumps(demo, indent=2))

    write_staged(output, "demo", write, refusal("output_dir", output))
    logger.info(f"wrote {len(entries)} demo slices to {output}")
    return output


def make_demo(datalist: str | os.PathLike, output_dir: str | os.PathLike, count: int = 4) -> Path:
    """Entry point of ``configs/make_demo.json``: ``make_demo_input`` with bad input reported as one line (exit
    status 1) and SIGTERM as ``SystemExit`` after clean-up."""
    return one_line("making the demo input", make_demo_input, datalist, output_dir, count)
