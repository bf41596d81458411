"""How a :class:`~detq_hooks.quantizers.FakeQuantizer` looks in an exported graph.

Under ``torch.onnx.export`` every quantizer becomes constants, never arithmetic:

* a **weight** quantizer: its integer codes, computed here in Python, as an ``int8`` initializer feeding one
  ``DequantizeLinear`` (per-channel scale, zero point 0); the float weight is dropped from the file;
* an **activation** quantizer: ``QuantizeLinear`` → ``DequantizeLinear`` with a constant scale and zero point
  (``uint8`` for asymmetric ranges, ``int8`` for symmetric ones). A range narrower than the 8-bit container
  (4-bit activations, the narrow symmetric ±127 grid) adds one ``Clip`` with constant bounds in front, so the
  exported function equals the fake-quant one.

Under other tracers (OpenVINO's PyTorch frontend, ``torch.jit.trace``) and in eager ``quantizer_mode("export")``
the quantizer is PyTorch's own ``fake_quantize_per_{tensor,channel}_affine`` over an 8-bit range, which
OpenVINO reads as one ``FakeQuantize`` (255 levels for symmetric weights, 256 for u8 activations) and runs in
int8; a quantizer of fewer bits is a clamp to its range first (constant-folded for weights), so 4-bit codes
run exactly as int8 rather than as a 16-level FakeQuantize the CPU plugin would execute in float.
"""

from __future__ import annotations

import numpy as np
import torch


def _container(symmetric: bool) -> tuple[int, int]:
    return (-128, 127) if symmetric else (0, 255)


def weight_codes(q, w: torch.Tensor) -> np.ndarray:
    """Integer codes of ``w`` under weight quantizer ``q`` (as int8; exact for 2..8 bits)."""
    scale, zp = _scale_zp(q)
    x = w.detach().float()
    if q.per_channel:
        shape = [1] * x.dim()
        shape[q.channel_axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    codes = torch.clamp(torch.round(x / scale) + zp, q.qmin, q.qmax)
    dtype = np.int8 if q.symmetric else np.uint8
    return codes.cpu().numpy().astype(dtype)


def _scale_zp(q) -> tuple[torch.Tensor, torch.Tensor]:
    scale = q.scale.detach().float().clamp_min(1e-8)
    zp = q.zero_point.detach().float().round().clamp(q.qmin, q.qmax)
    return scale, zp


class _DequantizedWeight(torch.autograd.Function):
    """``DequantizeLinear(int8 codes, scale, 0)``: the codes are a constant of the graph, not the float weight."""

    @staticmethod
    def forward(ctx, w, codes, scale, zero_point, axis):
        shape = [1] * w.dim()
        shape[axis] = -1
        c = torch.from_numpy(codes.astype(np.float32))
        s = torch.from_numpy(scale).reshape(shape)
        z = torch.from_numpy(zero_point.astype(np.float32)).reshape(shape)
        return ((c - z) * s).to(w.device)

    @staticmethod
    def symbolic(g, w, codes, scale, zero_point, axis):
        q = g.op("Constant", value_t=torch.from_numpy(codes.copy()))
        s = g.op("Constant", value_t=torch.from_numpy(scale.copy()))
        z = g.op("Constant", value_t=torch.from_numpy(zero_point.copy()))
        if scale.size == 1:
            s = g.op("Constant", value_t=torch.tensor(float(scale.reshape(-1)[0]), dtype=torch.float32))
            z = g.op("Constant", value_t=torch.from_numpy(zero_point.reshape(-1)[:1].reshape(()).copy()))
            return g.op("DequantizeLinear", q, s, z)
        return g.op("DequantizeLinear", q, s, z, axis_i=axis)


class _QDQActivation(torch.autograd.Function):
    """``[Clip] → QuantizeLinear → DequantizeLinear`` with constant per-tensor scale and zero point."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, symmetric):
        z = int(zero_point)
        return torch.fake_quantize_per_tensor_affine(x, float(scale), z, qmin, qmax)

    @staticmethod
    def symbolic(g, x, scale, zero_point, qmin, qmax, symmetric):
        cmin, cmax = _container(symmetric)
        zdtype = torch.int8 if symmetric else torch.uint8
        if (qmin, qmax) != (cmin, cmax):
            lo = g.op("Constant", value_t=torch.tensor((qmin - zero_point) * scale, dtype=torch.float32))
            hi = g.op("Constant", value_t=torch.tensor((qmax - zero_point) * scale, dtype=torch.float32))
            x = g.op("Clip", x, lo, hi)
        s = g.op("Constant", value_t=torch.tensor(float(scale), dtype=torch.float32))
        z = g.op("Constant", value_t=torch.tensor(int(zero_point), dtype=zdtype))
        return g.op("DequantizeLinear", g.op("QuantizeLinear", x, s, z), s, z)


def export_forward(q, x: torch.Tensor) -> torch.Tensor:
    """The export-time function of fake quantizer ``q`` on ``x`` (see the module docstring)."""
    scale, zp = _scale_zp(q)
    if torch.onnx.is_in_onnx_export():
        if q.role == "weight":
            codes = weight_codes(q, x)
            axis = q.channel_axis if q.per_channel else 0
            zdtype = np.int8 if q.symmetric else np.uint8
            return _DequantizedWeight.apply(
                x, codes, scale.cpu().numpy().astype(np.float32), zp.cpu().numpy().astype(zdtype), axis
            )
        if q.per_channel:
            raise NotImplementedError(
                f"per-channel activation quantizers ({q.extra_repr()}) have no constant QuantizeLinear form here"
            )
        return _QDQActivation.apply(x, float(scale.reshape(-1)[0]), int(zp.reshape(-1)[0]), q.qmin, q.qmax, q.symmetric)
    # 8-bit FakeQuantize (255 levels symmetric, 256 asymmetric: what OpenVINO's CPU plugin runs as i8/u8);
    # a narrower range is a clamp to it first, so 4-bit codes run exactly in int8 instead of falling back to float.
    qmin, qmax = (-127, 127) if q.symmetric else (0, 255)
    if q.bits < 8:
        lo, hi = (q.qmin - zp) * scale, (q.qmax - zp) * scale
        if q.per_channel:
            shape = [1] * x.dim()
            shape[q.channel_axis] = -1
            lo, hi = lo.reshape(shape), hi.reshape(shape)
        x = torch.clamp(x, lo, hi)
    if q.per_channel:
        return torch.fake_quantize_per_channel_affine(x, scale, zp.to(torch.int32), q.channel_axis, qmin, qmax)
    return torch.fake_quantize_per_tensor_affine(x, scale.reshape(()), zp.reshape(()).to(torch.int32), qmin, qmax)


def in_export_trace() -> bool:
    """Whether a model is being traced for export (ONNX or TorchScript/OpenVINO)."""
    return torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()


__all__ = ["export_forward", "weight_codes", "in_export_trace"]
