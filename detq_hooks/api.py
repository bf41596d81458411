"""One-call entry points that run a whole session for the user.

    model = detq_hooks.ptq(model, batches, "w4a8-taskq")            # float model in, quantized model out
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

from torch import nn

from .detectors import DetectorFamily
from .recipe import RecipeError, load_recipe
from .session import QuantSession
from .surgery import dequantize


def ptq(model: nn.Module, batches: Iterable[Any], recipe: Any = "w8a8-ptq", *,
        forward_fn: Optional[Callable[[nn.Module, Any], Any]] = None, family: Optional[DetectorFamily] = None,
        progress: bool = True):
    """Quantize a float ``model`` post-training, in place: convert with ``recipe`` (a PTQ preset such as
    ``w8a8-ptq``, ``w4a8-ptq``, ``w8a8-taskq``, ``w4a8-taskq``, ``w4a4-taskq``, a YAML path or a dict with ``mode: ptq``),
    calibrate on ``batches`` and, if the recipe says so, reconstruct block by block. All or nothing: on an error
    the model is left float.

    Args:
        batches: calibration batches (a list or a loader; the recipe's ``calibration.num_batches`` and
            ``ptq.num_batches`` are read from it).
        forward_fn: ``forward_fn(model, batch)`` (default: ``model(batch)``, unpacking tuples/dicts).

    Returns:
        The model, with ``model.detq_ptq`` holding the :class:`~detq_hooks.calibration.CalibrationResult`
        (its ``reconstruction``: each block's error before and after).
    """
    recipe = load_recipe(recipe)
    if recipe.mode != "ptq":
        raise RecipeError(f"detq_hooks.ptq needs a post-training recipe (`mode: ptq`), {recipe.name!r} is {recipe.mode!r}; "
                          "use a PTQ preset (w8a8-ptq, w4a8-ptq, w4a4-ptq, w8a8-taskq, w4a8-taskq, w4a4-taskq)")
    session = QuantSession(recipe, family=family)
    session.convert(model, training=False)
    try:
        result = session.run_ptq(model, batches, forward_fn, progress=progress)
    except BaseException:
        dequantize(model)
        raise
    model.detq_ptq = result
    return model


__all__ = ["ptq"]
