"""Validation / inference forward of a fake-quant YOLO11n (eval, no_grad) as a ratio to the float model, four ways
measured side by side in one process (interleaved repetitions; median and min-max of the per-repetition ratios):

* default: integer convolutions (``detq_hooks/integer_inference.py``: oneDNN int8 on the layer's codes) where the CPU
  has int8 dot products, else the float path below;
* float path (``DETQ_NO_INT8_CONV=1``): each layer quantizes its input into one reused per-thread buffer
  (``FakeQuantizer.quantize_transient``) and runs the float32 convolution;
* fresh output: the float path with the kernel writing a freshly allocated tensor per layer;
* general path (``quantizers._NO_GRAD_PATH = False``): floored-scale and dtype tensors built first, as with autograd.

Then the training-time weight path: every layer's ``quantized_weight()`` and its backward (the 88 weight
quantizers of YOLO11n, once per optimizer step), median milliseconds. Prints the figures README's kernel section
quotes.

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
from detq_hooks import integer_inference
from detq_hooks import quantizers as Q

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _measure import clock  # noqa: E402

def timed_forward(model, x, no_grad_path: bool = True, reused_buffer: bool = True, int8: bool = True) -> float:
    Q._NO_GRAD_PATH = no_grad_path  # off: the path every quantizer call took before (floored-scale tensors first)
    threshold = Q._SCRATCH_MIN_ELEMENTS
    Q._SCRATCH_MIN_ELEMENTS = threshold if reused_buffer else 1 << 62  # every input "small": a fresh output
    if not int8:
        os.environ["DETQ_NO_INT8_CONV"] = "1"
    try:
        with torch.no_grad():
            start = clock()
            model(x)
            return clock() - start
    finally:
        Q._NO_GRAD_PATH = True
        Q._SCRATCH_MIN_ELEMENTS = threshold
        os.environ.pop("DETQ_NO_INT8_CONV", None)


def weight_path_ms(model, reps: int) -> float:
    """Median time of one training step's weight quantization: every layer's quantized weight and its backward."""
    from detq_hooks.modules import quantized_layers

    layers = [layer for _, layer in quantized_layers(model)]
    grads = [torch.randn_like(layer.weight) for layer in layers]
    model.train()
    times = []
    for i in range(reps + 3):
        start = clock()
        torch.autograd.backward([layer.quantized_weight() for layer in layers], grads)
        if i >= 3:  # warm-up
            times.append(clock() - start)
    model.eval()
    return statistics.median(times) * 1e3


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="yolo11n.yaml", help="an Ultralytics model yaml, or `fcos` (the Lightning example's)")
    ap.add_argument("--batches", default="1,8", help="batch sizes, comma-separated")
    ap.add_argument("--imgsz", type=int, default=160)
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--recipe", default="w8a8")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    if a.model == "fcos":  # the Lightning example's FCOS-R18 (torchvision): takes a list of images, post-processes
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
        from lightning_fcos import build_fcos

        float_model = build_fcos(8, a.imgsz, a.imgsz).eval()
    else:
        float_model = DetectionModel(a.model, nc=8, verbose=False).eval()
    quantized = copy.deepcopy(float_model)
    dq.quantize(quantized, a.recipe)
    dq.calibrate(quantized, [torch.rand(4, 3, a.imgsz, a.imgsz)], progress=False)
    quantized.eval()
    clock_name = "CPU time" if os.environ.get("DETQ_BENCH_CLOCK") == "process" else "wall clock"
    print(f"{a.model} {a.recipe}, eval forward, {a.imgsz} px, {a.threads} thread(s), {clock_name}, {a.reps} paired repetitions")
    for batch in (int(b) for b in a.batches.split(",")):
        x = torch.rand(batch, 3, a.imgsz, a.imgsz)
        if a.model == "fcos":
            x = list(x)
        for _ in range(2):  # warm-up: allocator, kernel build, weight cache, prepacked integer weights
            timed_forward(float_model, x), timed_forward(quantized, x), timed_forward(quantized, x, False, int8=False)
        floats, integer, new, fresh, old = [], [], [], [], []
        for _ in range(a.reps):
            f = timed_forward(float_model, x)
            floats.append(f)
            integer.append(timed_forward(quantized, x) / f)
            new.append(timed_forward(quantized, x, int8=False) / f)
            fresh.append(timed_forward(quantized, x, reused_buffer=False, int8=False) / f)
            old.append(timed_forward(quantized, x, False, int8=False) / f)
        print(f"batch {batch}: float {statistics.median(floats) * 1e3:.1f} ms; quantized / float: default "
              f"({'integer convolutions' if integer_inference.available() else 'float path: no int8 convolutions here'}) "
              f"{spread(integer)}, float path {spread(new)}, fresh output {spread(fresh)}, general path {spread(old)}; "
              f"reused / fresh (paired) {spread([n / o for n, o in zip(new, fresh)])}")
    if a.model == "fcos":
        return 0
    print(f"training-time weight path (all {a.model} layers' quantized weights + backward): "
          f"{weight_path_ms(quantized, a.reps):.2f} ms per step, median of {a.reps}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
