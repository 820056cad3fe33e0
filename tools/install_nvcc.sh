#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 nvcc (PyPI wheels, no GPU or driver needed) into a project-local folder,
# default `.cuda/` in the repo root. The pin matches the GPU machines' driver (580, CUDA 13.0): PTX from a
# newer nvcc would not load there. Never touches the system Python; idempotent; prints nvcc's path and version.
#
#   bash tools/install_nvcc.sh [TARGET_DIR]
#
# build.rs then finds nvcc at `<repo>/.cuda/nvidia/cu13/bin/nvcc` (or set NVCC / CUDA_HOME).
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
target="${1:-$repo/.cuda}"
python="${PYTHON:-python3}"

pins=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-cccl==13.0.85
)
stamp="$target/.pins"
nvcc="$target/nvidia/cu13/bin/nvcc"

if [[ -x "$nvcc" && -f "$stamp" && "$(cat "$stamp")" == "${pins[*]}" ]]; then
  echo "install_nvcc: pinned wheels already in $target"
else
  echo "install_nvcc: installing ${pins[*]} into $target"
  rm -rf "$target"
  mkdir -p "$target"
  # --target keeps it out of every site-packages; --no-deps because the five pins are the whole closure nvcc needs.
  "$python" -m pip install --quiet --disable-pip-version-check --no-cache-dir --no-deps \
    --only-binary=:all: --target "$target" "${pins[@]}"
  printf '%s' "${pins[*]}" >"$stamp"
fi

if [[ ! -x "$nvcc" ]]; then
  echo "install_nvcc: expected nvcc at $nvcc; layout of $target/nvidia:" >&2
  ls "$target/nvidia" >&2 || true
  exit 1
fi
echo "nvcc: $nvcc"
"$nvcc" --version
