"""Fused fake-quant kernels (CPU C++ extension), built at first use and cached.

The source is ``detq_hooks/csrc/fakequant.cpp``. It is compiled once per machine with
``torch.utils.cpp_extension`` (``-O3 -march=native -fopenmp``) into
``$DETQ_KERNELS_DIR`` (default ``~/.cache/detq-hooks/kernels``), in a folder keyed on the source, the torch and
Python versions, the compiler flags and the CPU's instruction-set flags, so a build made for another CPU is never
loaded. Prebuild with ``python -m detq_hooks.kernels`` (``scripts/setup_env.sh`` does).

When no compiler is found or the build fails, :func:`load` warns once (why, and how to get the fused kernels) and
returns ``None``: the quantizers then use the PyTorch implementation, with the same results. ``DETQ_NO_FUSED_KERNELS=1``
selects that implementation without building or warning.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).resolve().parent / "csrc" / "fakequant.cpp"
CFLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-fno-math-errno", "-fno-trapping-math", "-fopenmp")
LDFLAGS = ("-fopenmp",)

_lock = threading.Lock()
_ops = None
_tried = False
_error: str | None = None
_loaded_from: Path | None = None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_dir() -> Path:
    """The cache folder of this machine's build."""
    root = Path(os.environ.get("DETQ_KERNELS_DIR") or Path.home() / ".cache" / "detq-hooks" / "kernels")
    key = hashlib.sha256(
        "|".join([SOURCE.read_text(), torch.__version__, sys.version, " ".join(CFLAGS + LDFLAGS), _cpu_flags(),
                  os.environ.get("CXX", "c++")]).encode()
    ).hexdigest()[:16]
    return root / f"fakequant_{key}"


def load(verbose: bool = False):
    """The compiled ops namespace (``torch.ops.detq_fq``), or ``None`` with one warning if it cannot be built."""
    global _ops, _tried, _error, _loaded_from
    if _tried:
        return _ops
    with _lock:
        if _tried:
            return _ops
        if os.environ.get("DETQ_NO_FUSED_KERNELS", "") not in ("", "0"):
            _error = "disabled by DETQ_NO_FUSED_KERNELS"
            _tried = True
            return None
        try:
            import logging

            # Importing cpp_extension on a CUDA build of torch without a CUDA toolkit logs a warning that does not
            # concern a CPU-only build.
            log = logging.getLogger("torch.utils.cpp_extension")
            level = log.level
            log.setLevel(logging.ERROR)
            try:
                from torch.utils import cpp_extension
            finally:
                log.setLevel(level)

            d = build_dir()
            d.mkdir(parents=True, exist_ok=True)
            # Copies of the flag lists: cpp_extension appends to the lists it is given.
            cpp_extension.load(name=d.name, sources=[str(SOURCE)], extra_cflags=list(CFLAGS),
                               extra_ldflags=list(LDFLAGS), build_directory=str(d), is_python_module=False,
                               verbose=verbose)
            _ops = torch.ops.detq_fq
            _loaded_from = d
        except Exception as e:  # noqa: BLE001 - any build or load failure falls back to the PyTorch path
            reason = f"{type(e).__name__}: {e}".strip().splitlines()
            _error = " ".join(reason[:1] + reason[-1:]) if len(reason) > 1 else reason[0]
            warnings.warn(
                f"detq-hooks: the fused fake-quant kernels could not be built ({_error[:400]}); using the PyTorch "
                "implementation (same results, slower training). To get the fused kernels install a C++ compiler "
                "with OpenMP (e.g. g++) and ninja, or point CXX at one, then run `python -m detq_hooks.kernels`.",
                RuntimeWarning,
                stacklevel=3,
            )
            _ops = None
        _tried = True
        return _ops


def available() -> bool:
    return load() is not None


def status() -> str:
    """One line: which implementation the quantizers use and why."""
    ops = load()
    return f"fused CPU kernels ({_loaded_from})" if ops is not None else f"PyTorch implementation ({_error})"


if __name__ == "__main__":
    ops = load(verbose="-v" in sys.argv)
    print(status())
    sys.exit(0 if ops is not None else 1)
