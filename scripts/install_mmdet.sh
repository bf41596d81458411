#!/usr/bin/env bash
# Installs MMDetection 3.3 with a compiled mmcv 2.1 (CPU ops) into the given virtual environment.
#   scripts/install_mmdet.sh VENV
# PyPI carries only mmcv's source, and compiling its ops takes 20-35 minutes on 2 cores, so the
# wheel is built once into DETQ_WHEEL_CACHE (default ~/.cache/detq-hooks/wheels) and reused; a wheel for
# this Python and machine under third_party/wheels/ (committed) is used first.
# The build runs in its own throwaway venv because it needs setuptools<70 (pkg_resources) and
# --no-build-isolation (it imports torch), which we do not want to impose on the main venv.
set -euo pipefail
venv="${1:?usage: install_mmdet.sh VENV}"
cache="${DETQ_WHEEL_CACHE:-$HOME/.cache/detq-hooks/wheels}"
mkdir -p "$cache"

if "$venv/bin/python" -c "import pkg_resources, mmcv, mmcv.ops, mmdet, mmengine; from mmcv.ops import nms; assert mmcv.__version__ == '2.1.0'" 2>/dev/null; then
  exit 0
fi

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The repository ships the wheel built on this platform (third_party/wheels), so a fresh clone skips the build.
py_tag="cp$("$venv/bin/python" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')"
wheel="$(ls "$here"/third_party/wheels/mmcv-2.1.0-"$py_tag"-*-linux_"$(uname -m)".whl 2>/dev/null | head -1 || true)"
[[ -z "$wheel" ]] && wheel="$(ls "$cache"/mmcv-2.1.0-*.whl 2>/dev/null | head -1 || true)"
if [[ -z "$wheel" ]]; then
  echo "[mmdet] building mmcv 2.1.0 with compiled ops (once; 20-35 min on 2 cores) into $cache" >&2
  build_venv="$(mktemp -d)/mmcv-build"
  python_bin="${PYTHON:-python3.11}"
  command -v "$python_bin" >/dev/null 2>&1 || python_bin=python3
  "$python_bin" -m venv "$build_venv"
  bpip=("$build_venv/bin/pip" install -q --disable-pip-version-check)
  "${bpip[@]}" --upgrade pip >&2
  "${bpip[@]}" torch==2.14.1 wheel ninja numpy >&2
  # torch declares a newer setuptools; mmcv's setup.py needs pkg_resources (setuptools<70).
  # The conflict only matters at torch's run time for cpp_extension, which works with either.
  "${bpip[@]}" --no-deps "setuptools<70" >&2
  # mmcv adds -std=c++17 itself; torch 2.14 headers need C++20, and the last -std flag wins.
  wrapper_dir="$(dirname "$build_venv")/cxx"
  mkdir -p "$wrapper_dir"
  printf '#!/bin/sh\nexec g++ "$@" -std=c++20\n' > "$wrapper_dir/g++-cxx20"
  chmod +x "$wrapper_dir/g++-cxx20"
  tmp_wheels="$(dirname "$build_venv")/out"
  CXX="$wrapper_dir/g++-cxx20" MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    "$build_venv/bin/pip" wheel -q --disable-pip-version-check --no-build-isolation --no-deps \
    -w "$tmp_wheels" mmcv==2.1.0 >&2
  # Move into the cache only once complete, so an interrupted build is never mistaken for a wheel.
  mv "$tmp_wheels"/mmcv-2.1.0-*.whl "$cache/"
  rm -rf "$(dirname "$build_venv")"
  wheel="$(ls "$cache"/mmcv-2.1.0-*.whl | head -1)"
fi

echo "[mmdet] installing $(basename "$wheel"), mmengine 0.10.7, mmdet 3.3.0" >&2
pip=("$venv/bin/pip" install -q --disable-pip-version-check)
# mmengine's package checks (config `mmdet::` scopes) import pkg_resources, which setuptools>=81 no longer has.
"${pip[@]}" "$wheel" mmengine==0.10.7 mmdet==3.3.0 "setuptools<81" "torch==2.14.1" "torchvision==0.29.1" >&2
"$venv/bin/python" -c "import mmcv.ops, mmdet; from mmcv.ops import nms" >&2
