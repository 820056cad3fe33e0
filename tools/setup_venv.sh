#!/usr/bin/env bash
# Creates the Python reference environment for the fixture scripts in tools/ (HF transformers on CPU).
# CI does not need it: fixtures are committed. Usage: tools/setup_venv.sh [VENV_DIR]  (default tools/.venv)
# Then: VENV_DIR/bin/python tools/<script>.py
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv=${1:-$here/.venv}
python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q -r "$here/requirements.txt"
"$venv/bin/python" -c 'import torch, torchvision, transformers; print("torch", torch.__version__, "torchvision", torchvision.__version__, "transformers", transformers.__version__)'
