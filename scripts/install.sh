#!/usr/bin/env bash
# Create a virtual environment and install enecg with its test tools.
#
#   bash scripts/install.sh            # -> .venv
#   ENECG_VENV=/tmp/v bash scripts/install.sh
#
# torch is installed FIRST with an exact pin (ENECG_TORCH, default torch==2.13.0): with no torch present, pip resolves
# any looser requirement to the newest CUDA build (several GB). On a CUDA machine choose your build, e.g.
# ENECG_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128".
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${ENECG_VENV:-.venv}"
torch_spec="${ENECG_TORCH:-torch==2.13.0}"
python="${PYTHON:-python3}"

"$python" -m venv "$venv"
# shellcheck disable=SC2086  # torch_spec may carry pip options on purpose
"$venv/bin/pip" install --quiet --disable-pip-version-check $torch_spec
# The constraints file keeps pip from replacing the torch just installed while resolving the rest.
"$venv/bin/pip" freeze | grep -i '^torch==' > "$venv/torch-constraint.txt"
"$venv/bin/pip" install --quiet --disable-pip-version-check -c "$venv/torch-constraint.txt" -e '.[test]'
"$venv/bin/python" -c "import torch, enecg; print(f'enecg installed in $venv (torch {torch.__version__})')"
