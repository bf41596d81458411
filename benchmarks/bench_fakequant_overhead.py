"""Fake-quant training overhead: forward+backward time of a quantized YOLO-sized conv net as a ratio to
the same float net, measured side by side in one run (interleaved repetitions; per-repetition ratios, median
and min-max), plus the validation forward (eval, no_grad) and the memory a training step holds for backward.

    python benchmarks/bench_fakequant_overhead.py [--imgsz 320] [--batch 8] [--reps 10] [--threads 2] [--json PATH]

Variants: float, W8A8, W4A8, W4A4 with the fused kernels (detq_hooks/kernels.py), and W8A8 on the PyTorch
implementation (``w8a8-pytorch``: the path used when the kernels cannot be built), in the same run.
Targets (issue 11): training step W8A8 <= 1.10x, W4A4 <= 1.15x; validation <= 1.1x; memory <= 1.2x.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys

import torch
from torch import nn

import detq_hooks as dq
from detq_hooks import kernels
from detq_hooks import quantizers as Q

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _measure import clock, fmt_ratio, model_state_bytes, ratio_stats, save_json, saved_for_backward_bytes  # noqa: E402


def conv_bn_silu(c1, c2, k=3, s=1):
    return nn.Sequential(nn.Conv2d(c1, c2, k, s, k // 2, bias=False), nn.BatchNorm2d(c2), nn.SiLU())


class C2fLike(nn.Module):
    def __init__(self, c, n=1):
        super().__init__()
        self.cv1 = conv_bn_silu(c, c, 1)
        self.m = nn.Sequential(*[nn.Sequential(conv_bn_silu(c // 2, c // 2), conv_bn_silu(c // 2, c // 2)) for _ in range(n)])
        self.cv2 = conv_bn_silu(c + c // 2, c, 1)

    def forward(self, x):
        a, b = self.cv1(x).chunk(2, 1)
        return self.cv2(torch.cat([a, b, self.m(b)], 1))


class YoloSizedNet(nn.Module):
    """A YOLOv8n/11n-sized backbone + neck + head (about 3 M parameters, ~60 convolutions)."""

    def __init__(self, w=(16, 32, 64, 128, 256), nc=8):
        super().__init__()
        self.stem = conv_bn_silu(3, w[0], 3, 2)
        self.s2 = nn.Sequential(conv_bn_silu(w[0], w[1], 3, 2), C2fLike(w[1]))
        self.s3 = nn.Sequential(conv_bn_silu(w[1], w[2], 3, 2), C2fLike(w[2], 2))
        self.s4 = nn.Sequential(conv_bn_silu(w[2], w[3], 3, 2), C2fLike(w[3], 2))
        self.s5 = nn.Sequential(conv_bn_silu(w[3], w[4], 3, 2), C2fLike(w[4]))
        self.up = nn.Upsample(scale_factor=2)
        self.n4 = C2fLike_in(w[4] + w[3], w[3])
        self.n3 = C2fLike_in(w[3] + w[2], w[2])
        self.heads = nn.ModuleList(
            nn.Sequential(conv_bn_silu(c, 64), conv_bn_silu(64, 64), nn.Conv2d(64, 4 * 16 + nc, 1)) for c in (w[2], w[3], w[4])
        )

    def forward(self, x):
        p3 = self.s3(self.s2(self.stem(x)))
        p4 = self.s4(p3)
        p5 = self.s5(p4)
        n4 = self.n4(torch.cat([self.up(p5), p4], 1))
        n3 = self.n3(torch.cat([self.up(n4), p3], 1))
        return [h(f) for h, f in zip(self.heads, (n3, n4, p5))]


class C2fLike_in(nn.Module):
    def __init__(self, cin, c):
        super().__init__()
        self.reduce = conv_bn_silu(cin, c, 1)
        self.block = C2fLike(c)

    def forward(self, x):
        return self.block(self.reduce(x))


def step_time(model, x):
    t = clock()
    out = model(x)
    sum(o.float().square().mean() for o in out).backward()
    return clock() - t


def eval_time(model, x):
    with torch.no_grad():
        t = clock()
        model(x)
        return clock() - t


@contextlib.contextmanager
def implementation(name: str):
    """``pytorch`` runs the quantizers on the PyTorch implementation (the fallback), otherwise the fused kernels."""
    previous = Q._FUSED_ENABLED
    Q._FUSED_ENABLED = not name.endswith("-pytorch")
    try:
        yield
    finally:
        Q._FUSED_ENABLED = previous


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default="w8a8,w4a8,w4a4,w8a8-pytorch")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print("quantizer kernels:", kernels.status())
    x = torch.randn(args.batch, 3, args.imgsz, args.imgsz)
    base = YoloSizedNet().train()
    models = {"float": base}
    for name in args.variants.split(","):
        m = dq.quantize(copy.deepcopy(base), name.split("-")[0])
        dq.calibrate(m, [x[:2]], num_batches=1)
        models[name] = m.train()
    params = sum(p.numel() for p in base.parameters())
    print(f"model: {params / 1e6:.2f} M parameters, {len(dq.quantized_layers(models['w8a8']))} quantized layers; "
          f"input {tuple(x.shape)}; threads {args.threads}; clock {os.environ.get('DETQ_BENCH_CLOCK', 'wall')}")
    memory = {}
    for k, m in models.items():  # warm-up, and the memory held for backward
        with implementation(k):
            step_time(m, x)
            m.zero_grad(set_to_none=True)
            loss, saved = saved_for_backward_bytes(lambda: sum(o.float().square().mean() for o in m(x)), m)
            loss.backward()
            memory[k] = saved + model_state_bytes(m)
            m.zero_grad(set_to_none=True)
    times = {k: [] for k in models}
    evals = {k: [] for k in models}
    first_evals = {k: [] for k in models}
    for _ in range(args.reps):  # interleaved so that machine noise hits all variants alike
        for k, m in models.items():
            with implementation(k):
                m.zero_grad(set_to_none=True)
                times[k].append(step_time(m, x))
                # the first forward after the step (new weights), then the third, as the rest of a validation pass
                # runs (the second packs integer weights, once per pass)
                m.eval()
                first_evals[k].append(eval_time(m, x))
                eval_time(m, x)
                evals[k].append(eval_time(m, x))
                m.train()
    train, val, val_first = ratio_stats(times), ratio_stats(evals), ratio_stats(first_evals)
    print(f"{'variant':<13} {'fwd+bwd [ms]':>12} {'train ratio med (min-max)':>27} {'val fwd [ms]':>12} "
          f"{'val ratio med (min-max)':>25} {'memory [MB]':>11} {'mem ratio':>9}")
    for k in models:
        print(f"{k:<13} {train[k]['median_s'] * 1e3:>12.1f} {fmt_ratio(train[k]):>27} {val[k]['median_s'] * 1e3:>12.1f} "
              f"{fmt_ratio(val[k]):>25} {memory[k] / 2**20:>11.1f} {memory[k] / memory['float']:>9.3f}")
    if args.json:
        save_json(args.json, args, [{"variant": k, "train": train[k], "val": val[k], "val_first": val_first[k],
                                     "memory_bytes": memory[k],
                                     "memory_ratio": memory[k] / memory["float"]} for k in models],
                  kernels=kernels.status(), parameters=params, clock=os.environ.get("DETQ_BENCH_CLOCK", "wall"))
    return {"train": train, "val": val, "memory": memory}


if __name__ == "__main__":
    main()
