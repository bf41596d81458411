"""The one checkpoint state of a quantized model, shared by every trainer adapter.

A quantized run stores one ``detq`` entry beside its weights (Lightning: ``checkpoint["detq"]``, MMEngine:
``checkpoint["meta"]["detq"]``, Ultralytics: ``ckpt["detq"]``), always in this format::

    {
      "format": "detq-hooks", "version": 2,
      "recipe": {...},                       # the validated recipe (Recipe.to_dict())
      "layers": {name: {"type", "role", "weight_bits", "input_bits", "weight_enabled", "input_enabled",
                        "input_shares": leader name, only where the input quantizer is another layer's}},
      "target": "model",                     # sub-module the recipe was applied to ("" = the whole model)
      "curriculum": {...} | None,            # CurriculumSchedule.state_dict()
      "teacher": {"source": path} | {"state": state_dict} | None,
      "quantizer_state": {key: fp32 tensor} | None,   # when the trainer stores the module in fp16
    }

The saved per-layer plan (``layers``) is the authority when the model is rebuilt: bit widths changed after
conversion (mixed precision) survive save → resume → test. :func:`read_state` also reads the three formats
the 0.1.0 adapters wrote, and :func:`check_compatible` refuses a checkpoint that does not fit the model
(:class:`CheckpointMismatchError` naming the layer) before any weight is copied.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import nn

from .recipe import load_recipe
from .sharing import input_leaders, tie_inputs
from .sparse import SparseOutlierQuantizer, outlier_ratio
from .surgery import META_ATTR, QuantizationError, quantize, quantized_layers

STATE_FORMAT = "detq-hooks"
STATE_VERSION = 2
CHECKPOINT_KEY = "detq"
QUANTIZER_KEY_MARKERS = (".weight_quantizer.", ".input_quantizer.")
STATE_KEYS = ("format", "version", "recipe", "layers", "target", "curriculum", "teacher", "quantizer_state")


class CheckpointMismatchError(RuntimeError):
    """A checkpoint and a model disagree about quantization (float vs quantized, recipe, layers, shapes)."""


def is_quantizer_key(key: str) -> bool:
    """Whether a state-dict key belongs to a fake quantizer (``...weight_quantizer.scale`` etc.)."""
    return any(m in "." + key for m in QUANTIZER_KEY_MARKERS)


def has_quantizer_state(state_dict: Mapping[str, Any], prefix: str = "") -> bool:
    return any(k.startswith(prefix) and is_quantizer_key(k[len(prefix):]) for k in state_dict)


# ------------------------------------------------------------------------------------------ writing
def layer_plan(model: nn.Module) -> dict[str, dict]:
    """The per-layer plan of a quantized model as it is now (bits and flags read from its quantizers)."""
    plan = {}
    shares = input_leaders(model)
    for name, m in quantized_layers(model):
        iq = m.input_quantizer
        plan[name] = {
            "type": type(m).__name__,
            "role": getattr(m, "detq_layer_role", "body"),
            "weight_bits": m.weight_quantizer.bits,
            "input_bits": iq.bits if iq is not None else None,
            "weight_enabled": m.weight_quantizer.enabled,
            "input_enabled": iq.enabled if iq is not None else None,
        }
        if name in shares:  # its input quantizer is that layer's (quantization.shared_activations)
            plan[name]["input_shares"] = shares[name]
        if outlier_ratio(iq) is not None:  # TASKQ's sparse outliers (simulated)
            plan[name]["input_outliers"] = round(outlier_ratio(iq), 6)  # a float32 buffer: 0.005 reads 0.0049999999
    return plan


def quantization_state(
    model: nn.Module,
    *,
    target: str = "",
    curriculum: Optional[dict] = None,
    teacher: Optional[dict] = None,
    quantizer_state: bool = False,
) -> dict:
    """The ``detq`` entry for ``model`` (the quantized sub-module ``target`` of the trainer's module).

    Args:
        curriculum: the curriculum schedule's ``state_dict()``.
        teacher: ``{"source": path}`` or ``{"state": state_dict}`` of the distillation teacher.
        quantizer_state: also store every quantizer tensor in fp32 (for trainers that save the module in fp16).
    """
    meta = getattr(model, META_ATTR, None)
    if meta is None:
        raise CheckpointMismatchError("the model is not quantized by detq-hooks; there is no quantization state to save")
    qstate = None
    if quantizer_state:
        qstate = {k: v.detach().float().cpu().clone() if v.is_floating_point() else v.detach().cpu().clone()
                  for k, v in model.state_dict().items() if is_quantizer_key(k)}
    return {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "recipe": meta["recipe"],
        "layers": layer_plan(model),
        "target": target,
        "curriculum": curriculum,
        "teacher": teacher,
        "quantizer_state": qstate,
    }


# ------------------------------------------------------------------------------------------ reading
def _legacy_layers(layers: Mapping[str, Mapping], prediction: Optional[list], first: Optional[list]) -> dict:
    roles = {n: "prediction" for n in prediction or []} | {n: "first" for n in first or []}
    return {n: {"type": None, "role": roles.get(n, "body"), "weight_bits": v["weight_bits"],
                "input_bits": v.get("input_bits"), "weight_enabled": None, "input_enabled": None}
            for n, v in layers.items()}


def normalize_legacy_recipe(recipe: dict) -> dict:
    """0.1.0's Ultralytics adapter wrote DFL's float-only conv into the recipe as an exclusion rule; the
    detector family keeps it float now, so the rule is not part of the user's recipe."""
    rules = recipe.get("quantization", {}).get("rules") or []
    kept = [r for r in rules if not (r.get("quantize") is False and str(r.get("name")).endswith(".dfl.conv")
                                     and all(v is None for k, v in r.items() if k not in ("name", "quantize")))]
    if len(kept) == len(rules):
        return recipe
    out = dict(recipe)
    out["quantization"] = {**recipe["quantization"], "rules": kept}
    return out


def read_state(entry: Optional[Mapping[str, Any]], *, source: str = "checkpoint",
               legacy_teacher: Optional[dict] = None) -> Optional[dict]:
    """A ``detq`` entry in the current format, from any format detq-hooks wrote (``None`` stays ``None``).

    0.1.0 wrote three formats: Lightning (``version: 1`` with ``prediction_layers``/``first_layers`` and the
    teacher in ``checkpoint["detq_teacher"]``, passed here as ``legacy_teacher``), MMEngine (``version: 1``
    with ``teacher_source``) and Ultralytics (``version: "0.1.0"`` wrapping ``quantization_state``).
    """
    if entry is None:
        return None
    if entry.get("format") == STATE_FORMAT:
        if entry.get("version") != STATE_VERSION:
            raise CheckpointMismatchError(
                f"{source}: its detq state has version {entry.get('version')!r}; this detq-hooks reads versions "
                f"<= {STATE_VERSION}: upgrade detq-hooks to load it"
            )
        return dict(entry)
    if "quantization_state" in entry:  # 0.1.0 Ultralytics
        inner = entry["quantization_state"]
        teacher = {"state": entry["teacher_state"]} if entry.get("teacher_state") is not None else None
        return {"format": STATE_FORMAT, "version": STATE_VERSION,
                "recipe": normalize_legacy_recipe(entry.get("recipe") or inner["recipe"]),
                "layers": _legacy_layers(inner["layers"], None, None), "target": "",
                "curriculum": entry.get("curriculum"), "teacher": teacher,
                "quantizer_state": entry.get("quantizer_state")}
    if entry.get("version") == 1 and "recipe" in entry and "layers" in entry:  # 0.1.0 Lightning / MMEngine
        teacher = None
        if entry.get("teacher_source"):
            teacher = {"source": entry["teacher_source"]}
        elif legacy_teacher is not None:
            teacher = {"state": legacy_teacher}
        return {"format": STATE_FORMAT, "version": STATE_VERSION, "recipe": entry["recipe"],
                "layers": _legacy_layers(entry["layers"], entry.get("prediction_layers"), entry.get("first_layers")),
                "target": entry.get("target") or "", "curriculum": entry.get("curriculum"), "teacher": teacher,
                "quantizer_state": None}
    raise CheckpointMismatchError(
        f"{source}: its `detq` entry is in no format detq-hooks knows (keys {sorted(entry)[:8]}); "
        "was it written by another tool?"
    )


def module_state(model: nn.Module) -> dict:
    """The ``detq`` entry of a quantized module as it is (a pickled checkpoint module carries its own plan)."""
    entry = quantization_state(model)
    entry["recipe"] = normalize_legacy_recipe(entry["recipe"])
    return entry


def rebuild(model: nn.Module, entry: Mapping[str, Any], *, source: str = "checkpoint") -> nn.Module:
    """Quantize the float ``model`` exactly as the saved plan says (layers, bits, enabled flags), in place.

    All or nothing: a plan that names a layer the model lacks raises :class:`CheckpointMismatchError` and the
    model is left float.
    """
    try:
        return quantize(model, entry["recipe"], layers=entry["layers"])
    except QuantizationError as err:
        raise CheckpointMismatchError(f"{source}: {err}") from None


def _check_recipe(theirs: Mapping[str, Any], ours: Mapping[str, Any], source: str) -> None:
    theirs_fp, ours_fp = load_recipe(theirs).fingerprint(), load_recipe(ours).fingerprint()
    if theirs_fp != ours_fp:
        raise CheckpointMismatchError(
            f"{source} was quantized with a different recipe (differs in {_fingerprint_diff(ours_fp, theirs_fp)}); "
            f"checkpoint recipe: {theirs.get('name')!r}, this run: {ours.get('name')!r}"
        )


def _check_layer_names(theirs: Mapping[str, Any], ours: Mapping[str, Any], source: str) -> None:
    only_theirs = sorted(set(theirs) - set(ours))
    only_ours = sorted(set(ours) - set(theirs))
    if only_theirs or only_ours:
        name = (only_theirs or only_ours)[0]
        where = "the checkpoint quantizes it, the model does not" if only_theirs else "the model quantizes it, the checkpoint does not"
        raise CheckpointMismatchError(f"{source}: layer {name!r} does not match ({where})")


def apply_plan(model: nn.Module, entry: Optional[Mapping[str, Any]], *, source: str = "checkpoint") -> int:
    """Set the bits and enabled flags of an already quantized ``model`` to a saved plan, before its weights are
    loaded (trainers that convert before the checkpoint is read: the saved plan is the authority, so bits
    changed after conversion survive). The recipe and the layer sets must agree, else :class:`CheckpointMismatchError` naming
    the layer and nothing is changed. Returns the number of quantizers changed."""
    entry = read_state(entry, source=source)
    if entry is None:
        return 0
    meta = getattr(model, META_ATTR, None)
    if meta is None:
        raise CheckpointMismatchError(f"{source} was written by a quantized run but the model is float")
    _check_recipe(entry["recipe"], meta["recipe"], source)
    layers = dict(quantized_layers(model))
    _check_layer_names(entry["layers"], layers, source)
    changes, sparse = [], []
    for name, plan in entry["layers"].items():
        layer = layers[name]
        if plan.get("input_outliers") and outlier_ratio(layer.input_quantizer) is None:
            if layer.input_quantizer is None:
                raise CheckpointMismatchError(f"{source}: layer {name!r} has sparse input outliers in the checkpoint and "
                                              "no input quantizer in the model")
            sparse.append((layer, float(plan["input_outliers"])))
        for q, bits_key, enabled_key in ((layer.weight_quantizer, "weight_bits", "weight_enabled"),
                                         (layer.input_quantizer, "input_bits", "input_enabled")):
            bits, enabled = plan.get(bits_key), plan.get(enabled_key)
            if q is None:
                if bits is not None:
                    raise CheckpointMismatchError(f"{source}: layer {name!r} has {bits_key} = {bits} in the checkpoint "
                                                  "and no such quantizer in the model")
                continue
            if bits is not None and not 2 <= int(bits) <= 8:
                raise CheckpointMismatchError(f"{source}: layer {name!r} has {bits_key} = {bits} (not in [2, 8])")
            if (bits is not None and int(bits) != q.bits) or (enabled is not None and bool(enabled) != q.enabled):
                changes.append((q, bits, enabled))
    shares = {n: p["input_shares"] for n, p in entry["layers"].items() if p.get("input_shares")}
    for name, leader in shares.items():
        if leader not in layers or layers[leader].input_quantizer is None or layers[name].input_quantizer is None:
            raise CheckpointMismatchError(f"{source}: layer {name!r} shares the input quantizer of {leader!r}, which "
                                          "this model does not quantize")
    for q, bits, enabled in changes:  # all checked: apply
        if bits is not None:
            q.bits = int(bits)
        if enabled is not None:
            q.enabled = bool(enabled)
    for layer, ratio in sparse:
        layer.input_quantizer = SparseOutlierQuantizer(layer.input_quantizer, ratio)
    tied = {n: l for n, l in shares.items() if layers[n].input_quantizer is not layers[l].input_quantizer}
    tie_inputs(model, tied)
    return len(changes) + len(sparse) + len(tied)


def _fingerprint_diff(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def check_compatible(
    model: nn.Module,
    state_dict: Mapping[str, Any],
    saved_state: Optional[Mapping[str, Any]] = None,
    *,
    source: str = "checkpoint",
    prefix: str = "",
) -> None:
    """Raise :class:`CheckpointMismatchError` unless ``state_dict`` can be loaded into ``model`` with every
    quantizer value present on both sides. Runs before any weight is copied, so nothing is half-loaded.

    Args:
        model: the model about to receive the weights.
        state_dict: the checkpoint's weights (keys may carry ``prefix``, e.g. ``"model."``).
        saved_state: the checkpoint's ``detq`` entry (any format :func:`read_state` reads), if it has one.
        source: a name for the checkpoint in messages (its path).
    """
    model_q = bool(quantized_layers(model))
    ckpt_q = has_quantizer_state(state_dict, prefix)
    if model_q and not ckpt_q:
        raise CheckpointMismatchError(
            f"{source} holds float weights without quantizer state, but the model is quantized; "
            "start QAT from float weights with the adapter's `from float` path (e.g. load before quantizing), "
            "or resume from a checkpoint written by a quantized run"
        )
    if ckpt_q and not model_q:
        raise CheckpointMismatchError(
            f"{source} was written by a quantized run (it has quantizer state) but the model is float; "
            "quantize the model with the checkpoint's recipe first (the adapters do this when given the recipe)"
        )
    if not model_q:
        return
    saved = read_state(saved_state, source=source)
    ours = quantization_state(model)
    if saved is not None:
        _check_recipe(saved["recipe"], ours["recipe"], source)
        theirs_l, ours_l = saved["layers"], ours["layers"]
        _check_layer_names(theirs_l, ours_l, source)
        for name in ours_l:
            for key in ("weight_bits", "input_bits"):
                if theirs_l[name][key] != ours_l[name][key]:
                    raise CheckpointMismatchError(
                        f"{source}: layer {name!r} has {key} = {theirs_l[name][key]} in the checkpoint and "
                        f"{ours_l[name][key]} in the model; rebuild the model from the checkpoint's plan"
                    )
    own = model.state_dict()
    for name, layer in quantized_layers(model):
        key = f"{prefix}{name}.weight"
        if key in state_dict and tuple(state_dict[key].shape) != tuple(layer.weight.shape):
            raise CheckpointMismatchError(
                f"{source}: layer {name!r} has weight shape {tuple(state_dict[key].shape)} in the checkpoint and "
                f"{tuple(layer.weight.shape)} in the model"
            )
    model_keys = {k for k in own if is_quantizer_key(k)}
    ckpt_keys = {k[len(prefix):] for k in state_dict if k.startswith(prefix) and is_quantizer_key(k[len(prefix):])}
    missing = sorted(model_keys - ckpt_keys)
    if missing:
        raise CheckpointMismatchError(f"{source} lacks quantizer state for {len(missing)} entries, e.g. {missing[:5]}")


@torch.no_grad()
def load_quantizer_state(model: nn.Module, quantizer_state: Mapping[str, torch.Tensor]) -> int:
    """Copy a saved fp32 quantizer state into ``model`` (every key must exist). Returns the number of tensors."""
    own = model.state_dict()
    unknown = [k for k in quantizer_state if k not in own]
    if unknown:
        raise CheckpointMismatchError(f"the saved quantizer state names {len(unknown)} tensors the model lacks, e.g. {unknown[:3]}")
    model.load_state_dict(dict(quantizer_state), strict=False)
    return len(quantizer_state)


__all__ = [
    "quantization_state",
    "layer_plan",
    "read_state",
    "module_state",
    "normalize_legacy_recipe",
    "rebuild",
    "apply_plan",
    "check_compatible",
    "load_quantizer_state",
    "is_quantizer_key",
    "has_quantizer_state",
    "CheckpointMismatchError",
    "STATE_VERSION",
    "CHECKPOINT_KEY",
]
