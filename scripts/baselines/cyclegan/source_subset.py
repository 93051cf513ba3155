"""The source data the CycleGAN baseline may see: 11 % of the source (PDw) training slices, as in the paper, chosen
by whole subjects from the training subjects only (the datalist's ``source_training`` key), never from a test
subject."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from scripts.training import spread

logger = logging.getLogger(__name__)

__all__ = ["load_source_subset", "select_source_subset"]


def select_source_subset(datalist_entries: Sequence[dict], fraction: float = 0.11, seed: int = 0) -> list[dict]:
    """``round(fraction * N)`` of the N source training slices, chosen by whole subjects.

    The subjects are taken in a seeded random order until at least that many slices are gathered; the last subject
    contributes only the slices still needed, evenly spread over its slices (not one slab of the head). Entries keep
    their order within a subject. Pass only training subjects' entries (the datalist's ``source_training`` key).
    """
    entries = list(datalist_entries)
    if not entries:
        raise ValueError("no source training entries: the datalist's 'source_training' list is empty.")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
    missing = [i for i, entry in enumerate(entries) if not isinstance(entry, dict) or "subject" not in entry]
    if missing:
        raise ValueError(
            f"source training entries {missing[:5]}{'...' if len(missing) > 5 else ''} have no 'subject' key: "
            "the source subset is chosen by subject (prepare the dataset with configs/prepare.json)."
        )
    count = round(fraction * len(entries))
    if count < 1:
        raise ValueError(f"fraction {fraction} of {len(entries)} source slices selects no slice.")
    by_subject: dict[str, list[dict]] = {}
    for entry in entries:
        by_subject.setdefault(str(entry["subject"]), []).append(entry)
    subjects = sorted(by_subject)
    order = [subjects[i] for i in np.random.default_rng(seed).permutation(len(subjects))]
    chosen: list[dict] = []
    used: list[tuple[str, int]] = []
    for subject in order:
        needed = count - len(chosen)
        if needed <= 0:
            break
        taken = by_subject[subject] if len(by_subject[subject]) <= needed else spread(by_subject[subject], needed)
        chosen += taken
        used.append((subject, len(taken)))
    logger.info(
        f"source subset: {len(chosen)} of {len(entries)} source training slices ({len(chosen) / len(entries):.1%}, "
        f"fraction {fraction}) from subjects {', '.join(f'{s} ({n})' for s, n in used)}"
    )
    return chosen


def load_source_subset(datalist: str | Path, dataset_dir: str | Path, fraction: float = 0.11, seed: int = 0):
    """:func:`select_source_subset` of the datalist's ``source_training`` entries, paths resolved under
    `dataset_dir`; a source entry of a test subject (``subjects.testing`` in the datalist) is an error."""
    from monai.data import load_decathlon_datalist

    with open(datalist) as f:
        content = json.load(f)
    if "source_training" not in content:
        raise ValueError(
            f"datalist {datalist} has no 'source_training' key: the CycleGAN baseline needs the training subjects' "
            "source slices (prepare the dataset with configs/prepare.json)."
        )
    entries = load_decathlon_datalist(datalist, data_list_key="source_training", base_dir=dataset_dir)
    test_subjects = set((content.get("subjects") or {}).get("testing", []))
    leaked = sorted({str(e.get("subject")) for e in entries} & test_subjects)
    if leaked:
        raise ValueError(f"datalist {datalist}: 'source_training' holds slices of test subjects {leaked}.")
    return select_source_subset(entries, fraction=fraction, seed=seed)
