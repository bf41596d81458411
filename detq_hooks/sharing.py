"""One activation quantizer per tensor (``quantization.shared_activations``).

Each quantized layer quantizes its own input, so a tensor that two layers read, or the parts of a ``Concat``,
get quantizers with different scales. An integer runtime then has to keep that tensor in float and quantize it
once per reader: OpenVINO leaves a standalone ``FakeQuantize`` beside the convolution it could have fused, and
onnxruntime keeps the SiLU before it in float. With ``shared_activations`` the layers whose inputs are one tensor,
views of one tensor (``Split``/``chunk``/slices), or are joined by a selection that commutes with per-tensor
quantization (``Concat``, max pooling, nearest upsampling) share one input quantizer: one scale, trained as one.
The export then puts one ``QuantizeLinear`` on each such tensor where it is produced (:func:`detq_hooks.onnx_graph.
share_activation_qdq`), exactly the model that was trained.

The groups come from one forward pass: a :class:`~torch.overrides.TorchFunctionMode` links the inputs and outputs of
those selections, tensors are identified by their storage (views share it) and version (an in-place update makes a
new value), and each quantized layer's input is looked up. Only quantizers of the same kind are tied.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from scipy.cluster.hierarchy import DisjointSet
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .modules import quantized_layers
from .quantizers import FakeQuantizer

_JOINS = {torch.cat, torch.concat, torch.concatenate, torch.stack}


def _is_selection(func, args, kwargs) -> bool:
    """Ops whose output values are input values, so quantizing before or after gives the same result."""
    name = getattr(func, "__name__", "")
    if "max_pool" in name:
        return True
    if func is F.interpolate:
        mode = kwargs.get("mode", args[3] if len(args) > 3 else "nearest")
        return mode == "nearest"
    return False


class _Flow(TorchFunctionMode):
    """Records which tensors are one quantization domain during a forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.sets = DisjointSet()
        self.alive: list[torch.Tensor] = []  # held so that no storage is freed and reused during the pass

    def key(self, t: torch.Tensor):
        self.alive.append(t)
        k = (t.untyped_storage().data_ptr(), t._version)
        self.sets.add(k)
        return k

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _JOINS:
            parts = args[0] if args else kwargs.get("tensors", ())
            if isinstance(out, torch.Tensor):
                for p in parts:
                    if isinstance(p, torch.Tensor):
                        self.sets.merge(self.key(out), self.key(p))
        elif args and isinstance(args[0], torch.Tensor) and _is_selection(func, args, kwargs):
            first = out[0] if isinstance(out, tuple) else out  # max_pool with return_indices
            if isinstance(first, torch.Tensor):
                self.sets.merge(self.key(first), self.key(args[0]))
        return out


def _spec(q: FakeQuantizer) -> tuple:
    return (type(q), q.bits, q.symmetric, getattr(q, "kind", None), q.enabled)


def input_groups(model: nn.Module, run: Callable[[nn.Module], Any]) -> list[list[str]]:
    """Names of the quantized layers whose input quantizers can be one, in groups of two or more (module
    order); ``run(model)`` runs one forward pass. The quantizers are off during the pass (nothing is observed
    or initialised) and every module's train/eval mode is kept."""
    layers = [(n, m) for n, m in quantized_layers(model) if isinstance(m.input_quantizer, FakeQuantizer)]
    flow = _Flow()
    reads: dict[str, list] = {}

    def reader(name):
        def hook(_module, args):
            if args and isinstance(args[0], torch.Tensor):
                reads.setdefault(name, []).append(flow.key(args[0]))
        return hook

    quantizers = {id(q): q for _, m in quantized_layers(model) for q in (m.weight_quantizer, m.input_quantizer)
                  if q is not None}
    enabled = {k: q.enabled for k, q in quantizers.items()}
    handles = [m.register_forward_pre_hook(reader(n)) for n, m in layers]
    modes = [(m, m.training) for m in model.modules()]  # each module's own (frozen BatchNorm stays in eval)
    try:
        for q in quantizers.values():
            q.enabled = False
        model.eval()
        with torch.no_grad(), flow:
            run(model)
    finally:
        for h in handles:
            h.remove()
        for k, q in quantizers.items():
            q.enabled = enabled[k]
        for m, training in modes:
            m.training = training
    for keys in reads.values():  # a layer called on several tensors (a head shared over levels) quantizes all
        for k in keys[1:]:
            flow.sets.merge(keys[0], k)
    groups: dict = {}
    specs = {n: _spec(m.input_quantizer) for n, m in layers}
    for n, _ in layers:
        if n in reads:
            groups.setdefault((flow.sets[reads[n][0]], specs[n]), []).append(n)
    return [g for g in groups.values() if len(g) > 1]


def tie_inputs(model: nn.Module, leaders: Mapping[str, str]) -> int:
    """Make each layer named in ``leaders`` read its input through its leader's input quantizer (one module,
    one scale). All or nothing: an unknown or unquantized name raises ``ValueError`` before anything changes.
    Returns the number of layers tied."""
    layers = dict(quantized_layers(model))
    for name, leader in leaders.items():
        for n in (name, leader):
            if n not in layers or layers[n].input_quantizer is None:
                raise ValueError(f"shared input quantizer: layer {n!r} is not a quantized layer with an input "
                                 "quantizer in this model")
    for name, leader in leaders.items():
        layers[name].input_quantizer = layers[leader].input_quantizer
    return len(leaders)


def share_inputs(model: nn.Module, run: Callable[[nn.Module], Any]) -> int:
    """Find the groups with one forward pass (:func:`input_groups`) and tie each to its first layer."""
    leaders = {n: g[0] for g in input_groups(model, run) for n in g[1:]}
    return tie_inputs(model, leaders)


def input_leaders(model: nn.Module) -> dict[str, str]:
    """``{layer: leader}`` for every layer whose input quantizer is an earlier layer's (what a checkpoint stores)."""
    first: dict[int, str] = {}
    leaders = {}
    for n, m in quantized_layers(model):
        q = m.input_quantizer
        if q is None:
            continue
        if id(q) in first:
            leaders[n] = first[id(q)]
        else:
            first[id(q)] = n
    return leaders


def is_shared(model: nn.Module) -> bool:
    return bool(input_leaders(model))


__all__ = ["input_groups", "tie_inputs", "share_inputs", "input_leaders", "is_shared"]
