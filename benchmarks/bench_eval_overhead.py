"""Validation / inference forward of a fake-quant YOLO11n (eval, no_grad) as a ratio to the float model, with the
activation quantizers' no-autograd path (one kernel call on the quantizer's own parameters) and with the general
path (``quantizers._NO_GRAD_PATH = False``: floored-scale and dtype tensors built first, as with autograd), measured side by side in one process (interleaved repetitions; median and min-max of the
per-repetition ratios). Prints the figures README's kernel section quotes.

    DETQ_BENCH_CLOCK=process python benchmarks/bench_eval_overhead.py [--batches 1,8] [--imgsz 160] [--reps 12] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")

import torch

import detq_hooks as dq
from detq_hooks import quantizers as Q

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _measure import clock  # noqa: E402

def timed_forward(model, x, no_grad_path: bool = True) -> float:
    Q._NO_GRAD_PATH = no_grad_path  # off: the path every quantizer call took before (floored-scale tensors first)
    try:
        with torch.no_grad():
            start = clock()
            model(x)
            return clock() - start
    finally:
        Q._NO_GRAD_PATH = True


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="yolo11n.yaml")
    ap.add_argument("--batches", default="1,8", help="batch sizes, comma-separated")
    ap.add_argument("--imgsz", type=int, default=160)
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--recipe", default="w8a8")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    float_model = DetectionModel(a.model, nc=8, verbose=False).eval()
    quantized = copy.deepcopy(float_model)
    dq.quantize(quantized, a.recipe)
    dq.calibrate(quantized, [torch.rand(4, 3, a.imgsz, a.imgsz)], progress=False)
    quantized.eval()
    clock_name = "CPU time" if os.environ.get("DETQ_BENCH_CLOCK") == "process" else "wall clock"
    print(f"{a.model} {a.recipe}, eval forward, {a.imgsz} px, {a.threads} thread(s), {clock_name}, {a.reps} paired repetitions")
    for batch in (int(b) for b in a.batches.split(",")):
        x = torch.rand(batch, 3, a.imgsz, a.imgsz)
        for _ in range(2):  # warm-up: allocator, kernel build, weight cache
            timed_forward(float_model, x), timed_forward(quantized, x), timed_forward(quantized, x, False)
        floats, new, old = [], [], []
        for _ in range(a.reps):
            f = timed_forward(float_model, x)
            floats.append(f)
            new.append(timed_forward(quantized, x) / f)
            old.append(timed_forward(quantized, x, False) / f)
        print(f"batch {batch}: float {statistics.median(floats) * 1e3:.1f} ms; quantized / float: no-autograd path "
              f"{spread(new)}, general path {spread(old)}; no-autograd / general (paired) "
              f"{spread([n / o for n, o in zip(new, old)])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
