#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment and installs detq-hooks into it.
#   scripts/setup_env.sh            core + Ultralytics + Lightning + export + test tools
#   scripts/setup_env.sh --mmdet    the above plus mmengine/mmdet and a compiled mmcv (cached wheel)
# The environment lives outside the clone so CI runs and fresh clones reuse it:
#   DETQ_VENV (default ~/.cache/detq-hooks/venv).  Prints the venv path on its last line.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${DETQ_VENV:-$HOME/.cache/detq-hooks/venv}"
want_mmdet=0
[[ "${1:-}" == "--mmdet" ]] && want_mmdet=1

python_bin="${PYTHON:-python3.11}"
command -v "$python_bin" >/dev/null 2>&1 || python_bin=python3

if [[ ! -x "$venv/bin/python" ]]; then
  echo "[setup] creating virtual environment at $venv" >&2
  mkdir -p "$(dirname "$venv")"
  "$python_bin" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip wheel >&2
fi
pip=("$venv/bin/pip" install -q --disable-pip-version-check)

# torch is pinned here and only here: these wheels are on this machine's disk.
if ! "$venv/bin/python" -c "import torch, torchvision, sys; sys.exit(0 if torch.__version__.startswith('2.14.1') and torchvision.__version__.startswith('0.29.1') else 1)" 2>/dev/null; then
  echo "[setup] installing torch==2.14.1 torchvision==0.29.1" >&2
  "${pip[@]}" torch==2.14.1 torchvision==0.29.1 >&2
fi

# Re-install the project only when its dependency list changed.
stamp="$venv/.detq-stamp"
sig="$(cat "$here/pyproject.toml" | sha256sum | cut -c1-16):$here"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$sig" ]]; then
  echo "[setup] installing detq-hooks (editable) with extras [all]" >&2
  "${pip[@]}" -e "$here[all]" "torch==2.14.1" "torchvision==0.29.1" >&2
  echo "$sig" > "$stamp"
fi

# Fused fake-quant kernels: compiled once per machine into ~/.cache/detq-hooks/kernels (about 15-60 s), so that
# tests and the first training step do not pay it. Without a compiler the PyTorch implementation is used.
"$venv/bin/python" -m detq_hooks.kernels >&2 || echo "[setup] fused fake-quant kernels not built (see the warning above)" >&2

if [[ $want_mmdet == 1 ]]; then
  bash "$here/scripts/install_mmdet.sh" "$venv" >&2
fi
echo "$venv"
