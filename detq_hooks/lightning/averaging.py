"""Lightning's weight averaging (``EMAWeightAveraging``, ``StochasticWeightAveraging``) on a quantized module.

* The averaging callbacks copy the module in their own ``setup``, possibly before it is quantized (or before
  it is rebuilt from a checkpoint's plan): :func:`reattach` makes them copy it again.
* EMA blends every buffer with float arithmetic, which would truncate the quantizers' integer flags (a stage
  switched on by the curriculum, 0 -> 1, would stay 0 in the average): :func:`guard` makes each update copy
  them exactly from the live model (:func:`detq_hooks.session.sync_integer_buffers`).
"""

from __future__ import annotations

from copy import deepcopy

from torch import nn

from ..session import sync_integer_buffers
from ..surgery import is_quantized


def _callbacks(trainer):
    from lightning.pytorch.callbacks import StochasticWeightAveraging
    from lightning.pytorch.callbacks.weight_averaging import WeightAveraging

    ema = [cb for cb in trainer.callbacks if isinstance(cb, WeightAveraging)]
    swa = [cb for cb in trainer.callbacks if isinstance(cb, StochasticWeightAveraging)]
    return ema, swa


def reattach(trainer, pl_module, *, force: bool = False) -> None:
    """Averaging callbacks that copied the module before conversion (``force``: before any change of its
    layers) copy it again."""
    ema, swa = _callbacks(trainer)
    for cb in ema:
        if cb._average_model is not None and (force or not is_quantized(cb._average_model.module)):
            cb.setup(trainer, pl_module, "fit")
    for cb in swa:
        if cb._average_model is not None and (force or not is_quantized(cb._average_model)):
            cb._average_model = deepcopy(pl_module)


def averaged_models(trainer) -> list[nn.Module]:
    """The averaged copies of the module (their integer quantizer flags follow the live model)."""
    ema, swa = _callbacks(trainer)
    out = [cb._average_model.module for cb in ema if cb._average_model is not None]
    return out + [cb._average_model for cb in swa if getattr(cb, "_average_model", None) is not None]


def guard(trainer) -> None:
    """After each EMA update, copy the live model's integer quantizer buffers into the average exactly."""
    ema, _ = _callbacks(trainer)
    for cb in ema:
        avg = cb._average_model
        if avg is None or getattr(avg, "_detq_guarded", False):
            continue
        orig = avg.update_parameters

        def update_parameters(model, _orig=orig, _avg=avg):
            _orig(model)
            sync_integer_buffers(_avg.module, model)

        avg.update_parameters = update_parameters
        avg._detq_guarded = True


__all__ = ["reattach", "guard", "averaged_models"]
