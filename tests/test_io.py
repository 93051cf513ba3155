"""Atomic writes (scripts.io): unpredictable hidden temporary names, no symlink followed, nothing half-written."""

from __future__ import annotations

import os

import pytest

from scripts import io as bundle_io


def test_a_symlink_at_the_target_name_is_replaced_not_followed(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("must not change")
    out = tmp_path / "out"
    out.mkdir()
    (out / "x_to_t1w_lmi.nii.gz").symlink_to(outside)
    bundle_io.write_bytes_atomic(out / "x_to_t1w_lmi.nii.gz", b"new")
    assert outside.read_text() == "must not change"
    assert not (out / "x_to_t1w_lmi.nii.gz").is_symlink() and (out / "x_to_t1w_lmi.nii.gz").read_bytes() == b"new"


def test_temporary_names_are_hidden_unpredictable_and_never_match_the_input_patterns(tmp_path, monkeypatch):
    renamed = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renamed.append(str(src)), real_replace(src, dst)))
    for _ in range(2):
        bundle_io.write_bytes_atomic(tmp_path / "x_to_t1w_lmi.nii.gz", b"data")
    names = [os.path.basename(name) for name in renamed]
    assert len(set(names)) == 2, "a new name every time"
    assert all(n.startswith(".") and n.endswith(".tmp") and not n.endswith((".nii", ".nii.gz")) for n in names)


def test_an_interrupted_write_leaves_the_old_file_and_no_temporary_one(tmp_path, monkeypatch):
    target = tmp_path / "datalist_translated.json"
    target.write_text("old")

    def killed(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        bundle_io.write_text_atomic(target, "new")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == [target.name]
