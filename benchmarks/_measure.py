"""Shared measuring helpers of the benchmarks: ratios over interleaved repetitions, memory held for backward."""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import torch


def clock() -> float:
    """The benchmarks' clock: wall time (``perf_counter``), or with ``DETQ_BENCH_CLOCK=process`` the CPU time of this
    process (``process_time``), which load from other processes on a shared machine inflates far less (it still
    counts time OpenMP threads spin at barriers, and cache and memory-bandwidth contention)."""
    return time.process_time() if os.environ.get("DETQ_BENCH_CLOCK") == "process" else time.perf_counter()


def ratio_stats(times: dict[str, list[float]], base: str = "float") -> dict[str, dict[str, float]]:
    """Per-repetition ratios to ``base`` (repetitions interleaved, so that load from other processes hits the
    variants of one repetition alike): min / median / max, plus the ratio of the medians."""
    out = {}
    for k, ts in times.items():
        r = [t / b for t, b in zip(ts, times[base])]
        med = statistics.median(ts)
        out[k] = {"median_s": med, "ratio_of_medians": med / statistics.median(times[base]),
                  "ratio_min": min(r), "ratio_median": statistics.median(r), "ratio_max": max(r)}
    return out


def saved_for_backward_bytes(
    forward: Callable[[], torch.Tensor], model: torch.nn.Module | None = None
) -> tuple[torch.Tensor, int]:
    """Run ``forward`` (forward pass and loss) and count the bytes autograd keeps for the backward pass: every
    saved tensor's storage once (a conv input that is also a quantizer output is counted once). With the
    parameters and gradients this is the peak memory of a training step on CPU, where PyTorch offers no
    allocator statistics. Returns the loss (backward still possible) and the byte count."""
    storages: dict[int, int] = {}
    # Parameters saved for backward (a conv's weight; a weight quantizer's input) are counted by model_state_bytes.
    params = {p.untyped_storage().data_ptr() for p in model.parameters()} if model is not None else set()

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()
    return loss, sum(storages.values())


def model_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Parameters, their gradients (one copy each) and the optimizer's state."""
    n = sum(p.numel() * p.element_size() * (2 if p.requires_grad else 1) for p in model.parameters())
    n += sum(b.numel() * b.element_size() for b in model.buffers())
    if optimizer is not None:
        for st in optimizer.state.values():
            n += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v))
    return n


def fmt_ratio(st: dict[str, float]) -> str:
    return f"{st['ratio_median']:.3f} ({st['ratio_min']:.3f}-{st['ratio_max']:.3f})"


def save_json(path, args, rows: list[dict], **extra) -> None:
    """A script's ``--json PATH`` output, read by ``benchmarks/run.py``: its options, ``extra`` and its rows."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from detq_hooks import allocator  # whether the timed steps ran with the allocator kept warm

    extra.setdefault("allocator", allocator.status())
    path.write_text(json.dumps({"config": {k: str(v) for k, v in vars(args).items()}, **extra, "rows": rows},
                               indent=2, default=str))
