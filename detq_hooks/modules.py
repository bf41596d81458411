"""Fake-quant versions of the layers detectors are made of.

Each class subclasses the float layer it replaces, so ``isinstance(m, nn.Conv2d)`` stays true for the
trainer's own code (weight init, BN fusing, parameter grouping) and the parameter names (``weight``,
``bias``) do not change. Two submodules are added: ``weight_quantizer`` (sees the weight the layer really
uses, e.g. after BN folding) and ``input_quantizer`` (the layer's input activation).

Swaps are reversible: ``QuantConv2d.from_float(conv, ...)`` and ``q.to_float()`` keep device, dtype,
parameters (shared, not copied), hooks and any attributes the host framework set on the module.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import threading
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import integer_inference, quantizers
from .quantizers import FakeQuantizer

# Quantized weights reused while the weight, its quantizer's state and the autograd situation are unchanged.
# Kept outside the modules (weak keys) so deepcopy, pickling and state_dict never see them.
_WEIGHT_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
_tokens = itertools.count()


def _clone_into(cls, module: nn.Module) -> nn.Module:
    # Re-class a module without re-initialising it: same parameters, buffers, hooks and attributes.
    new = cls.__new__(cls)
    new.__dict__ = module.__dict__.copy()
    for key in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
        if key in new.__dict__:
            new.__dict__[key] = new.__dict__[key].copy()
    return new


# Subclasses of the float layers whose forward differs only on torch < 1.6 (empty-tensor handling) and is
# therefore the parent's forward here: quantized like the parent, given back as themselves by ``to_float``.
TRANSPARENT_SUBCLASSES = frozenset({
    "mmcv.cnn.bricks.wrappers.Conv2d",
    "mmcv.cnn.bricks.wrappers.Linear",
    "mmcv.cnn.bricks.wrappers.ConvTranspose2d",
})


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def is_swappable(module: nn.Module, base: type[nn.Module]) -> bool:
    """Whether ``module`` (an instance of ``base``) computes exactly ``base``'s function."""
    t = type(module)
    return t is base or (issubclass(t, base) and _qualname(t) in TRANSPARENT_SUBCLASSES)


class _CacheOff(threading.local):
    depth = 0


_CACHE_OFF = _CacheOff()


@contextlib.contextmanager
def uncached_weights():
    """Inside the block every layer runs its weight quantizer at every call (for code that hooks the
    quantizers and must see each call, e.g. Fisher's straight-through linearisation)."""
    _CACHE_OFF.depth += 1
    try:
        yield
    finally:
        _CACHE_OFF.depth -= 1


# ------------------------------------------------------------------ training without keeping the quantized weight
# A convolution or linear layer keeps its weight for backward; with a fake-quant weight that is a fresh tensor
# the size of the parameter, held from the forward to the backward for every layer (all of a detector's
# parameters again: ResNet-18 FCOS 45 MB, YOLO11n 10 MB). The layers below keep the parameter instead (held
# anyway) and quantize it again in their backward: the same kernel on the same values gives the same weight, bit
# for bit, for one extra pass over the weights per layer and step. A layer called several times per step (FCOS's
# shared head) keeps the cached quantized weight instead, so its weight is quantized once per step (see
# quantized_weight). ``DETQ_KEEP_QUANTIZED_WEIGHTS=1`` turns this off.
_RECOMPUTE_WEIGHTS = os.environ.get("DETQ_KEEP_QUANTIZED_WEIGHTS", "") in ("", "0")


class _BackwardCount(threading.local):
    value = 0  # backward passes through a layer below; a layer called twice between two of them is shared


_BACKWARDS = _BackwardCount()
_LAST_CALL: "weakref.WeakKeyDictionary[nn.Module, int]" = weakref.WeakKeyDictionary()
# the image layer's step-size gradient is zero without a convolution when the image lies on its quantizer's grid
# (``_ConvRecomputed``); a switch for benchmarks and tests
_SKIP_ZERO_TANGENTS = True
_SHARED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
# the recomputed-weight layers as compiled nodes (``conv2d_recomputed_weight``, ``linear_recomputed_weight``) rather than
# ``_ConvRecomputed`` / ``_LinearRecomputedWeight``: the same arithmetic without the Python Functions' interpreter time
# (about 90 us per layer and step); a switch for tests
_COMPILED_NODES = True


def _backward_count() -> int:
    """Backward passes so far through the layers that quantize their weight again there: ``_ConvRecomputed`` and
    ``_LinearRecomputedWeight`` (Python) and the compiled ``conv2d_recomputed_weight`` / ``linear_recomputed_weight``
    nodes."""
    ops = quantizers._kernel_ops()
    return _BACKWARDS.value + (ops.backward_count() if ops is not None else 0)


def _weight_args(layer) -> tuple:
    """What the weight quantizer's kernel takes besides the weight: scale, zero point, and the fixed arguments."""
    wq = layer.weight_quantizer
    n = max(1, layer.weight.numel() // wq.scale.numel())
    return (wq.scale, wq.zero_point.float()), (wq.qmin, wq.qmax, wq.channel_axis, 1.0 / math.sqrt(n * wq.qmax),
                                               quantizers._SCALE_FLOOR)


def _no_double_backward() -> None:
    if torch.is_grad_enabled():  # backward(create_graph=True) runs in grad mode
        raise RuntimeError("a quantized layer's memory-saving backward has no double backward; run it under "
                           "detq_hooks.quantizers.quantizer_mode('reference') (as the Fisher methods do) or set "
                           "DETQ_KEEP_QUANTIZED_WEIGHTS=1")
    _BACKWARDS.value += 1


def _weight_again(ctx) -> tuple:
    """What both layers' backward start from: the saved input, the weight quantized again (the forward's kernel on
    the same values: bit for bit the forward's weight; without ``ctx.fixed`` the saved weight is the quantized one)
    and the saved (weight, scale, zero point)."""
    _no_double_backward()
    x, weight, scale, zero_point = ctx.saved_tensors
    wq = weight if ctx.fixed is None else quantizers.fake_quantize_fused(weight, scale, zero_point, *ctx.fixed)
    return x, wq, (weight, scale, zero_point)


def _weight_backward(ctx, grad_wq: Optional[torch.Tensor], params: tuple, needs: tuple) -> tuple:
    """The weight quantizer's backward from the weight itself (the kernel that PerChannelFQ's backward runs):
    gradients of weight, scale and zero point (``needs``: which of the three are wanted), ``None`` where not needed."""
    if grad_wq is None or not any(needs):
        return None, None, None
    weight, scale, zero_point = params
    qmin, qmax, axis, grad_factor, floor = ctx.fixed
    gw, gs, gz = quantizers._kernel_ops().per_channel_q_bwd(grad_wq, weight, scale.detach(), zero_point.detach(), qmin,
                                                            qmax, axis, grad_factor, floor, needs[0])
    return (gw if needs[0] else None, gs.reshape(scale.shape) if needs[1] else None,
            gz.reshape(zero_point.shape) if needs[2] else None)


class _ConvRecomputed(torch.autograd.Function):
    """``conv2d(xq, Q(w))`` keeping for backward what is held anyway, and computing the rest again in backward:

    - with ``fixed`` (the weight quantizer's arguments), the parameter ``w`` rather than ``Q(w)``; without, ``weight``
      is the quantized weight already (a shared layer's cached one) and is kept as is;
    - with ``input_bounds`` (the input quantizer's ``(scale, lo, hi)``), the float input ``x`` that ``xq`` was
      quantized from rather than ``xq``: ``x`` is a ReLU's output, which the ReLU's node keeps anyway, or a tensor
      outside autograd (the image batch). The per-tensor kernel on the same values gives ``xq`` again bit for bit.
    - ``xq`` given: the quantizer's own node (``xq``'s history) gives the input's and the step size's gradients.
      ``xq`` ``None`` (``x`` outside autograd): this node quantizes ``x`` and gives the input quantizer's step-size
      and offset gradients itself (``a_scale``, ``a_zero_point``, ``grad_factor``), without the input gradient a
      float layer never computes there: by linearity ``Σ (conv_wᵀ g) · ∂xq/∂s = Σ g · conv_w(∂xq/∂s)``, a forward
      convolution of the quantizer's tangent (``per_tensor_tangents``) and a dot product. On the 3-channel image
      that replaces a transposed convolution which costs several times the layer's weight gradient.
    """

    @staticmethod
    def forward(ctx, xq, x, weight, scale, zero_point, bias, a_scale, a_zero_point, input_bounds, fixed, geometry,
                grad_factor):
        ops = quantizers._kernel_ops()
        ctx.constant_input = xq is None
        if xq is None:
            xq = ops.per_tensor_fwd(x, *input_bounds, False)[0]
        wq = weight if fixed is None else quantizers.fake_quantize_fused(weight, scale, zero_point, *fixed)
        stride, padding, dilation, groups = geometry
        out = torch.ops.aten.convolution(xq, wq, bias, stride, padding, dilation, False, [0, 0], groups)
        ctx.save_for_backward(xq if input_bounds is None else x, weight, scale, zero_point)
        ctx.input_bounds, ctx.fixed, ctx.geometry, ctx.grad_factor = input_bounds, fixed, geometry, grad_factor
        ctx.bias_sizes = None if bias is None else [bias.shape[0]]
        ctx.input_parameter_shapes = (None if a_scale is None else a_scale.shape,
                                      None if a_zero_point is None else a_zero_point.shape)
        return out

    @staticmethod
    def backward(ctx, grad):
        kept, wq, params = _weight_again(ctx)
        ops = quantizers._kernel_ops()
        xq = kept if ctx.input_bounds is None else ops.per_tensor_fwd(kept, *ctx.input_bounds, False)[0]
        needs = ctx.needs_input_grad
        stride, padding, dilation, groups = ctx.geometry
        grad_xq, grad_wq, grad_b = torch.ops.aten.convolution_backward(
            grad, xq, wq, ctx.bias_sizes, stride, padding, dilation, False, [0, 0], groups,
            [needs[0] and not ctx.constant_input, any(needs[2:5]), needs[5]])
        if ctx.fixed is None:
            weight_grads = (grad_wq if needs[2] else None, None, None)
        else:
            weight_grads = _weight_backward(ctx, grad_wq, params, needs[2:5])
        grad_s = grad_z = None
        if ctx.constant_input and (needs[6] or needs[7]):
            ds, dz, any_nan, on_grid = ops.per_tensor_tangents(kept, *ctx.input_bounds, needs[7])
            if on_grid and _SKIP_ZERO_TANGENTS:
                # every input on the grid and in range (8-bit images at 1/255): the tangent is zero but for the
                # rounding of x / s, so the gradients are 0 (not a convolution of rounding noise), or NaN where a
                # weight or gradient is not finite, as that convolution's dot product would be
                zero = 0.0 if bool(torch.isfinite(grad).all()) and bool(torch.isfinite(wq).all()) else math.nan
                grad_s = grad.new_full(ctx.input_parameter_shapes[0], zero) if needs[6] else None
                grad_z = grad.new_full(ctx.input_parameter_shapes[1], zero) if needs[7] else None
            else:
                tangents = torch.cat([ds, dz]) if needs[7] else ds  # one convolution for both
                t = torch.ops.aten.convolution(tangents, wq.detach(), None, stride, padding, dilation, False, [0, 0],
                                               groups)
                n = grad.shape[0]
                if needs[6]:
                    grad_s = (_dot(grad, t[:n]) * ctx.grad_factor).reshape(ctx.input_parameter_shapes[0])
                    if any_nan:  # as the quantizer's kernels: a NaN input makes the step size's gradient NaN
                        grad_s = torch.full_like(grad_s, math.nan)
                if needs[7]:
                    grad_z = (_dot(grad, t[n:]) * ctx.grad_factor).reshape(ctx.input_parameter_shapes[1])
        return (grad_xq if needs[0] and not ctx.constant_input else None, None, *weight_grads, grad_b, grad_s, grad_z,
                None, None, None, None)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a * b).sum()`` of two tensors of one shape, summed in float64 in chunks without an ``a * b`` buffer where
    both lay their elements out alike (contiguous or channels-last)."""
    if a.stride() == b.stride() and quantizers._dense(a) is a and quantizers._dense(b) is b:
        # the same dense layout: the flat storages pair element for element
        fa, fb = a.as_strided((a.numel(),), (1,)), b.as_strided((b.numel(),), (1,))
        chunk, n = 1 << 14, fa.numel()
        k = n // chunk  # float32 dot products of chunks (ATen's cascade sums in one call), added in float64
        total = torch.linalg.vecdot(fa[:k * chunk].view(k, chunk), fb[:k * chunk].view(k, chunk)).double().sum()
        return (total + torch.linalg.vecdot(fa[k * chunk:], fb[k * chunk:]).double()).float()
    return (a.double() * b.double()).sum().float()


class _LinearRecomputedWeight(torch.autograd.Function):
    """``linear(x, Q(w))`` keeping ``x`` and ``w`` for backward, not ``Q(w)``."""

    @staticmethod
    def forward(ctx, x, weight, scale, zero_point, bias, fixed):
        wq = quantizers.fake_quantize_fused(weight, scale, zero_point, *fixed)
        ctx.save_for_backward(x, weight, scale, zero_point)
        ctx.fixed, ctx.has_bias = fixed, bias is not None
        # F.linear's output for a batched input is a view of its 2-D product, and a custom Function's output must not
        # be a view (an in-place op after it, a transformer's dropout or ReLU, would be refused): the product is
        # written into a fresh tensor of the output's shape instead, by the same addmm
        out = x.new_empty(*x.shape[:-1], wq.shape[0])
        flat = x.reshape(-1, x.shape[-1])
        if bias is None:
            torch.mm(flat, wq.t(), out=out.view(-1, wq.shape[0]))
        else:
            torch.addmm(bias, flat, wq.t(), out=out.view(-1, wq.shape[0]))
        return out

    @staticmethod
    def backward(ctx, grad):
        x, wq, params = _weight_again(ctx)
        grad_x = grad.matmul(wq) if ctx.needs_input_grad[0] else None
        flat = grad.reshape(-1, grad.shape[-1])
        grad_wq = flat.t().mm(x.reshape(-1, x.shape[-1])) if any(ctx.needs_input_grad[1:4]) else None
        grad_b = flat.sum(0) if ctx.needs_input_grad[4] and ctx.has_bias else None
        return grad_x, *_weight_backward(ctx, grad_wq, params, ctx.needs_input_grad[1:4]), grad_b, None


class QuantModuleMixin:
    """Shared behaviour of the fake-quant layers."""

    float_class: type[nn.Module]
    weight_channel_axis: int = 0
    weight_quantizer: FakeQuantizer
    input_quantizer: Optional[FakeQuantizer]

    @classmethod
    def from_float(
        cls,
        module: nn.Module,
        *,
        weight_spec: dict,
        input_spec: Optional[dict],
    ) -> "QuantModuleMixin":
        """Build the fake-quant twin of ``module``.

        Args:
            module: the float layer (exactly of type ``cls.float_class``).
            weight_spec: keyword arguments of :class:`FakeQuantizer` for the weight (bits, symmetric, ...).
            input_spec: same for the input activation, or ``None`` to keep the input float.
        """
        if not is_swappable(module, cls.float_class):
            raise TypeError(f"{cls.__name__}.from_float expects exactly {cls.float_class.__name__}, got {type(module).__name__}")
        original_type = type(module)
        weight = module.weight
        axis = cls.weight_channel_axis
        wq = FakeQuantizer(
            per_channel=weight_spec.get("per_channel", True),
            num_channels=weight.shape[axis],
            channel_axis=axis,
            role="weight",
            **{k: v for k, v in weight_spec.items() if k != "per_channel"},
        )
        aq = FakeQuantizer(role="activation", per_channel=False, **input_spec) if input_spec is not None else None
        device = weight.device
        wq.to(device)
        if aq is not None:
            aq.to(device)
        new = _clone_into(cls, module)
        new.weight_quantizer = wq
        new.input_quantizer = aq
        if original_type is not cls.float_class:
            new.detq_float_type = original_type  # to_float gives back e.g. mmcv's Linear wrapper
        return new

    def to_float(self) -> nn.Module:
        """The float layer back: same parameters, quantizers dropped."""
        plain = _clone_into(self.__dict__.get("detq_float_type", self.float_class), self)  # type: ignore[arg-type]
        plain.__dict__.pop("detq_float_type", None)
        plain._modules.pop("weight_quantizer", None)
        plain._modules.pop("input_quantizer", None)
        return plain

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight, computed once per weight update.

        A layer called several times per step (FCOS's head shared over five levels) reuses it within the step:
        autograd then sums the gradients of all uses and runs the quantizer's backward once. Under ``no_grad``
        (validation) it is computed once and reused until the weight or the quantizer changes. The cache entry
        is keyed on the weight tensor and the version counters of the weight, scale and zero point (in-place
        updates by optimizers, EMA, ``load_state_dict`` and ``torch.no_grad`` copies move them), the quantizer's
        bits and flags, the quantizer mode and grad mode; a training entry is dropped as soon as the backward
        pass has gone through it (its graph is then freed). Export, tracing, ``torch.compile`` and
        :func:`uncached_weights` bypass it.
        """
        wq, w = self.weight_quantizer, self.weight  # type: ignore[attr-defined]
        if not self._weight_quantizer_is_plain():
            _WEIGHT_CACHE.pop(self, None)
            return wq(w)
        key = (w._version, wq.scale._version, wq.zero_point._version, wq.bits, torch.is_grad_enabled(),
               torch.is_inference_mode_enabled(), w.dtype, w.device)
        entry = _WEIGHT_CACHE.get(self)
        if (
            entry is not None
            and entry[0] == key
            and entry[1] is w
            and entry[2] is wq.scale
            and entry[3] is wq.zero_point
            and (w.device.type != "cpu" or (torch.equal(entry[4], wq.scale) and torch.equal(entry[5], wq.zero_point)))
        ):
            return entry[6]
        out = wq(w)
        token = next(_tokens)
        on_cpu = w.device.type == "cpu"
        snapshot = (wq.scale.detach().clone(), wq.zero_point.detach().clone()) if on_cpu else (None, None)
        _WEIGHT_CACHE[self] = (key, w, wq.scale, wq.zero_point, *snapshot, out, token)
        if out.requires_grad:
            ref = weakref.ref(self)

            def _drop(grad, ref=ref, token=token):
                m = ref()
                if m is not None and _WEIGHT_CACHE.get(m, (None,) * 8)[7] == token:
                    del _WEIGHT_CACHE[m]
                return grad

            out.register_hook(_drop)
        return out

    def _weight_quantizer_is_plain(self) -> bool:
        """The weight quantizer runs its fused-mode arithmetic as is: enabled, calibrated, not observing, not under
        export, tracing, ``torch.compile`` or :func:`uncached_weights` (what the cache and the recomputation need)."""
        wq = self.weight_quantizer
        return bool(wq.enabled and wq.observer is None and wq.initialized and quantizers._mode() == "fused"
                    and not torch.jit.is_tracing() and not torch.compiler.is_compiling() and not _CACHE_OFF.depth)

    def _recomputes_weight(self, x: torch.Tensor) -> bool:
        """Whether this training call keeps the parameter rather than the quantized weight for backward (see
        ``_ConvRecomputed``): the fused per-channel kernel on float32 CPU tensors, the quantizer called plainly
        (no hooks, observer or export), ``quantized_weight`` not replaced on the layer, and the layer not called
        twice in one step."""
        wq, w = self.weight_quantizer, self.weight  # type: ignore[attr-defined]
        if not (
            _RECOMPUTE_WEIGHTS
            and torch.is_grad_enabled()
            and type(wq) is FakeQuantizer
            and wq.per_channel
            and self._weight_quantizer_is_plain()
            and not wq._forward_hooks
            and not wq._forward_pre_hooks
            and quantizers._FUSED_ENABLED
            and not quantizers._global_module_hooks()
            and not torch.is_inference_mode_enabled()
            and not torch.is_autocast_enabled("cpu")  # autocast picks the convolution's precision: the ordinary path
            and w.dtype == torch.float32
            and x.dtype == torch.float32
            and w.device.type == "cpu"
            and x.device.type == "cpu"
            and quantizers._fused_ops(w) is not None
            and "quantized_weight" not in self.__dict__  # replaced for this layer (AdaRound's soft weight)
        ):
            return False
        if self in _SHARED:  # type: ignore[operator]
            return False
        count = _backward_count()
        if _LAST_CALL.get(self) == count:  # a second call before any backward: a shared layer
            _SHARED.add(self)  # type: ignore[arg-type]
            return False
        _LAST_CALL[self] = count  # type: ignore[index]
        return True

    def _input_bounds_if_kept(self, input: torch.Tensor) -> Optional[tuple[float, float, float]]:
        """The input quantizer's ``(scale, lo, hi)`` when this training call should keep the float ``input`` for
        backward rather than the quantized one (see ``_ConvRecomputed``): ``input`` is held anyway (a ReLU's output,
        which the ReLU's node keeps; a tensor outside autograd, the image batch, which the caller holds), and the
        quantizer would run its plain per-tensor kernel, which then gives the quantized input again bit for bit.
        ``None`` otherwise (the quantized input is kept, as by any convolution)."""
        q = self.input_quantizer
        if not (
            _RECOMPUTE_WEIGHTS
            and torch.is_grad_enabled()
            # first, as the most selective: a SiLU keeps its input, not its output, so YOLO's layers stop here
            and (type(input.grad_fn).__name__ == "ReluBackward0" or (input.grad_fn is None and not input.requires_grad))
            and type(q) is FakeQuantizer
            and q._plain_kernel_call(input)
            and not torch.is_inference_mode_enabled()
            and not torch.is_autocast_enabled("cpu")
            and self.weight.dtype == torch.float32  # type: ignore[attr-defined]
            and quantizers._dense(input) is input
            and input._base is None
            and quantizers._fused_ops(input) is not None
        ):
            return None
        s, lo, hi = quantizers._per_tensor_bounds(q.scale, q.zero_point, q.qmin, q.qmax)
        return max(s, quantizers._SCALE_FLOOR), lo, hi

    def _quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        q = self.input_quantizer
        if q is None:
            return x
        # Without autograd the quantized input lives only until this layer's op has read it: it goes into the
        # quantizers' reused buffer (``None`` where that does not apply). Other input quantizers (a sparse-outlier
        # wrapper) are called as modules.
        out = q.quantize_transient(x) if type(q) is FakeQuantizer else None
        return out if out is not None else q(x)


class QuantConv2d(QuantModuleMixin, nn.Conv2d):
    float_class = nn.Conv2d
    weight_channel_axis = 0

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():  # inference: an int8 convolution where the CPU has one (integer_inference.py)
            out = integer_inference.conv2d(self, input)
            if out is not None:
                return out
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            return self._conv_forward(self._quantize_input(input), self.quantized_weight(), self.bias)
        input_bounds = self._input_bounds_if_kept(input)
        constant_input = input_bounds is not None and input.grad_fn is None
        x = None if constant_input else self._quantize_input(input)  # None: _ConvRecomputed quantizes the image
        recomputes_weight = self._recomputes_weight(input)  # reads x's dtype and device only: input's
        if recomputes_weight and not constant_input and _COMPILED_NODES:
            # an input with its own autograd history (quantized, or a ReLU's output kept in float) as one compiled node
            (scale, zero_point), (qmin, qmax, _, grad_factor, floor) = _weight_args(self)
            return quantizers._kernel_ops().conv2d_recomputed_weight(
                x, self.weight, scale, zero_point, self.bias, qmin, qmax, grad_factor, floor, self.stride,
                self.padding, self.dilation, self.groups, None if input_bounds is None else input,
                () if input_bounds is None else input_bounds)
        if recomputes_weight or input_bounds is not None:
            if recomputes_weight:
                weight, (scale_zp, fixed) = self.weight, _weight_args(self)
            else:
                weight, scale_zp, fixed = self.quantized_weight(), (None, None), None
            q = self.input_quantizer
            input_parameters, grad_factor = (None, None), None
            if constant_input:
                input_parameters = (q.scale, q.zero_point)
                grad_factor = 1.0 / math.sqrt(max(1, input.numel()) * q.qmax)  # the quantizer's own (LSQ)
            return _ConvRecomputed.apply(x, None if input_bounds is None else input.detach(), weight, *scale_zp,
                                         self.bias, *input_parameters, input_bounds, fixed,
                                         (self.stride, self.padding, self.dilation, self.groups), grad_factor)
        return self._conv_forward(x, self.quantized_weight(), self.bias)


class QuantLinear(QuantModuleMixin, nn.Linear):
    float_class = nn.Linear
    weight_channel_axis = 0

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():  # inference: an int8 matrix product where the CPU has one
            out = integer_inference.linear(self, input)
            if out is not None:
                return out
        x = self._quantize_input(input)
        if self._recomputes_weight(x):
            scale_zp, fixed = _weight_args(self)
            if _COMPILED_NODES:  # the same arithmetic as one compiled node
                qmin, qmax, _, grad_factor, floor = fixed
                return quantizers._kernel_ops().linear_recomputed_weight(x, self.weight, *scale_zp, self.bias, qmin,
                                                                          qmax, grad_factor, floor)
            return _LinearRecomputedWeight.apply(x, self.weight, *scale_zp, self.bias, fixed)
        return F.linear(x, self.quantized_weight(), self.bias)


class QuantConvTranspose2d(QuantModuleMixin, nn.ConvTranspose2d):
    float_class = nn.ConvTranspose2d
    weight_channel_axis = 1  # weight is (in, out/groups, kh, kw)

    def forward(self, input: torch.Tensor, output_size: Optional[list[int]] = None) -> torch.Tensor:
        output_padding = self._output_padding(
            input, output_size, self.stride, self.padding, self.kernel_size, 2, self.dilation  # type: ignore[arg-type]
        )
        return F.conv_transpose2d(
            self._quantize_input(input),
            self.quantized_weight(),
            self.bias,
            self.stride,
            self.padding,
            output_padding,
            self.groups,
            self.dilation,
        )


QUANT_MODULES: dict[type[nn.Module], type[QuantModuleMixin]] = {
    nn.Conv2d: QuantConv2d,
    nn.Linear: QuantLinear,
    nn.ConvTranspose2d: QuantConvTranspose2d,
}
FLOAT_TYPE_NAMES = {cls.__name__: cls for cls in QUANT_MODULES}


def is_quantized_module(module: nn.Module) -> bool:
    return isinstance(module, QuantModuleMixin)


def quantized_layers(model: nn.Module) -> list[tuple[str, QuantModuleMixin]]:
    """``(name, layer)`` of every fake-quant layer of ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if is_quantized_module(m)]  # type: ignore[misc]


__all__ = [
    "QuantModuleMixin",
    "QuantConv2d",
    "QuantLinear",
    "QuantConvTranspose2d",
    "QUANT_MODULES",
    "TRANSPARENT_SUBCLASSES",
    "is_quantized_module",
    "is_swappable",
]
