"""Integer convolutions and linear layers for a fake-quant model's inference passes on CPU (validation,
``predict``): the layer's quantized input and weight are handed to oneDNN as their integer codes, and it runs the
layer with int8 dot products (AVX512-VNNI, AVX-VNNI or AMX), accumulating exactly in int32 and scaling to float
once per output.

The result is the layer's fake-quant output computed another way: the float path sums the products of the
same dequantized values in float32, so the two agree to float rounding (relative 1e-6, tested), while the next
layer's quantizer snaps both to the same codes almost everywhere. On the CPUs above it is several times faster
than the float32 convolution, so a fake-quant model validates faster than its float model instead of ~1.2x slower
(``benchmarks/bench_eval_overhead.py``).

It applies only without autograd, in the quantizers' normal mode, to a ``QuantConv2d`` (zero padding given as
numbers) or ``QuantLinear`` with a plain per-tensor input quantizer (enabled, initialised, no hooks, not
observing) and a symmetric weight quantizer, on a float32 CPU tensor with no NaN; anything else takes the float
path. A convolution's output has the memory format the float convolution would give (NCHW for an NCHW model). CPUs without int8 dot-product
instructions keep the float path (oneDNN's fallback there can saturate 16-bit sums). ``DETQ_NO_INT8_CONV=1``
turns it off.
"""

from __future__ import annotations

import math
import os
import weakref
from typing import Optional

import torch

from . import quantizers
from .quantizers import FakeQuantizer

_INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
# Prepacked integer weights per layer, keyed on the fake-quant weight tensor they were made from (the weight cache
# of modules.py returns the same tensor while the weight and its quantizer are unchanged) and the input's scale
# and zero point (oneDNN folds them into the packed weight).
_PACKED: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()
_state: dict[str, Optional[bool]] = {"available": None}
# A oneDNN int8 call costs ~30 us however small the convolution (measured on the AMX Xeon, 1 thread: a 1x1 conv of
# 1.6M multiply-adds runs in 27 us in float32 and 35 us in int8, a 3x3 of 15M in 240 vs 75 us). Below this many
# multiply-adds per thread the float path is kept; grouped (depthwise) convolutions, slow in float32, never are.
MIN_MACS_PER_THREAD = 2_000_000


def available() -> bool:
    """Whether integer convolutions can run here: the compiled kernels, oneDNN's int8 convolution, a CPU with
    int8 dot products, and not turned off by ``DETQ_NO_INT8_CONV``."""
    if os.environ.get("DETQ_NO_INT8_CONV", "") not in ("", "0"):
        return False
    if _state["available"] is None:
        ok = torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qconv2d_pointwise")
        if ok:
            from .kernels import _cpu_flags

            flags = set(_cpu_flags().split())
            ok = any(f in flags for f in _INT8_DOT_FLAGS) and quantizers._kernel_ops() is not None
        _state["available"] = bool(ok)
    return bool(_state["available"]) and torch.backends.mkldnn.enabled


def _large_enough(layer, x: torch.Tensor) -> bool:
    if isinstance(layer, torch.nn.Linear):
        macs = x.numel() * layer.out_features
    elif layer.groups > 1:
        return True
    else:
        kh, kw = layer.kernel_size
        macs = x.shape[0] * x.shape[1] * x.shape[2] * x.shape[3] * layer.out_channels * kh * kw
        macs //= layer.stride[0] * layer.stride[1]
    return macs >= MIN_MACS_PER_THREAD * torch.get_num_threads()


def _conv_applies(layer, x: torch.Tensor) -> bool:
    return (x.dim() == 4 and layer.padding_mode == "zeros" and not isinstance(layer.padding, str)
            and _applies(layer, x))


def _linear_applies(layer, x: torch.Tensor) -> bool:
    return x.dim() >= 2 and _applies(layer, x)


def _applies(layer, x: torch.Tensor) -> bool:
    iq, wq = layer.input_quantizer, layer.weight_quantizer
    return (
        available()
        # the input quantizer's own test: per tensor, float32 CPU, fused mode, no autograd, hook, observer or export
        and type(iq) is FakeQuantizer and iq._plain_no_grad_call(x)
        and wq.enabled and wq.initialized and wq.observer is None and wq.symmetric
        and (not wq.per_channel or wq.channel_axis == 0)
        and not (wq._forward_hooks or wq._forward_pre_hooks)
        and x.numel() > 0 and _large_enough(layer, x)
        and layer.weight.dtype == torch.float32
        and (layer.bias is None or layer.bias.dtype == torch.float32)
        and not torch.jit.is_tracing()
    )


def _packed_weight(layer, x_scale: float, x_zero_point: int):
    """The layer's integer weight prepacked for oneDNN, or ``None`` the first time a weight is seen and for a
    broken range. Packing costs about as much as the integer layer saves in one call (YOLO11n: ~30 ms for all
    layers against a ~65 ms forward at batch 16), so a weight is packed when it comes back a second time: a
    validation pass packs once, at its second batch, and a single forward after each training step never packs."""
    w = layer.quantized_weight()  # the cached fake-quant weight: the same tensor until weight or quantizer change
    entry = _PACKED.get(layer)
    if entry is None or entry[0]() is not w or entry[1] != x_scale or entry[2] != x_zero_point:
        # a weak reference: the cache of modules.py keeps the tensor while it is valid; this one keeps nothing alive
        _PACKED[layer] = (weakref.ref(w), x_scale, x_zero_point, "seen once")
        return None
    if entry[3] == "broken":
        return None
    if entry[3] != "seen once":
        return entry[3]
    wq = layer.weight_quantizer
    out_channels = w.shape[0]
    scale = wq.scale.detach().float().clamp_min(quantizers._SCALE_FLOOR).reshape(-1).expand(out_channels).contiguous()
    codes, ok = quantizers._kernel_ops().weight_codes(w.detach(), scale)  # exact: w = codes * scale
    if not bool(ok):  # a broken weight range: the float path shows it as the fake-quant model computes it
        _PACKED[layer] = (*entry[:3], "broken")
        return None
    if isinstance(layer, torch.nn.Linear):
        packed = torch.ops.onednn.qlinear_prepack(codes, None)
    else:
        packed = torch.ops.onednn.qconv_prepack(codes, scale, x_scale, x_zero_point, list(layer.stride),
                                                 list(layer.padding), list(layer.dilation), layer.groups, None)
    weight = (packed, scale, torch.zeros(out_channels, dtype=torch.int64))
    _PACKED[layer] = (*entry[:3], weight)
    return weight


def _integer_operands(layer, x: torch.Tensor):
    """``(input codes, scale, zero point, packed weight, weight scales, weight zero points)``, or ``None`` where
    the float path runs (a broken range, a weight seen for the first time, a NaN in ``x``)."""
    iq = layer.input_quantizer
    s, lo, hi = quantizers._per_tensor_bounds(iq.scale, iq.zero_point, iq.qmin, iq.qmax)
    s = max(s, quantizers._SCALE_FLOOR)
    if not (math.isfinite(s) and lo == lo and hi == hi):  # a broken range (NaN zero point, infinite scale)
        return None
    x_zero_point = int(-lo)  # codes are round(x / s) - lo, in [0, hi - lo]: the zero point is -lo
    weight = _packed_weight(layer, s, x_zero_point)
    if weight is None:
        return None
    codes, has_nan = quantizers._kernel_ops().per_tensor_codes_nhwc(x, s, lo, hi)
    if bool(has_nan):
        return None
    return codes, s, x_zero_point, *weight


def conv2d(layer, x: torch.Tensor) -> Optional[torch.Tensor]:
    """``layer(x)`` of a ``QuantConv2d`` as an integer convolution, or ``None`` where that does not apply (then run
    the float path). Call without autograd only."""
    operands = _integer_operands(layer, x) if _conv_applies(layer, x) else None
    if operands is None:
        return None
    out = torch.ops.onednn.qconv2d_pointwise(
        *operands, layer.bias, list(layer.stride), list(layer.padding), list(layer.dilation), layer.groups, 1.0, 0,
        torch.float32, "none", [], "")
    # oneDNN writes channels-last; the float convolution's output follows its input's (or weight's) layout
    if _channels_last(x) or _channels_last(layer.weight):
        return out
    return quantizers._kernel_ops().channels_last_to_contiguous(out)


def linear(layer, x: torch.Tensor) -> Optional[torch.Tensor]:
    """``layer(x)`` of a ``QuantLinear`` as an integer matrix product, or ``None`` where that does not apply."""
    if not _linear_applies(layer, x):
        return None
    rows = x.reshape(-1, x.shape[-1])
    operands = _integer_operands(layer, rows[:, :, None, None])  # rows as 1x1 pixels: codes come out row-major
    if operands is None:
        return None
    codes, *rest = operands
    out = torch.ops.onednn.qlinear_pointwise(codes.reshape(rows.shape), *rest, layer.bias, 1.0, 0, torch.float32,
                                             "none", [], "")
    return out.reshape(*x.shape[:-1], layer.out_features)


def _channels_last(t: torch.Tensor) -> bool:
    """Whether PyTorch suggests channels-last for ``t`` (ATen's ``is_channels_last_strides_2d``, which decides the
    float convolution's output layout), so that the integer path returns what the float one would."""
    if t.dim() != 4 or t.stride(1) == 0:
        return False
    smallest = 0
    for d in (1, 3, 2, 0):
        size, stride = t.shape[d], t.stride(d)
        if size == 0 or stride < smallest or (d == 0 and smallest == t.stride(1)):
            return False
        smallest = stride * size if size > 1 else stride
    return True

