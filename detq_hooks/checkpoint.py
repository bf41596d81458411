"""Checkpoint safety shared by all adapters: a checkpoint is never loaded without its quantizer state.

Adapters store :func:`quantization_state` next to the weights (Lightning callback state, MMEngine meta,
Ultralytics checkpoint dict) and call :func:`check_compatible` before loading weights into a model.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from torch import nn

from .recipe import load_recipe
from .surgery import META_ATTR, quantized_layers

STATE_VERSION = 1
QUANTIZER_KEY_MARKERS = (".weight_quantizer.", ".input_quantizer.")


class CheckpointMismatchError(RuntimeError):
    """A checkpoint and a model disagree about quantization (float vs quantized, or different recipes)."""


def _is_quantizer_key(key: str) -> bool:
    return any(m in key for m in QUANTIZER_KEY_MARKERS) or key.startswith(("weight_quantizer.", "input_quantizer."))


def quantization_state(model: nn.Module) -> dict:
    """What a checkpoint must carry to rebuild and verify the quantized model: the recipe and per-layer bits."""
    meta = getattr(model, META_ATTR, None)
    if meta is None:
        raise CheckpointMismatchError("the model is not quantized by detq-hooks; there is no quantization state to save")
    layers = {
        name: {
            "weight_bits": m.weight_quantizer.bits,
            "input_bits": m.input_quantizer.bits if m.input_quantizer is not None else None,
        }
        for name, m in quantized_layers(model)
    }
    return {"version": STATE_VERSION, "recipe": meta["recipe"], "layers": layers}


def check_compatible(
    model: nn.Module,
    state_dict: Mapping[str, Any],
    saved_state: Optional[Mapping[str, Any]] = None,
    *,
    source: str = "checkpoint",
    prefix: str = "",
) -> None:
    """Raise :class:`CheckpointMismatchError` unless ``state_dict`` can be loaded into ``model`` with every
    quantizer value present on both sides.

    Args:
        model: the model about to receive the weights.
        state_dict: the checkpoint's weights (keys may carry ``prefix``, e.g. ``"model."``).
        saved_state: the checkpoint's :func:`quantization_state`, if it has one.
        source: a name for the checkpoint in messages (its path).
    """
    model_q = any(True for _ in quantized_layers(model))
    ckpt_q = any(_is_quantizer_key(k[len(prefix):] if k.startswith(prefix) else k) for k in state_dict)
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
    if saved_state is not None:
        ours = quantization_state(model)
        theirs_recipe = load_recipe(saved_state["recipe"]).fingerprint()
        ours_recipe = load_recipe(ours["recipe"]).fingerprint()
        if theirs_recipe != ours_recipe:
            diff = sorted(k for k in ours_recipe if ours_recipe[k] != theirs_recipe.get(k))
            raise CheckpointMismatchError(
                f"{source} was quantized with a different recipe (differs in {diff}); "
                f"checkpoint recipe: {saved_state['recipe'].get('name')!r}, this run: {ours['recipe'].get('name')!r}"
            )
        if saved_state.get("layers") and saved_state["layers"] != ours["layers"]:
            theirs_l, ours_l = saved_state["layers"], ours["layers"]
            bad = sorted(set(theirs_l) ^ set(ours_l)) or sorted(k for k in ours_l if ours_l[k] != theirs_l.get(k))
            raise CheckpointMismatchError(f"{source}: quantized layers or bit widths differ from this model's, e.g. {bad[:5]}")
    model_keys = {k for k in model.state_dict() if _is_quantizer_key(k)}
    ckpt_keys = {k[len(prefix):] for k in state_dict if k.startswith(prefix) and _is_quantizer_key(k[len(prefix):])}
    missing = sorted(model_keys - ckpt_keys)
    if missing:
        raise CheckpointMismatchError(f"{source} lacks quantizer state for {len(missing)} entries, e.g. {missing[:5]}")


__all__ = ["quantization_state", "check_compatible", "CheckpointMismatchError", "STATE_VERSION"]
