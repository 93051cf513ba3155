#!/usr/bin/env bash
# README command 2: install the pinned test environment, run the Model Zoo code checks, then the tests.
# Extra arguments go to pytest (e.g. `bash run_tests.sh -k lmi`).
set -euo pipefail
cd "$(dirname "$0")"
source tools/ensure_venv.sh requirements-dev.txt
echo "[checks] ruff lint (pyflakes, pycodestyle, isort order) and black-compatible format, line length 120"
ruff check scripts tests benchmarks tools
ruff format --check scripts tests benchmarks tools
set +e
python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests (exit 5): nothing was checked, failing." >&2
    exit 1
fi
exit "$rc"
