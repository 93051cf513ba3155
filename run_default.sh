#!/usr/bin/env bash
# README command 1: install the pinned environment (first run only), then translate the shipped demo input
# (PDw slices simulated offline from the MNI152 template, in demo/) into T1w with the shipped model.
# Outputs: outputs/translated/*.nii.gz, datalist_translated.json and translation.png (source | translated | target).
# An optional first argument names another method (a file in configs/methods/, composed onto configs/inference.json);
# the other arguments are bundle overrides, e.g. `bash run_default.sh sdedit --num_steps 50`.
set -euo pipefail
cd "$(dirname "$0")"
source tools/ensure_venv.sh requirements.txt
configs="'configs/inference.json'"
if [ $# -gt 0 ] && [ "$1" = "lmi" ]; then
    shift  # the default method: the base config alone
elif [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
    if [ ! -f "configs/methods/$1.json" ]; then
        echo "error: unknown method '$1'; choose one of: lmi $(cd configs/methods && ls *.json | sed 's/\.json$//' | tr '\n' ' ')" >&2
        exit 2
    fi
    configs="$configs,'configs/methods/$1.json'"
    shift
fi
python -m monai.bundle run --config_file "[$configs]" "$@"
