# Sourced by run_default.sh and run_tests.sh: create (or refresh) the pinned virtual environment in .venv
# and put it first on PATH. Re-installs only when requirements*.txt changed since the last install.
# Usage: source tools/ensure_venv.sh [requirements file, default requirements.txt]
_req="${1:-requirements.txt}"
_venv="${VENV_DIR:-.venv}"
_stamp="$_venv/.requirements.sha256"
_want="$(cat requirements*.txt | sha256sum | cut -d' ' -f1)-$_req"
if [ ! -x "$_venv/bin/python" ]; then
    echo "[setup] creating virtual environment in $_venv"
    python3 -m venv "$_venv"
fi
if [ "$(cat "$_stamp" 2>/dev/null)" != "$_want" ]; then
    echo "[setup] installing pinned packages from $_req (first run only; a few minutes)"
    "$_venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    "$_venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$_req"
    echo "$_want" > "$_stamp"
fi
export PATH="$PWD/$_venv/bin:$PATH"
# Make the bundle's `scripts` importable from any working directory, as an editable install would: MONAI's runner
# puts the bundle root on sys.path only after `initialize`, which already needs `scripts` (see docs/README.md,
# "Running from another directory").
"$_venv/bin/python" -c 'import sys, sysconfig; open(sysconfig.get_paths()["purelib"] + "/brain_mri_zero_shot_translation.pth", "w").write(sys.argv[1] + "\n")' "$PWD"
