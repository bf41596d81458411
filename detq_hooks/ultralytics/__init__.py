"""Ultralytics adapter for detq-hooks.

    from ultralytics import YOLO
    from detq_hooks.ultralytics import DetQTrainer

    YOLO("yolo11n.pt").train(data="data.yaml", trainer=DetQTrainer, detq="w4a8", epochs=50)
    # CLI: detq train ultralytics model=yolo11n.pt data=data.yaml detq=w4a8 epochs=50

Segment, pose and OBB models get the matching trainer (``DetQSegmentationTrainer``, ``DetQPoseTrainer``,
``DetQOBBTrainer``) automatically, as an RT-DETR model gets ``DetQRTDETRTrainer``.

Quantized checkpoints (``best.pt``/``last.pt``) load with plain ``YOLO("best.pt")`` as long as detq-hooks is
installed (they pickle our layer classes; without the package the load fails with
``No module named 'detq_hooks'``). Resume with ``YOLO("last.pt").train(resume=True, trainer=DetQTrainer)``.
"""

from .compat import DetQModelInfo, patch_ultralytics  # noqa: F401  (patches Ultralytics' fuse for our models)
from .trainer import (
    DetQConfigError,
    DetQOBBTrainer,
    DetQPoseTrainer,
    DetQRTDETRTrainer,
    DetQSegmentationTrainer,
    DetQTrainer,
    excluded_layers,
    prediction_layers,
    quantize_ultralytics,
    resolve_recipe,
)

__all__ = [
    "DetQTrainer",
    "DetQRTDETRTrainer",
    "DetQSegmentationTrainer",
    "DetQPoseTrainer",
    "DetQOBBTrainer",
    "DetQConfigError",
    "DetQModelInfo",
    "prediction_layers",
    "excluded_layers",
    "quantize_ultralytics",
    "resolve_recipe",
]
