"""What a quantized Ultralytics model needs at load time, without the trainer.

A checkpoint written by :class:`~detq_hooks.ultralytics.DetQTrainer` pickles the model with our fake-quant
layers (``detq_hooks.modules.QuantConv2d`` ...) and a small :class:`DetQModelInfo` attribute. Unpickling
therefore imports ``detq_hooks`` (``YOLO("best.pt")`` fails with ``No module named 'detq_hooks'`` when the
package is missing: ``pip install detq-hooks``) and this module, which makes Ultralytics' ``fuse()`` keep
the quantized function:

* ``Conv``/``DWConv`` + BatchNorm fold exactly: Ultralytics' ``fuse_conv_and_bn`` rescales
  ``weight_quantizer.amax`` (our symmetric per-channel scales), so every integer code stays.
* ``Conv2``, ``RepConv``, ``RepVGGDW`` and ``ConvTranspose`` merge branches whose weights were quantized
  separately; no rescale keeps that exact, so for quantized models they stay as trained (unfused), which is
  what Ultralytics already does for its own ModelOpt QAT models (``is_qat``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..modules import is_quantized_module


@dataclass
class DetQModelInfo:
    """Pickled with the model (``model.detq_info``): the adapter's view of the quantized model."""

    recipe_name: str = ""
    prediction_layers: list = field(default_factory=list)
    excluded_layers: list = field(default_factory=list)
    head_type: str = ""


def has_detq_quantizers(model: nn.Module) -> bool:
    return any(is_quantized_module(m) for m in model.modules())


_PATCHED = False


def patch_ultralytics() -> None:
    """Make ``BaseModel.fuse`` treat detq-hooks models like its own QAT models (idempotent)."""
    global _PATCHED
    if _PATCHED:
        return
    try:
        import ultralytics.nn.tasks as tasks
    except Exception:  # pragma: no cover - ultralytics missing: nothing to patch
        return
    original = tasks.is_qat

    def is_qat(model: nn.Module) -> bool:
        return original(model) or has_detq_quantizers(model)

    is_qat.__wrapped__ = original  # type: ignore[attr-defined]
    tasks.is_qat = is_qat
    _PATCHED = True


patch_ultralytics()

__all__ = ["DetQModelInfo", "patch_ultralytics", "has_detq_quantizers"]
