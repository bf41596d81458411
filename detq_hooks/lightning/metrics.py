"""Critical-category mAP for Lightning validation and test, logged with ``pl_module.log``.

COCO AP restricted to a set of categories is the mean of their per-category APs, and a category's AP depends
only on its own detections and ground truths; so the critical figures are torchmetrics' COCO mAP (pycocotools
backend) of the predictions and targets filtered to the critical labels. torchmetrics gathers the states
across DDP processes.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch


def detections_in(output: Any) -> Optional[list[dict]]:
    """Detections in torchvision's convention (a list of ``{"boxes", "scores", "labels"}`` per image) from a
    step output or a model output, or ``None``: the list itself, or under ``detections``/``preds``."""
    if isinstance(output, dict):
        output = output.get("detections", output.get("preds"))
    if isinstance(output, (list, tuple)) and output and all(
            isinstance(d, dict) and {"boxes", "scores", "labels"} <= set(d) for d in output):
        return list(output)
    return None


class CriticalMAP:
    """mAP50-95 and mAP50 over ``critical_labels`` (model label ids), accumulated over an epoch."""

    def __init__(self, critical_labels: Sequence[int]) -> None:
        from torchmetrics.detection import MeanAveragePrecision

        self.labels = torch.as_tensor(sorted(int(c) for c in critical_labels))
        self.metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")
        self.seen = 0

    def _keep(self, item: dict, keys: Sequence[str]) -> dict:
        labels = item["labels"].detach().cpu().long()
        mask = torch.isin(labels, self.labels)
        return {k: item[k].detach().cpu()[mask].float() if k != "labels" else labels[mask] for k in keys}

    def update(self, detections: list[dict], targets: list[dict]) -> None:
        self.metric.update([self._keep(d, ("boxes", "scores", "labels")) for d in detections],
                           [self._keep(t, ("boxes", "labels")) for t in targets])
        self.seen += len(detections)

    def compute(self) -> dict[str, float]:
        result = self.metric.compute()
        return {"critical_mAP50-95": float(result["map"]), "critical_mAP50": float(result["map_50"])}

    def reset(self) -> None:
        self.metric.reset()
        self.seen = 0


__all__ = ["CriticalMAP", "detections_in"]
