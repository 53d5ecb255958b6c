#!/usr/bin/env bash
# Create the separate environment holding the OFFICIAL Mantis package (mantis-tsfm), used only by the live parity
# test tests/test_parity_mantis.py (which finds it at $ENECG_MANTIS_PYTHON, default .venv-mantis/bin/python).
#
#   bash scripts/mantis_venv.sh                   # -> .venv-mantis
#   ENECG_MANTIS_VENV=/tmp/m bash scripts/mantis_venv.sh
#
# Separate because mantis-tsfm 1.1.0 pins pandas<3, numpy<3 and einops<0.9, which enecg's own environment need not
# satisfy; enecg's requirements are untouched. torch is installed first with the exact pin the project uses (see
# scripts/install.sh: an unpinned resolve would pull a CUDA build), then kept by a constraints file.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${ENECG_MANTIS_VENV:-.venv-mantis}"
torch_spec="${ENECG_TORCH:-torch==2.13.0}"
mantis_spec="${ENECG_MANTIS_SPEC:-mantis-tsfm==1.1.0}"
python="${PYTHON:-python3}"

"$python" -m venv "$venv"
# shellcheck disable=SC2086  # torch_spec may carry pip options on purpose
"$venv/bin/pip" install --quiet --disable-pip-version-check $torch_spec
"$venv/bin/pip" freeze | grep -i '^torch==' > "$venv/torch-constraint.txt"
"$venv/bin/pip" install --quiet --disable-pip-version-check -c "$venv/torch-constraint.txt" "$mantis_spec"
"$venv/bin/python" -c "import mantis.architecture, mantis.trainer, torch; print(f'official mantis in $venv (torch {torch.__version__})')"
