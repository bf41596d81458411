"""Critical-category figures in MMEngine's evaluator output (the validation log, ``scalars.json``, visualizers).

Each COCO-style metric of the evaluator (MMDetection's ``CocoMetric`` and its subclasses) reports, beside its
own keys, ``critical_bbox_mAP`` and ``critical_bbox_mAP_50``: pycocotools COCO AP over the recipe's critical
categories only (``params.catIds``), from the same detections and the same ground truth it just evaluated.
They arrive with the metric's prefix, e.g. ``coco/critical_bbox_mAP``.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..evaluation import coco_evaluate

MARK = "_detq_critical_ids"


def _is_coco_metric(metric: Any) -> bool:
    return all(hasattr(metric, a) for a in ("compute_metrics", "results2json", "cat_ids", "_coco_api"))


def add_critical_metrics(evaluator: Any, critical_labels: Sequence[int]) -> int:
    """Make every COCO-style metric of ``evaluator`` also report the critical categories' AP (idempotent).
    ``critical_labels`` are class indices of the model (``metainfo.classes`` order). Returns how many."""
    count = 0
    for metric in getattr(evaluator, "metrics", []):
        if not _is_coco_metric(metric):
            continue
        count += 1
        already = MARK in metric.__dict__
        setattr(metric, MARK, [int(c) for c in critical_labels])
        if already:
            continue
        original = metric.compute_metrics

        def compute_metrics(results: list, metric=metric, original=original) -> dict:
            out = original(results)
            labels = getattr(metric, MARK)
            if labels and results and "bbox" in getattr(metric, "metrics", ["bbox"]):
                out.update(_critical(metric, results, labels))
            return out

        metric.compute_metrics = compute_metrics
    return count


def _critical(metric: Any, results: list, labels: Sequence[int]) -> dict[str, float]:
    """COCO AP over the critical categories of the detections ``metric`` has just evaluated."""
    cat_ids = metric.cat_ids
    detections = []
    for _, pred in results:
        boxes = np.asarray(pred["bboxes"], dtype=np.float64).reshape(-1, 4)
        for box, score, label in zip(boxes, np.asarray(pred["scores"]).reshape(-1), np.asarray(pred["labels"]).reshape(-1)):
            x1, y1, x2, y2 = box.tolist()
            detections.append({"image_id": int(pred["img_id"]), "category_id": int(cat_ids[int(label)]),
                               "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})
    critical = [int(cat_ids[i]) for i in labels]
    images = list(metric.img_ids) if getattr(metric, "img_ids", None) is not None else None
    result = coco_evaluate(metric._coco_api, detections, critical, "bbox", images)
    return {"critical_bbox_mAP": round(result.map50_95, 4), "critical_bbox_mAP_50": round(result.map50, 4)}


__all__ = ["add_critical_metrics"]
