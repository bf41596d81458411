"""MMEngine / MMDetection adapter: one hook in the config quantizes the model.

    custom_imports = dict(imports=["detq_hooks.mmengine"], allow_failed_imports=False)
    custom_hooks = [dict(type="DetQHook", recipe="w4a8")]

* :mod:`.hook`: ``DetQHook``, MMEngine's events translated into :class:`~detq_hooks.session.QuantSession`
  calls (conversion, calibration/PTQ, curriculum, loss terms, EMA sync, checkpoint state).
* :mod:`.checkpoints`: torch's safe (``weights_only``) loader made to read MMEngine checkpoints.
* :mod:`.deploy`: a DetQHook checkpoint back into a quantized detector (``load_quantized_detector``), the
  graph to export (``exportable``) and the exported file's mAP with the config's evaluator (``evaluate_exported``).

The MMDetection head reading, prediction layers and stages are the detector family's
(:class:`detq_hooks.detectors.mmdet.MMDetFamily`). Importing this package registers ``DetQHook`` and the
checkpoint loading.
"""

from __future__ import annotations

from torch import nn

from ..detectors.mmdet import MMDetFamily
from .checkpoints import register_local_checkpoint_loader, register_safe_checkpoint_globals
from .deploy import evaluate_exported, example_input, exportable, load_quantized_detector
from .hook import DetQHook, mmdet_forward

register_safe_checkpoint_globals()
register_local_checkpoint_loader()


def mmdet_prediction_layers(model: nn.Module) -> list[str]:
    """Names of the final classification/regression layers of an MMDetection model's heads (benchmarks)."""
    return MMDetFamily().prediction_layers(model) or []


__all__ = ["DetQHook", "mmdet_forward", "mmdet_prediction_layers", "load_quantized_detector", "exportable",
           "example_input", "evaluate_exported"]
