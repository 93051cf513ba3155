#!/usr/bin/env bash
# README command 1: install the pinned environment (first run only), then translate the shipped demo input
# (PDw slices simulated offline from the MNI152 template, in demo/) into T1w with the shipped model.
# Outputs: outputs/translated/*.nii.gz, datalist_translated.json and translation.png (source | translated | target).
# Extra arguments are bundle overrides, e.g. `bash run_default.sh --method sdedit --num_steps 50`.
set -euo pipefail
cd "$(dirname "$0")"
source tools/ensure_venv.sh requirements.txt
python -m monai.bundle run --config_file configs/inference.json "$@"
