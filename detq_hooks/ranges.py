"""Range search for one tensor: min-max, percentile, MSE (Lp) search and entropy (KL), and the weight-range
fit. Pure maths on tensors: used by :mod:`~detq_hooks.calibration` (activations, over batches) and by
:mod:`~detq_hooks.surgery` (weights, at conversion), so neither imports the other's module."""

from __future__ import annotations

import math

import torch

from .quantizers import FakeQuantizer, quant_range


MAX_SEARCH_SAMPLES = 1 << 15

# ------------------------------------------------------------------------------------------ range search
def _lp_error(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int, p: float) -> torch.Tensor:
    """Lp quantization error of the values ``x`` (shape [n]) for each candidate range (shape [k]) -> [k]."""
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(1e-12)[:, None]
    zp = torch.round(qmin - lo[:, None] / scale).clamp(qmin, qmax)
    q = torch.clamp(torch.round(x[None, :] / scale) + zp, qmin, qmax)
    return ((q - zp) * scale - x[None, :]).abs().pow(p).mean(1)


def mse_range(
    x: torch.Tensor, lo: float, hi: float, bits: int, symmetric: bool, p: float = 2.4, steps: int = 40
) -> tuple[float, float]:
    """Clipping range minimising the Lp error over shrunken versions of ``[lo, hi]`` (QDrop/BRECQ style).

    Symmetric ranges shrink ``max|x|``; asymmetric ranges search the two ends on a grid, because SiLU
    activations have a short bounded negative tail and a long positive one.
    """
    qmin, qmax = quant_range(bits, symmetric)
    x = x.float().reshape(-1)
    factors = torch.linspace(1.0 / steps, 1.0, steps)
    if symmetric:
        amax = max(abs(lo), abs(hi))
        cand = factors * amax
        err = torch.cat([_lp_error(x, -c, c, qmin, qmax, p) for c in cand.split(8)])
        best = cand[int(err.argmin())].item()
        return -best, best
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    fl = torch.linspace(0.5, 1.0, 6)  # the negative end matters less; a coarser grid suffices
    los = (fl[:, None] * lo).expand(len(fl), steps).reshape(-1)
    his = (factors[None, :] * hi).expand(len(fl), steps).reshape(-1)
    err = torch.cat([_lp_error(x, a, b, qmin, qmax, p) for a, b in zip(los.split(32), his.split(32))])
    i = int(err.argmin())
    return los[i].item(), his[i].item()


def percentile_range(x: torch.Tensor, pct: float, symmetric: bool) -> tuple[float, float]:
    x = x.float().reshape(-1)
    if symmetric:
        a = torch.quantile(x.abs(), pct / 100.0).item()
        return -a, a
    return torch.quantile(x, 1 - pct / 100.0).item(), torch.quantile(x, pct / 100.0).item()


def entropy_range(x: torch.Tensor, lo: float, hi: float, bits: int, symmetric: bool, bins: int = 2048) -> tuple[float, float]:
    """KL-divergence calibration (TensorRT's entropy method) on a 2048-bin histogram.

    Symmetric ranges use the histogram of ``|x|``; asymmetric ranges keep the lower end at ``min(x)`` (the
    bounded side) and search the upper clipping threshold.
    """
    x = x.float().reshape(-1)
    if symmetric:
        v, base = x.abs(), 0.0
        top = max(abs(lo), abs(hi))
    else:
        base = min(lo, 0.0)
        v, top = x - base, max(hi, 0.0) - base
    if top <= 0:
        return (lo, hi)
    hist = torch.histc(v, bins=bins, min=0.0, max=top).double()
    levels = 2 ** (bits - 1) if symmetric else 2**bits
    best_i, best_kl = bins, math.inf
    start = max(levels, bins // 16)
    for i in range(start, bins + 1, max(1, bins // 128)):
        ref = hist[:i].clone()
        ref[i - 1] += hist[i:].sum()  # clipped mass goes to the last bin
        # Quantize the first i bins into `levels` groups, spread each group's mass over its non-empty bins.
        idx = torch.div(torch.arange(i) * levels, i, rounding_mode="floor")
        nz = (hist[:i] > 0).double()
        mass = torch.zeros(levels, dtype=torch.float64).index_add_(0, idx, hist[:i])
        count = torch.zeros(levels, dtype=torch.float64).index_add_(0, idx, nz)
        cand = torch.where(nz > 0, mass[idx] / count[idx].clamp_min(1), torch.zeros_like(nz))
        p = ref / ref.sum().clamp_min(1e-12)
        q = cand / cand.sum().clamp_min(1e-12)
        mask = p > 0
        kl = torch.sum(p[mask] * torch.log(p[mask] / q[mask].clamp_min(1e-12))).item()
        if kl < best_kl:
            best_kl, best_i = kl, i
    thr = best_i / bins * top
    if symmetric:
        return -thr, thr
    return base, base + thr


@torch.no_grad()
def calibrate_weight_quantizer(q: FakeQuantizer, weight: torch.Tensor, method: str = "mse", p: float = 2.4) -> None:
    """Per-channel (or per-tensor) weight range: ``minmax`` or an Lp search over shrink factors, vectorised."""
    w = weight.detach().float()
    if q.per_channel:
        flat = w.transpose(0, q.channel_axis).reshape(w.shape[q.channel_axis], -1)
    else:
        flat = w.reshape(1, -1)
    lo, hi = flat.amin(1), flat.amax(1)
    if method == "mse":
        qmin, qmax = q.qmin, q.qmax
        best_err = torch.full_like(lo, math.inf)
        best_lo, best_hi = lo.clone(), hi.clone()
        amax = torch.maximum(lo.abs(), hi.abs())
        for f in torch.linspace(0.3, 1.0, 36):
            if q.symmetric:
                c_lo, c_hi = -f * amax, f * amax
            else:
                c_lo, c_hi = f * torch.minimum(lo, torch.zeros_like(lo)), f * torch.maximum(hi, torch.zeros_like(hi))
            scale = ((c_hi - c_lo) / (qmax - qmin)).clamp_min(1e-12)[:, None]
            zp = torch.round(qmin - c_lo[:, None] / scale).clamp(qmin, qmax)
            deq = (torch.clamp(torch.round(flat / scale) + zp, qmin, qmax) - zp) * scale
            err = (deq - flat).abs().pow(p).mean(1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo = torch.where(better, c_lo, best_lo)
            best_hi = torch.where(better, c_hi, best_hi)
        lo, hi = best_lo, best_hi
    elif method != "minmax":
        raise ValueError(f"weight calibration method {method!r} is not one of ['minmax', 'mse']")
    q.set_range(lo, hi)


__all__ = ["mse_range", "percentile_range", "entropy_range", "calibrate_weight_quantizer", "MAX_SEARCH_SAMPLES"]
