"""Fake quantizers: uniform integer quantization simulated in floating point.

``q = clamp(round(x / s) + z, qmin, qmax)``, ``x̂ = (q - z) · s``, with a straight-through estimator for
``round``. ``lsq`` learns ``s`` (gradient scaled by ``g = 1/sqrt(N · qmax)``), ``lsq_plus`` also learns ``z``,
``fixed`` keeps the calibrated range. On CPU the training and validation paths use the compiled kernels of
:mod:`detq_hooks.kernels` (one pass forward, one pass backward); without them (no compiler, other devices) the
PyTorch implementation below (:class:`_LSQPerTensor`, PyTorch's per-channel learnable op) runs.
:func:`fake_quantize_reference` is the plain autograd formula both are tested against (and the path used when a
double backward is needed).

Everything a checkpoint needs (scale, zero point, bit width, enabled and initialised flags) is a registered
parameter or buffer, so ``state_dict()`` round trips, EMA copies, pickling and DDP broadcasts carry it.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Optional

import torch
from torch import nn
from torch.nn.modules import module as _torch_module

_state = threading.local()
# Tests switch this off to compare with the PyTorch implementation (the path used when the kernels cannot be built).
_FUSED_ENABLED = True
_NO_GRAD_PATH = True  # activation quantizers without autograd: :func:`_per_tensor_no_grad` (off: benchmarks' A/B)


def _mode() -> str:
    return getattr(_state, "mode", "fused")


@contextlib.contextmanager
def quantizer_mode(mode: str):
    """Switch every :class:`FakeQuantizer` to ``"fused"`` (default), ``"reference"`` (plain autograd,
    supports double backward) or ``"export"`` (ONNX QuantizeLinear/DequantizeLinear friendly ops)."""
    if mode not in ("fused", "reference", "export"):
        raise ValueError(f"quantizer mode {mode!r} is not one of ['fused', 'reference', 'export']")
    previous = _mode()
    _state.mode = mode
    try:
        yield
    finally:
        _state.mode = previous


def quant_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer range: symmetric uses the narrow signed range (±(2^(b-1)-1)) so 0 is exact and the grid is
    symmetric; asymmetric uses the unsigned range [0, 2^b - 1] with a zero point."""
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    # Value exactly round(x) (x - x is exactly 0), gradient 1.
    return torch.round(x).detach() + (x - x.detach())


def _grad_scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    # Value exactly x, gradient `factor`: the reference then divides by the very scale the kernels use.
    xf = x * factor
    return x.detach() + (xf - xf.detach())


def fake_quantize_reference(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    axis: int | None = None,
    grad_factor: float = 1.0,
) -> torch.Tensor:
    """LSQ/LSQ+ fake quantization written with plain autograd ops (the formula of METHODS.md).

    ``axis`` selects per-channel parameters along that dimension of ``x``; ``None`` is per-tensor.
    """
    if axis is not None:
        shape = [1] * x.dim()
        shape[axis] = -1
        scale = scale.reshape(shape)
        zero_point = zero_point.reshape(shape)
    s = _grad_scale(scale, grad_factor)
    z = _round_ste(_grad_scale(zero_point, grad_factor)).clamp(qmin, qmax)
    v = x / s
    code = torch.round(v).detach() + z.detach()
    inside = (code >= qmin) & (code <= qmax)
    # The in/out decision is taken on the exact integer code: an STE sum like (round(v) - v) + v can land a
    # hair outside [qmin, qmax] in float arithmetic and wrongly cut the gradient at the boundary.
    q = torch.where(inside, v + (torch.round(v) - v).detach() + z, code.clamp(qmin, qmax))
    return (q - z) * s


_onnx_exporting = None


def _in_export_trace() -> bool:
    global _onnx_exporting
    if _onnx_exporting is None:  # looked up once: `torch.onnx` is imported lazily, ~1.5 us per attribute access
        _onnx_exporting = torch.onnx.is_in_onnx_export
    return torch.jit.is_tracing() or _onnx_exporting()


def _scalar_bounds(x: torch.Tensor) -> bool:
    """Whether :class:`_LSQPerTensor` may read the zero point as a Python number (no device sync)."""
    return x.device.type == "cpu"


class _ScaleFloor(torch.autograd.Function):
    """``scale.clamp_min(floor)`` whose gradient passes through below the floor too. A learned step size that one
    large optimizer step takes to or below zero would otherwise sit under a plain clamp with no gradient for good,
    quantizing its layer to nothing; with the gradient passing it moves back up as the loss asks."""

    @staticmethod
    def forward(ctx, scale, floor: float):
        return scale.clamp_min(floor)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def learned_scale(scale: torch.Tensor, floor: float = 1e-8) -> torch.Tensor:
    """The step size a quantizer uses: ``scale`` floored at ``floor``, with a straight-through gradient."""
    return _ScaleFloor.apply(scale, floor) if scale.requires_grad else scale.clamp_min(floor)


class _LSQPerTensor(torch.autograd.Function):
    """LSQ/LSQ+ per-tensor fake quantization with few memory passes.

    On CPU the cost of activation fake quantization is dominated by fresh allocations of activation-sized
    buffers, not by arithmetic: PyTorch's fused learnable kernel allocates several. This one allocates the
    output and a boolean mask in forward, and the input gradient plus one buffer in backward, and
    otherwise works in place. Gradients are those of :func:`fake_quantize_reference` (tested).
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin: int, qmax: int, grad_factor: float):
        # 0-dim parameters take PyTorch's fast scalar path (a shape-[1] operand broadcasts, ~2.5x slower).
        z = zero_point.detach().round().clamp(qmin, qmax).reshape(())
        s = scale.detach().reshape(())
        out = x / s
        out.round_()
        if _scalar_bounds(x):
            # The zero point is an integer, so clamp(round(x/s) + z, qmin, qmax) - z equals
            # clamp(round(x/s), qmin - z, qmax - z) exactly. Python-number bounds take the vectorised CPU path,
            # and "unchanged by the clamp" is the in-range mask: 5 passes instead of 9 (~10 % faster).
            # `.item()` would sync an accelerator, so other devices keep the tensor-bound form below.
            zf = float(z)
            clamped = out.clamp(qmin - zf, qmax - zf)
            inside = clamped == out  # NaN compares unequal: outside, as in the form below
            out = clamped.mul_(s)
        else:
            out.add_(z)
            inside = out >= qmin
            inside.logical_and_(out <= qmax)
            out.clamp_(qmin, qmax).sub_(z).mul_(s)
        ctx.save_for_backward(x, out, inside, s)
        ctx.grad_factor = grad_factor
        return out

    @staticmethod
    def backward(ctx, grad):
        x, out, inside, s = ctx.saved_tensors
        grad_x = torch.where(inside, grad, 0.0)
        grad_s = grad_z = None
        if ctx.needs_input_grad[1]:
            # d x_hat / d s = (q - z) - x/s inside the range, (q - z) outside, and (q - z)·s == out, so
            # Σ grad·dx_hat/ds = (Σ grad·out − Σ grad_x·x) / s: two dot products, no activation-sized buffer.
            # The difference of the two float32 sums is taken in float64.
            g = grad.reshape(-1)
            total = torch.dot(g, out.reshape(-1)).double() - torch.dot(grad_x.reshape(-1), x.reshape(-1)).double()
            grad_s = (total / s.double()).float().reshape(1) * ctx.grad_factor
        if ctx.needs_input_grad[2]:
            # d x_hat / d z = 0 inside the range, -s outside.
            grad_z = (-(grad.sum() - grad_x.sum()) * s).reshape(1) * ctx.grad_factor
        return grad_x, grad_s, grad_z, None, None, None


_kernels_module = None


def _kernel_ops():
    global _kernels_module
    if _kernels_module is None:
        from . import kernels

        _kernels_module = kernels
    return _kernels_module.load()


def _fused_ops(x: torch.Tensor):
    """The compiled kernels when they apply to ``x`` (a float32 CPU tensor), else ``None``."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return None
    return _kernel_ops()


def _dense(x: torch.Tensor) -> torch.Tensor:
    """``x`` if its elements fill its memory in some order (contiguous or channels-last), else a contiguous copy:
    the per-tensor kernel then works on the raw storage and its output keeps ``x``'s layout."""
    if x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)) or (
        x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)
    ):
        return x
    return x.contiguous()


def _per_tensor_bounds(scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> tuple[float, float, float]:
    """``(scale, qmin - z, qmax - z)`` as Python numbers, ``z`` the zero point rounded (half to even, as
    ``torch.round``) and clamped: read once each rather than by small tensor ops, which cost about as much as the
    kernel on a small map. A non-finite zero point (a broken range) goes through the tensor ops, as Python's
    ``round`` would raise."""
    z = zero_point.item()  # .item() reads a one-element tensor of any shape, grad or not, in one call
    if math.isfinite(z):
        z = float(min(max(round(z), qmin), qmax))
    else:
        z = float(zero_point.detach().round().clamp(qmin, qmax).reshape(()))
    return scale.item(), qmin - z, qmax - z


def fake_quantize_fused(x, scale, zero_point, qmin: int, qmax: int, axis: int | None, grad_factor: float,
                        floor: float = -math.inf):
    """The compiled kernels' fake quantization (float32 CPU), or ``None`` when they are not available.

    ``floor``: the scale is used as ``max(scale, floor)`` with the gradient passed straight through to ``scale``
    (:func:`learned_scale` done inside the kernel call). Without autograd (``no_grad``, or nothing requires a
    gradient) only the output is computed: one pass, no state.
    """
    ops = _fused_ops(x)
    if ops is None or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return None
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad or zero_point.requires_grad)
    if axis is None:
        if needs_grad:
            # One op with its own C++ autograd node (csrc/fakequant.cpp, PerTensorFQ): forward one pass writing the
            # output and a 2-byte state per element (the in-range rounding residual, or which side it was clipped
            # to), backward one pass giving the input, scale and offset gradients; the bounds are read in C++.
            return ops.fq_per_tensor(x, scale, zero_point, qmin, qmax, grad_factor, floor)
        s, lo, hi = _per_tensor_bounds(scale, zero_point, qmin, qmax)
        return ops.per_tensor_fwd(_dense(x), max(s, floor), lo, hi, False)[0]
    axis = axis % x.dim()
    if needs_grad:
        # PerChannelFQ: keeps the weight (no copy) and the per-channel bounds; its backward recomputes the residual.
        return ops.fq_per_channel(x, scale, zero_point, qmin, qmax, axis, grad_factor, floor)
    return ops.per_channel_q_fwd(x.contiguous(), scale.detach(), zero_point.detach(), qmin, qmax, axis, floor,
                                 False)[0]


def _global_module_hooks() -> bool:
    return bool(_torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks)


_SCALE_FLOOR = float(torch.tensor(1e-8))  # learned_scale's floor as the float32 the other paths compute with


def _per_tensor_no_grad(ops, q: "FakeQuantizer", x: torch.Tensor, reuse_buffer: bool = False) -> torch.Tensor:
    """Per-tensor fake quantization without autograd (validation, inference): one kernel call on the quantizer's
    own parameters, skipping the floored-scale and dtype tensors the autograd path builds first (a validation
    pass calls each activation quantizer once per batch). With ``reuse_buffer`` a large output goes into this
    thread's reused buffer (:meth:`FakeQuantizer.quantize_transient`)."""
    s, lo, hi = _per_tensor_bounds(q.scale, q.zero_point, q.qmin, q.qmax)
    s = max(s, _SCALE_FLOOR)
    x = _dense(x)
    if not reuse_buffer or x.numel() < _SCRATCH_MIN_ELEMENTS:
        return ops.per_tensor_fwd(x, s, lo, hi, False)[0]
    out = _scratch_like(x)
    ops.per_tensor_fwd_out(x, out, s, lo, hi)
    return out


class _Scratch(threading.local):
    buffer: Optional[torch.Tensor] = None


_SCRATCH = _Scratch()
# Inputs smaller than this are quantized into fresh memory: an allocation of a small tensor is cheap and served
# from the allocator's free lists, while a large one is a fresh mapping whose pages fault in on first write.
_SCRATCH_MIN_ELEMENTS = 1 << 16


def _scratch_like(x: torch.Tensor) -> torch.Tensor:
    """A tensor with ``x``'s sizes and strides (``x`` dense) in this thread's reused buffer."""
    n = x.numel()
    buf = _SCRATCH.buffer
    # An inference tensor (made under torch.inference_mode) is not reused outside that mode, nor a normal one in it.
    if (buf is None or buf.numel() < n or buf.device != x.device or buf.dtype != x.dtype
            or buf.is_inference() != torch.is_inference_mode_enabled()):
        _SCRATCH.buffer = None  # the old one is freed before the larger one is allocated
        buf = _SCRATCH.buffer = torch.empty(n, dtype=x.dtype, device=x.device)
    return buf.as_strided(x.shape, x.stride())


def release_scratch() -> None:
    """Free this thread's buffer of transient quantized inputs (training does, it has no use for it)."""
    _SCRATCH.buffer = None


class FakeQuantizer(nn.Module):
    """Integer fake quantization of a weight or an activation tensor.

    Args:
        bits: bit width (2..8).
        symmetric: symmetric signed range with zero point 0, else unsigned with a zero point.
        per_channel: one (scale, zero point) per slice along ``channel_axis``.
        num_channels: number of those slices (1 for per-tensor).
        channel_axis: the channel dimension of the quantized tensor.
        kind: ``lsq``, ``lsq_plus`` or ``fixed``.
        role: ``weight`` or ``activation`` (for reports and calibration).

    Example:
        >>> q = FakeQuantizer(bits=4, symmetric=True, role="weight")
        >>> q.set_range(torch.tensor([-1.0]), torch.tensor([1.0]))
        >>> q(torch.tensor([0.33, 2.0]))
        tensor([0.2857, 1.0000], grad_fn=<...>)
    """

    def __init__(
        self,
        *,
        bits: int,
        symmetric: bool,
        per_channel: bool = False,
        num_channels: int = 1,
        channel_axis: int = 0,
        kind: str = "lsq",
        role: str = "activation",
    ) -> None:
        super().__init__()
        if kind not in ("lsq", "lsq_plus", "fixed"):
            raise ValueError(f"`kind` = {kind!r} is not one of ['lsq', 'lsq_plus', 'fixed']")
        if not 2 <= int(bits) <= 8:
            raise ValueError(f"`bits` = {bits!r} must be in [2, 8]")
        if kind == "lsq_plus" and symmetric:
            raise ValueError("`kind` = 'lsq_plus' learns an offset and needs symmetric=False")
        n = num_channels if per_channel else 1
        self.symmetric = bool(symmetric)
        self.per_channel = bool(per_channel)
        self.channel_axis = int(channel_axis)
        self.kind = kind
        self.role = role
        scale = torch.ones(n)
        zero_point = torch.zeros(n)
        if kind == "fixed":
            self.register_buffer("scale", scale)
        else:
            self.scale = nn.Parameter(scale)
        if kind == "lsq_plus":
            self.zero_point = nn.Parameter(zero_point)
        else:
            self.register_buffer("zero_point", zero_point)
        # Integer buffers: saved in checkpoints, skipped by float-only EMA updates, kept by .half(), and of
        # dtypes every DDP backend can broadcast (gloo has no bool or int16).
        self.register_buffer("bits_state", torch.tensor(int(bits), dtype=torch.int32))
        self.register_buffer("enabled_state", torch.tensor(1, dtype=torch.uint8))
        self.register_buffer("initialized_state", torch.tensor(0, dtype=torch.uint8))
        # Python mirrors of the buffers: read in every forward without a device sync.
        self._bits = int(bits)
        self._enabled = True
        self._initialized = False
        self.observer = None  # set only while calibrating

    # ----------------------------------------------------------------- state
    @property
    def bits(self) -> int:
        return self._bits

    @bits.setter
    def bits(self, value: int) -> None:
        if isinstance(value, bool) or not 2 <= int(value) <= 8:
            raise ValueError(f"`bits` = {value!r} must be an integer in [2, 8]")
        self._bits = int(value)
        self.bits_state.fill_(int(value))

    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._enabled = bool(value)
        self.enabled_state.fill_(int(bool(value)))

    @property
    def initialized(self) -> bool:
        return self._initialized

    @initialized.setter
    def initialized(self, value: bool) -> None:
        self._initialized = bool(value)
        self.initialized_state.fill_(int(bool(value)))

    @property
    def qmin(self) -> int:
        return quant_range(self._bits, self.symmetric)[0]

    @property
    def qmax(self) -> int:
        return quant_range(self._bits, self.symmetric)[1]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        key = prefix + "bits_state"
        if key in state_dict and int(state_dict[key]) != self._bits:
            error_msgs.append(
                f"quantizer {prefix[:-1]!r}: the checkpoint was quantized with {int(state_dict[key])} bits but this "
                f"model has {self._bits}; build the model with the recipe the checkpoint was trained with"
            )
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        self._bits = int(self.bits_state)
        self._enabled = bool(self.enabled_state)
        self._initialized = bool(self.initialized_state)

    def __setstate__(self, state):
        super().__setstate__(state)
        # Pickles made by deepcopy/torch.save carry the mirrors; re-derive them from buffers to be safe.
        if "_buffers" in state and "bits_state" in self._buffers:
            self._bits = int(self._buffers["bits_state"])
            self._enabled = bool(self._buffers["enabled_state"])
            self._initialized = bool(self._buffers["initialized_state"])

    # ----------------------------------------------------------------- ranges
    @torch.no_grad()
    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Set scale and zero point from a real range ``[lo, hi]`` (per channel or per tensor)."""
        lo = torch.as_tensor(lo, dtype=torch.float32).reshape(-1).to(self.scale.device)
        hi = torch.as_tensor(hi, dtype=torch.float32).reshape(-1).to(self.scale.device)
        if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            raise ValueError(f"non-finite range [{lo.min().item()}, {hi.max().item()}] for a {self.role} quantizer")
        qmin, qmax = self.qmin, self.qmax
        if self.symmetric:
            amax = torch.maximum(lo.abs(), hi.abs())
            scale = amax / qmax
            zp = torch.zeros_like(scale)
        else:
            lo = torch.minimum(lo, torch.zeros_like(lo))  # 0 must be representable (padding, ReLU)
            hi = torch.maximum(hi, torch.zeros_like(hi))
            scale = (hi - lo) / float(qmax - qmin)
            zp = (qmin - lo / scale.clamp_min(1e-12)).round().clamp(qmin, qmax)
        scale = scale.clamp_min(1e-8)
        # In place through the parameter (not `.data`) so that the version counter moves: cached quantized
        # weights (modules.py) key on it.
        self.scale.copy_(scale.expand_as(self.scale).to(self.scale.dtype))
        self.zero_point.copy_(zp.expand_as(self.zero_point).to(self.zero_point.dtype))
        self.initialized = True

    def current_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.scale.detach().float()
        z = self.zero_point.detach().float().round()
        return (self.qmin - z) * s, (self.qmax - z) * s

    @property
    def amax(self) -> torch.Tensor:
        """Largest representable magnitude per channel, shaped like the weight's channel dim.

        Ultralytics' ``fuse_conv_and_bn`` rescales ``weight_quantizer.amax`` by the BatchNorm factor when it
        folds BN into a quantized conv; with symmetric per-channel scales this keeps the integer codes, so the
        fused model computes exactly the trained quantized function.
        """
        return self.scale.detach() * self.qmax

    @amax.setter
    def amax(self, value: torch.Tensor) -> None:
        with torch.no_grad():
            self.scale.copy_((value.reshape(-1) / self.qmax).to(self.scale.dtype).clamp_min(1e-8))

    @torch.no_grad()
    def initialize_from(self, x: torch.Tensor) -> None:
        """Range from one tensor when no calibration ran: min/max for asymmetric ranges, the LSQ rule
        ``s = 2·mean(|x|)/sqrt(qmax)`` for symmetric ones. Averaged over ranks under torch.distributed."""
        x = x.detach().float()
        if self.per_channel:
            flat = x.transpose(0, self.channel_axis).reshape(x.shape[self.channel_axis], -1)
            lo, hi = flat.amin(1), flat.amax(1)
            self.set_range(lo, hi)
        elif self.symmetric:
            s = 2 * x.abs().mean() / math.sqrt(self.qmax)
            self.set_range(-s * self.qmax, s * self.qmax)
        else:
            self.set_range(x.amin(), x.amax())
        from .distributed import all_reduce_mean_

        all_reduce_mean_(self.scale.data)
        all_reduce_mean_(self.zero_point.data)
        self.zero_point.round_()

    # ----------------------------------------------------------------- forward
    def quantize_transient(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """``self(x)`` without autograd into a buffer the next call of any quantizer in this thread overwrites,
        or ``None`` where that does not apply (autograd on, hooks, calibration, export, another device or dtype:
        then call the quantizer). For a layer that consumes its quantized input at once: a validation pass then
        reuses one buffer instead of mapping fresh memory for every layer's input, and skips the module call."""
        if not self._plain_no_grad_call(x):
            return None
        ops = _kernel_ops()
        return _per_tensor_no_grad(ops, self, x, reuse_buffer=True) if ops is not None else None

    def _plain_no_grad_call(self, x: torch.Tensor) -> bool:
        """Whether calling the quantizer on ``x`` would be the no-grad kernel and nothing else (see
        :meth:`_plain_kernel_call`); so a caller may compute the same codes its own way."""
        # autograd first: in training it ends the check at once, in every layer's forward
        return not torch.is_grad_enabled() and _NO_GRAD_PATH and self._plain_kernel_call(x)

    def _plain_kernel_call(self, x: torch.Tensor) -> bool:
        """Whether calling the quantizer on ``x`` runs the fused per-tensor kernel on its own range and nothing else,
        with autograd or without: enabled and calibrated, no calibration observer, no hook to see the output, not
        under export, tracing or ``torch.compile``, float32 on CPU in the fused mode."""
        return (_FUSED_ENABLED and not self.per_channel and x.dtype == torch.float32 and x.device.type == "cpu"
                and self._enabled and self._initialized and self.observer is None
                and not (self._forward_hooks or self._forward_pre_hooks) and _mode() == "fused"
                and not _global_module_hooks() and not _in_export_trace() and not torch.compiler.is_compiling())

    def _takes_no_grad_kernel(self, x: torch.Tensor, mode: str) -> bool:
        """Whether ``x`` goes through :func:`_per_tensor_no_grad`: no autograd, per tensor, float32 on CPU, the
        fused mode (the compiled kernels, where they built, are then the whole computation)."""
        return (not torch.is_grad_enabled() and _FUSED_ENABLED and _NO_GRAD_PATH and mode == "fused"
                and not self.per_channel and x.dtype == torch.float32 and x.device.type == "cpu"
                and not torch.compiler.is_compiling())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._enabled:
            return x
        if self.observer is not None:  # calibration: observe the float tensor, pass it through unchanged
            self.observer.observe(x)
            return x
        if not self._initialized:
            self.initialize_from(x)
        mode = _mode()
        if mode == "export" or _in_export_trace():
            from .qdq import export_forward  # integer constants under ONNX export, FakeQuantize elsewhere

            out = export_forward(self, x.float())
            return out if x.dtype == torch.float32 else out.to(x.dtype)
        if self._takes_no_grad_kernel(x, mode):
            ops = _kernel_ops()
            if ops is not None:  # validation, inference
                return _per_tensor_no_grad(ops, self, x)
        if _SCRATCH.buffer is not None and torch.is_grad_enabled():
            release_scratch()  # training resumed after validation: give its buffer back
        dtype = x.dtype
        xf = x.float()
        raw_scale = self.scale.float()
        zero_point = self.zero_point.float()
        qmin, qmax = self.qmin, self.qmax
        n = max(1, xf.numel() // raw_scale.numel())
        grad_factor = 1.0 / math.sqrt(n * qmax)
        axis = self.channel_axis if self.per_channel else None
        out = None
        if mode != "reference" and _FUSED_ENABLED:  # the compiled kernels (None where they do not apply)
            out = fake_quantize_fused(xf, raw_scale, zero_point, qmin, qmax, axis, grad_factor, floor=_SCALE_FLOOR)
        if out is not None:
            return out if dtype == torch.float32 else out.to(dtype)
        scale = learned_scale(raw_scale)
        if mode == "reference":
            out = fake_quantize_reference(xf, scale, zero_point, qmin, qmax, axis, grad_factor)
        if out is None:  # the PyTorch implementation (no compiler, or another device)
            if axis is not None:
                out = torch._fake_quantize_learnable_per_channel_affine(xf, scale, zero_point, axis, qmin, qmax, grad_factor)
            else:
                out = _LSQPerTensor.apply(xf, scale, zero_point, qmin, qmax, grad_factor)
        return out if dtype == torch.float32 else out.to(dtype)

    def extra_repr(self) -> str:
        return (
            f"role={self.role}, bits={self._bits}, {'symmetric' if self.symmetric else 'asymmetric'}, "
            f"{'per_channel(axis=%d)' % self.channel_axis if self.per_channel else 'per_tensor'}, kind={self.kind}, "
            f"enabled={self._enabled}"
        )


@torch.no_grad()
def inside_range_mask(q: "FakeQuantizer", x: torch.Tensor) -> torch.Tensor:
    """Where the straight-through estimator passes the gradient: ``x``'s integer code is inside [qmin, qmax]."""
    s = q.scale.detach().float().clamp_min(1e-8)
    z = q.zero_point.detach().float().round().clamp(q.qmin, q.qmax)
    if q.per_channel:
        shape = [1] * x.dim()
        shape[q.channel_axis] = -1
        s, z = s.reshape(shape), z.reshape(shape)
    code = torch.round(x.float() / s) + z
    return (code >= q.qmin) & (code <= q.qmax)


def iter_quantizers(model: nn.Module):
    """Yield ``(name, quantizer)`` for every :class:`FakeQuantizer` in ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, FakeQuantizer):
            yield name, m


def learned_step_sizes(model: nn.Module) -> list[nn.Parameter]:
    """The step sizes the optimizer trains (LSQ/LSQ+ scales), in a fixed order."""
    return [q.scale for _, q in iter_quantizers(model) if isinstance(q.scale, nn.Parameter) and q.scale.requires_grad]


@torch.no_grad()
def step_size_floors(model: nn.Module, max_shrink: float = 0.5) -> tuple[list[nn.Parameter], list[torch.Tensor]]:
    """Before an optimizer step: the learned step sizes and ``max_shrink`` × their current values, the least
    :func:`keep_step_sizes_positive` lets one step leave them at."""
    scales = learned_step_sizes(model)
    return scales, torch._foreach_mul([s.detach() for s in scales], max_shrink) if scales else []


@torch.no_grad()
def keep_step_sizes_positive(model: nn.Module, floor: float = 1e-8,
                             floors: Optional[tuple[list[nn.Parameter], list[torch.Tensor]]] = None) -> None:
    """After an optimizer step: a learned step size the step took below zero is reflected back (``|s|``, at
    least ``floor``). On a small calibrated scale (1e-5 is common for a weak layer's activations) one SGD step
    of an ordinary learning rate overshoots zero; left there the layer would pass nothing until the gradient
    climbed all the way back. With ``floors`` (:func:`step_size_floors` taken before the step) no step size
    ends the step below half its value before it: an overshoot that lands near zero, on either side, would
    leave the layer as dead as a negative one (seen after one QAT epoch of a tiny YOLO11n: 0.2 dB)."""
    scales = learned_step_sizes(model)
    if not scales:
        return
    # foreach ops over all of them, no host sync
    torch._foreach_abs_(scales)
    if floors is not None and len(floors[0]) == len(scales) and all(a is b for a, b in zip(floors[0], scales)):
        torch._foreach_maximum_(scales, floors[1])
    torch._foreach_clamp_min_(scales, floor)


def quantizer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The learned quantizer parameters (scales, LSQ+ offsets): they get their own optimizer group,
    without weight decay and at ``quantizer_lr_scale`` × the base rate."""
    params, seen = [], set()
    for _, q in iter_quantizers(model):
        for p in q.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


__all__ = [
    "keep_step_sizes_positive",
    "step_size_floors",
    "learned_step_sizes",
    "FakeQuantizer",
    "fake_quantize_reference",
    "quant_range",
    "quantizer_mode",
    "iter_quantizers",
    "inside_range_mask",
    "quantizer_parameters",
]
