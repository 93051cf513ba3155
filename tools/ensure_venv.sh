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
