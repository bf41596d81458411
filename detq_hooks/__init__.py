"""detq-hooks: quantization (QAT and PTQ, down to 4 bits) of object detectors, as plugins for the trainers
people already use (Ultralytics, Lightning, MMEngine/MMDetection).

Stable core API::

    import detq_hooks
    detq_hooks.quantize(model, "w4a8")          # swap layers for fake-quant ones (all or nothing)
    detq_hooks.calibrate(model, batches)        # activation ranges from the user's own batches
    detq_hooks.quantization_report(model, batches).print()
    detq_hooks.export_onnx(model, example, "model.onnx")   # QDQ graph with int8 weight initializers
    detq_hooks.export_openvino(model, example, "model.xml") # OpenVINO int8 IR with the learned scales
    detq_hooks.QuantSession("w4a8-crqat")       # the whole life cycle, as the trainer adapters run it
"""

from .recipe import PRESETS, Recipe, RecipeError, load_recipe
from .quantizers import FakeQuantizer, iter_quantizers, quantizer_mode, quantizer_parameters
from .modules import QuantConv2d, QuantConvTranspose2d, QuantLinear
from .surgery import (
    QuantizationError,
    dequantize,
    fold_batchnorm,
    is_quantized,
    plan_quantization,
    quantize,
    quantized_layers,
    recipe_of,
    set_quantization_enabled,
)
from .calibration import CalibrationError, calibrate

__version__ = "0.1.0"


def __getattr__(name):  # heavy optional parts load on first use
    if name in ("export_onnx", "compare_onnx", "ExportError"):
        from . import export

        return getattr(export, name)
    if name in ("QuantSession", "CheckpointMismatchError"):
        from . import session

        return getattr(session, name)
    if name in ("DetectorFamily", "family_for", "register_family", "UnsupportedDetectorError"):
        from . import detectors

        return getattr(detectors, name)
    if name in ("export_openvino", "runtime_precisions"):
        from . import deploy

        return getattr(deploy, name)
    if name == "ptq":
        from .api import ptq

        return ptq
    if name in ("quantization_report", "QuantizationReport"):
        from . import report

        return getattr(report, name)
    raise AttributeError(f"module 'detq_hooks' has no attribute {name!r}")


__all__ = [
    # stable
    "QuantSession",
    "DetectorFamily",
    "family_for",
    "register_family",
    "quantize",
    "calibrate",
    "ptq",
    "dequantize",
    "load_recipe",
    "Recipe",
    "PRESETS",
    "export_onnx",
    "compare_onnx",
    "export_openvino",
    "runtime_precisions",
    "quantization_report",
    "set_quantization_enabled",
    "fold_batchnorm",
    "is_quantized",
    "quantized_layers",
    "recipe_of",
    "plan_quantization",
    "quantizer_parameters",
    "iter_quantizers",
    "quantizer_mode",
    "FakeQuantizer",
    "QuantConv2d",
    "QuantLinear",
    "QuantConvTranspose2d",
    # errors
    "RecipeError",
    "QuantizationError",
    "CalibrationError",
    "CheckpointMismatchError",
    "UnsupportedDetectorError",
    "ExportError",
]
