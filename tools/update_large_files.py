"""Rewrite large_files.yml from the files the bundle ships in models/ (weights, resumable checkpoints, segmenter).

Training prunes and renames checkpoints (``checkpoint_epoch_N.pt``), so the list is regenerated rather than edited.
A resume state over the Model Zoo's 25 MB per file is committed as ``<name>.part0``, ``.part1``, ... (``split -b 20M
-d -a 1``; join with ``cat <name>.part* > <name>`` before resuming), and each part is listed:

    python tools/update_large_files.py
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.io import write_text_atomic  # noqa: E402
PATTERNS = ("models/*.pt", "models/*.json", "models/checkpoints*/*.pt", "models/checkpoints*/*.pt.part*")
HEADER = """# Files the bundle ships that the Model Zoo keeps outside git. Each entry: name, path (relative to the bundle
# root), url, hash_val (sha256 of the file), hash_type. Checked by tests/test_bundle.py. The files are committed in
# this repository (no url needed to run); url stays empty until a release hosts them.
# Regenerate with `python tools/update_large_files.py` after training.
large_files:
"""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def main() -> None:
    files = sorted({p for pattern in PATTERNS for p in ROOT.glob(pattern) if p.is_file()})
    lines = [HEADER.rstrip("\n")]
    for path in files:
        relative = path.relative_to(ROOT).as_posix()
        lines += [
            f'  - name: "{path.name}"',
            f'    path: "{relative}"',
            '    url: ""',
            f'    hash_val: "{sha256(path)}"',
            '    hash_type: "sha256"',
        ]
    target = ROOT / "large_files.yml"
    write_text_atomic(target, "\n".join(lines) + "\n")
    print(f"wrote {target} ({len(files)} files)")


if __name__ == "__main__":
    main()
