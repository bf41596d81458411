"""Model surgery: swap a float detector's layers for fake-quant ones, in place, all or nothing.

No tracing is involved (detectors break torch.fx): modules are found by name and type and swapped on their
parents, so Ultralytics YOLO, DETR-style transformers and any hand-written model work unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Optional

import torch
from torch import nn

from . import allocator
from .modules import QUANT_MODULES, is_quantized_module, is_swappable, quantized_layers
from .quantizers import FakeQuantizer, iter_quantizers
from .ranges import calibrate_weight_quantizer
from .sharing import tie_inputs
from .sparse import SparseOutlierQuantizer
from .recipe import Recipe, RecipeError, load_recipe

META_ATTR = "_detq_meta"


class QuantizationError(RuntimeError):
    """The model cannot be converted (or reverted) as asked; the model was left as it was."""


@dataclass
class LayerPlan:
    name: str
    type_name: str
    weight_bits: int
    input_bits: Optional[int]
    role: str = "body"  # "first", "prediction" or "body"


@dataclass
class QuantizationPlan:
    layers: list[LayerPlan] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (module name, why it stays float)

    def summary(self) -> str:
        lines = [f"{len(self.layers)} layers quantized, {len(self.skipped)} kept float"]
        for name, why in self.skipped:
            lines.append(f"  float: {name} ({why})")
        return "\n".join(lines)


def _mha_out_projs(model: nn.Module) -> set[str]:
    names = set()
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            names.add(f"{name}.out_proj" if name else "out_proj")
    return names


def plan_quantization(
    model: nn.Module,
    recipe: Recipe,
    *,
    first_layers: Optional[Iterable[str]] = None,
    prediction_layers: Optional[Iterable[str]] = None,
    float_layers: Iterable[str] = (),
    layers: Optional[Mapping[str, Mapping]] = None,
) -> QuantizationPlan:
    """Decide, without touching the model, which layers are quantized and with how many bits.

    Args:
        first_layers: names of the layers that see the raw image (default: the first quantizable layer).
        prediction_layers: names of the final prediction layers (adapters know them; default: the last
            quantizable layer). Both get ``first_layer_bits`` / ``prediction_layer_bits`` unless a rule says else.
        float_layers: layers the detector family keeps float whatever the recipe says (e.g. YOLO's fixed DFL
            integral conv); listed in ``skipped``.
        layers: a saved per-layer plan (``{name: {"weight_bits", "input_bits", "role", ...}}``, see
            :func:`detq_hooks.checkpoint.layer_plan`). When given it is the authority: exactly these layers are
            quantized with these bit widths (the recipe's rules are not re-applied), so per-layer bits changed
            after conversion (mixed precision) survive a rebuild. A name the model lacks is an error.
    """
    q = recipe.quantization
    allowed = {n for n in q.module_types}
    float_only = set(float_layers)
    mha_out = _mha_out_projs(model)
    candidates: list[tuple[str, nn.Module]] = []
    plan = QuantizationPlan()
    for name, m in model.named_modules():
        if is_quantized_module(m):
            raise QuantizationError(f"module {name!r} is already quantized by detq-hooks; quantize a float model")
        base = next((b for b in QUANT_MODULES if isinstance(m, b)), None)
        if base is None:
            continue
        if name in mha_out:
            plan.skipped.append((name, "read directly by nn.MultiheadAttention (out_proj.weight); kept float"))
            continue
        if not is_swappable(m, base):
            plan.skipped.append((name, f"{type(m).__name__} subclasses {base.__name__} with its own behaviour"))
            continue
        if name in float_only:
            plan.skipped.append((name, "kept float by the detector family"))
            continue
        if layers is None and base.__name__ not in allowed:
            plan.skipped.append((name, f"{base.__name__} not in quantization.module_types"))
            continue
        candidates.append((name, m))
    if layers is not None:
        return _plan_from_saved(plan, candidates, layers, type(model).__name__)
    if not candidates:
        raise QuantizationError(
            f"no layer of types {sorted(allowed)} found in {type(model).__name__}; nothing to quantize"
        )
    names = [n for n, _ in candidates]
    first = list(first_layers) if first_layers is not None else [names[0]]
    pred = list(prediction_layers) if prediction_layers is not None else [names[-1]]
    for kind, given in (("first_layers", first), ("prediction_layers", pred)):
        missing = [n for n in given if n not in names]
        if missing:
            raise QuantizationError(f"`{kind}` names {missing} that are not quantizable layers of the model")

    for i, rule in enumerate(q.rules):
        if not any(rule.matches(n, type(m).__name__) for n, m in candidates):
            raise RecipeError(
                f"`quantization.rules[{i}]` {rule.to_dict()} matches no quantizable module; "
                f"example module names: {names[:5]}"
            )

    for name, m in candidates:
        type_name = type(m).__name__
        wbits, abits = q.weight.bits, q.activation.bits
        role = "body"
        if name in first and q.first_layer_bits is not None:
            wbits, abits, role = q.first_layer_bits, q.first_layer_bits, "first"
        if name in pred and q.prediction_layer_bits is not None:
            wbits, abits, role = q.prediction_layer_bits, q.prediction_layer_bits, "prediction"
        quantize_it, quantize_input = True, True
        for rule in q.rules:
            if rule.matches(name, type_name):
                quantize_it = rule.quantize
                wbits = rule.weight_bits if rule.weight_bits is not None else wbits
                abits = rule.activation_bits if rule.activation_bits is not None else abits
                if rule.quantize_input is not None:
                    quantize_input = rule.quantize_input
        if not quantize_it:
            plan.skipped.append((name, "excluded by a recipe rule"))
            continue
        plan.layers.append(LayerPlan(name, type_name, wbits, abits if quantize_input else None, role))
    if not plan.layers:
        raise QuantizationError("the recipe's rules exclude every layer; nothing to quantize")
    return plan


def _plan_from_saved(plan: QuantizationPlan, candidates, layers: Mapping[str, Mapping], model_name: str) -> QuantizationPlan:
    by_name = dict(candidates)
    missing = [n for n in layers if n not in by_name]
    if missing:
        raise QuantizationError(
            f"the saved plan quantizes layer {missing[0]!r}, which {model_name} does not have as a quantizable layer"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    for name, m in candidates:
        entry = layers.get(name)
        if entry is None:
            plan.skipped.append((name, "not quantized in the saved plan"))
            continue
        plan.layers.append(LayerPlan(name, type(m).__name__, int(entry["weight_bits"]),
                                     None if entry.get("input_bits") is None else int(entry["input_bits"]),
                                     entry.get("role") or "body"))
    return plan


def _parents_of(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    # Every (parent, attribute) that references a module: shared modules are swapped everywhere.
    refs: dict[int, list[tuple[nn.Module, str]]] = {}
    for _, parent in model.named_modules(remove_duplicate=False):
        for child_name, child in parent._modules.items():
            if child is not None:
                refs.setdefault(id(child), []).append((parent, child_name))
    return refs


def _replace(model: nn.Module, old: nn.Module, new: nn.Module, refs) -> list[tuple[nn.Module, str, nn.Module]]:
    done = []
    for parent, attr in refs.get(id(old), []):
        parent._modules[attr] = new
        done.append((parent, attr, old))
    return done


def quantize(
    model: nn.Module,
    recipe="w8a8",
    *,
    first_layers: Optional[Iterable[str]] = None,
    prediction_layers: Optional[Iterable[str]] = None,
    float_layers: Iterable[str] = (),
    layers: Optional[Mapping[str, Mapping]] = None,
) -> nn.Module:
    """Swap ``model``'s Conv2d / Linear / ConvTranspose2d layers for fake-quant ones, in place.

    Weight ranges are initialised from the weights at once (the recipe's ``calibration.weight_method``);
    activation ranges come from :func:`detq_hooks.calibrate` (or the first batch, LSQ-style, if no
    calibration runs). The conversion is all or nothing: on any error the model is left exactly as it was.

    Args:
        model: a float ``nn.Module`` (any detector; no tracing is done).
        recipe: preset name, YAML path, dict or :class:`~detq_hooks.recipe.Recipe`.
        first_layers / prediction_layers / float_layers / layers: see :func:`plan_quantization`.

    Returns:
        The same ``model`` object, converted.

    Example:
        >>> import torch, detq_hooks
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
        >>> detq_hooks.quantize(net, "w4a8")[0].weight_quantizer.bits  # first layer stays at 8 bits
        8
    """
    recipe = load_recipe(recipe)
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize() expects a torch.nn.Module, got {type(model).__name__}")
    plan = plan_quantization(model, recipe, first_layers=first_layers, prediction_layers=prediction_layers,
                             float_layers=float_layers, layers=layers)
    modules = dict(model.named_modules())
    qs = recipe.quantization
    # Build every replacement first: nothing of the user's model is touched until all of them exist.
    built: list[tuple[nn.Module, nn.Module]] = []
    for lp in plan.layers:
        float_mod = modules[lp.name]
        qcls = next(q for b, q in QUANT_MODULES.items() if is_swappable(float_mod, b))
        wspec = dict(bits=lp.weight_bits, symmetric=qs.weight.symmetric, per_channel=qs.weight.per_channel, kind=qs.weight.kind)
        aspec = None
        if lp.input_bits is not None:
            aspec = dict(bits=lp.input_bits, symmetric=qs.activation.symmetric, kind=qs.activation.kind)
        new = qcls.from_float(float_mod, weight_spec=wspec, input_spec=aspec)
        new.detq_layer_role = lp.role
        calibrate_weight_quantizer(new.weight_quantizer, new.weight, recipe.calibration.weight_method, recipe.calibration.mse_norm)
        saved = (layers or {}).get(lp.name) or {}
        if saved.get("weight_enabled") is not None:
            new.weight_quantizer.enabled = bool(saved["weight_enabled"])
        if new.input_quantizer is not None and saved.get("input_enabled") is not None:
            new.input_quantizer.enabled = bool(saved["input_enabled"])
        if new.input_quantizer is not None and saved.get("input_outliers"):  # TASKQ's sparse outliers (simulated)
            new.input_quantizer = SparseOutlierQuantizer(new.input_quantizer, float(saved["input_outliers"]))
        built.append((float_mod, new))
    refs = _parents_of(model)
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for old, new in built:
            swapped += _replace(model, old, new, refs)
        shares = {n: p["input_shares"] for n, p in (layers or {}).items() if (p or {}).get("input_shares")}
        if shares:  # a saved plan's shared input quantizers (quantization.shared_activations)
            try:
                tie_inputs(model, shares)
            except ValueError as err:
                raise QuantizationError(str(err)) from None
        setattr(model, META_ATTR, {"recipe": recipe.to_dict(), "plan_skipped": list(plan.skipped)})
    except BaseException:
        for parent, attr, old in reversed(swapped):
            parent._modules[attr] = old
        raise
    allocator.keep_freed_memory()  # the quantizers' extra tensors would otherwise refault the heap every step
    return model


def dequantize(model: nn.Module) -> nn.Module:
    """Undo :func:`quantize`: every fake-quant layer becomes its float layer again (same parameters)."""
    refs = _parents_of(model)
    for _, m in list(model.named_modules()):
        if is_quantized_module(m):
            _replace(model, m, m.to_float(), refs)  # type: ignore[attr-defined]
    if hasattr(model, META_ATTR):
        delattr(model, META_ATTR)
    return model


def is_quantized(model: nn.Module) -> bool:
    return any(is_quantized_module(m) for m in model.modules())


def recipe_of(model: nn.Module) -> Optional[Recipe]:
    """The recipe a quantized model was converted with (``None`` for a float model)."""
    meta = getattr(model, META_ATTR, None)
    return load_recipe(meta["recipe"]) if meta else None


def set_quantization_enabled(
    model: nn.Module,
    *,
    weights: Optional[bool] = None,
    activations: Optional[bool] = None,
    where: Optional[Callable[[str], bool]] = None,
) -> int:
    """Turn weight and/or activation fake quantization on or off, optionally only for layers whose name
    satisfies ``where``. Returns the number of layers touched. The flags are buffers: checkpoints keep them."""
    count = 0
    for name, m in quantized_layers(model):
        if where is not None and not where(name):
            continue
        if weights is not None:
            m.weight_quantizer.enabled = weights
        if activations is not None and m.input_quantizer is not None:
            m.input_quantizer.enabled = activations
        count += 1
    return count


@torch.no_grad()
def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """Fold ``bn`` into ``conv`` in place, keeping the quantized function.

    The weight quantizer then sees the folded weight. With symmetric per-channel weight ranges the channel
    scales are multiplied by |γ/σ|, which keeps every integer code, so the folded layer computes exactly
    what the trained (conv → BN) pair computed; other ranges are recalibrated on the folded weight.
    """
    factor = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1.0 / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    beta = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    new_w = conv.weight * factor.reshape(-1, 1, 1, 1)
    new_b = (bias - bn.running_mean) * factor + beta
    # In place through the parameters (not `.data`) so that their version counters move: the quantized-weight
    # cache (modules.py) keys on them.
    conv.weight.copy_(new_w)
    if conv.bias is None:
        conv.bias = nn.Parameter(new_b)
    else:
        conv.bias.copy_(new_b)
    wq = getattr(conv, "weight_quantizer", None)
    if isinstance(wq, FakeQuantizer):
        if wq.symmetric and wq.per_channel:
            wq.scale.mul_(factor.abs().reshape(-1).to(wq.scale.dtype)).clamp_(min=1e-8)
        else:
            calibrate_weight_quantizer(wq, conv.weight, "mse")
    return conv


__all__ = [
    "quantize",
    "dequantize",
    "plan_quantization",
    "QuantizationPlan",
    "LayerPlan",
    "QuantizationError",
    "is_quantized",
    "quantized_layers",
    "recipe_of",
    "set_quantization_enabled",
    "fold_batchnorm",
    "iter_quantizers",
]
