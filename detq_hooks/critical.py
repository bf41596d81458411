"""The critical-category objective of a detector, written once against the detector-family head outputs.

``L_crit`` is a detection loss on the logit-label transformed head (:func:`detq_hooks.fisher.critical_logits`):
the critical classes, one "other" class for the rest (softmax heads: ``logsumexp`` of the non-critical logits,
the no-object logit kept; sigmoid heads: the largest non-critical logit, its target the largest non-critical
target), and box terms only on the ground truths of critical classes. ``L_all`` is the same loss with every
class kept. The Fisher estimate (mixed precision) and the Fisher-trace regulariser both differentiate it.

The loss is the family's, not the trainer's: it reads :meth:`DetectorFamily.head_outputs` and
:meth:`~DetectorFamily.targets`, assigns predictions to ground truths the family's way (dense heads: the
task-aligned assigner on the model's own predictions; query heads: Hungarian matching to the ground truth),
and adds a classification term (sigmoid: binary cross-entropy on the transformed scores, normalised by the
positives; softmax: cross-entropy with DETR's 0.1 weight on no-object) and a ``1 − GIoU`` box term. So one
definition serves YOLO, RTMDet/RetinaNet/FCOS, DETR and Deformable DETR in all three trainers.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .distill import Assignment, HeadOutputs, hungarian_match, task_aligned_positives
from .fisher import FisherError, critical_box_mask, critical_logits, critical_targets
from .recording import Recorder

OBJECTIVES = ("critical", "all", "mix")
NO_OBJECT_WEIGHT = 0.1  # DETR's eos_coef: unmatched queries are most of the queries


def generalized_iou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """GIoU of paired xyxy boxes (..., 4) -> (...)."""
    lt, rb = torch.maximum(a[..., :2], b[..., :2]), torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)
    union = area_a + area_b - inter + eps
    hull = (torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])).clamp(min=0).prod(-1) + eps
    return inter / union - (hull - union) / hull


@torch.no_grad()
def assign_to_ground_truth(head: HeadOutputs, gt_boxes: Sequence[torch.Tensor], gt_labels: Sequence[torch.Tensor]) -> Assignment:
    """Positives of the model's own predictions: task-aligned for dense heads (``head.points`` given), one
    Hungarian-matched query per ground truth for query heads."""
    if head.points is not None:
        return task_aligned_positives(head.cls_logits.detach(), head.boxes.detach(), head.points, gt_boxes, gt_labels,
                                      score_kind=head.score_kind)
    logits, boxes = head.cls_logits.detach().float(), head.boxes.detach().float()
    b, q, width = logits.shape
    num_classes = width - 1 if head.score_kind == "softmax" else width
    positives = torch.zeros(b, q, dtype=torch.bool, device=logits.device)
    labels = torch.zeros(b, q, dtype=torch.long, device=logits.device)
    gt_index = torch.full((b, q), -1, dtype=torch.long, device=logits.device)
    for i in range(b):
        gb, gl = gt_boxes[i].to(boxes.device).float(), gt_labels[i].to(boxes.device).long()
        if not len(gb):
            continue
        onehot = torch.full((len(gb), num_classes), -10.0, device=boxes.device)
        onehot[torch.arange(len(gb)), gl] = 10.0
        queries, gts = hungarian_match(boxes[i], logits[i, :, :num_classes], gb, onehot)
        queries, gts = queries.to(boxes.device), gts.to(boxes.device)
        positives[i, queries], labels[i, queries], gt_index[i, queries] = True, gl[gts], gts
    return Assignment(positives, labels, gt_index)


class CriticalObjective:
    """``L_crit``, ``L_all`` or ``alpha·L_all + L_crit`` of one batch, from the detector family's head outputs.

    Args:
        family: the model's :class:`~detq_hooks.detectors.DetectorFamily` (it must read the head).
        critical_ids: class indices of the critical categories (``None`` or every class: ``L_crit = L_all``).
        merge: how softmax heads merge the non-critical logits (``logsumexp`` or ``max``).
        alpha: the weight of ``L_all`` in the ``mix`` objective.
        box_weight: weight of the ``1 − GIoU`` term against the classification term.

    Call it as ``objective(model, batch, which)``: it runs the model on the batch the family's way (its
    ``teacher_forward``, with gradients), reads the head and returns the scalar loss.
    """

    def __init__(self, family, critical_ids: Optional[Sequence[int]] = None, *, merge: str = "logsumexp",
                 alpha: float = 1.0, box_weight: float = 1.0) -> None:
        if merge not in ("logsumexp", "max"):
            raise FisherError(f"`critical.merge` = {merge!r} is not one of ['logsumexp', 'max']")
        self.family = family
        self.critical_ids = sorted(int(c) for c in critical_ids) if critical_ids else None
        self.merge, self.alpha, self.box_weight = merge, float(alpha), float(box_weight)

    def check(self, model: nn.Module) -> None:
        """Before anything is changed: the family reads this model's head (``UnsupportedDetectorError``)."""
        self.family.head_taps(model)

    # ------------------------------------------------------------------ running the model
    def __call__(self, model: nn.Module, batch: Any, which: str = "critical") -> torch.Tensor:
        if which not in OBJECTIVES:
            raise FisherError(f"objective {which!r} is not one of {list(OBJECTIVES)}")
        recorder = Recorder(model, self.family.head_taps(model), always=True)
        try:
            with torch.enable_grad():
                self.family.teacher_forward(model, batch)
                recorded = recorder.recorded
                head = self.family.head_outputs(model, recorded, batch)
                targets = self.family.targets(model, recorded, batch)
        finally:
            recorder.remove()
        return self.loss(head, targets, which)

    # ------------------------------------------------------------------ the loss
    def loss(self, head: HeadOutputs, targets, which: str = "critical") -> torch.Tensor:
        """The objective from head outputs and per-image ground truth ``(boxes, labels)``."""
        gt_boxes, gt_labels = targets
        assignment = assign_to_ground_truth(head, gt_boxes, gt_labels)
        if which == "all" or self.critical_ids is None:
            return self._loss(head, gt_boxes, assignment, None)
        critical = self._loss(head, gt_boxes, assignment, self.critical_ids)
        if which == "mix":
            return self.alpha * self._loss(head, gt_boxes, assignment, None) + critical
        return critical

    def _loss(self, head: HeadOutputs, gt_boxes, assignment: Assignment, critical_ids: Optional[list[int]]) -> torch.Tensor:
        logits = head.cls_logits.float()
        pos, labels = assignment.positives, assignment.labels
        width = logits.shape[-1]
        nobj = head.no_object % width if head.score_kind == "softmax" else None  # DETR: the last; SSD: 0
        if critical_ids is not None:
            classes = [k for k in range(width) if k != nobj]
            if not set(critical_ids) <= set(classes):
                raise FisherError(f"critical class ids {critical_ids} are not all classes of a head whose classes are "
                                  f"{classes[0]}..{classes[-1]}")
        if head.score_kind == "softmax":
            target = torch.where(pos, labels, torch.full_like(labels, nobj))
            if critical_ids is not None:
                logits = critical_logits(logits, critical_ids, "softmax", self.merge, no_object=nobj)
                target = critical_targets(target, critical_ids, "softmax", num_classes=width, no_object=nobj)
                nobj = logits.shape[-1] - 1  # the transform puts no-object last
            weight = torch.ones(logits.shape[-1], device=logits.device)
            weight[nobj] = NO_OBJECT_WEIGHT
            cls_loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), weight=weight)
        else:
            onehot = torch.zeros_like(logits)
            onehot[pos] = F.one_hot(labels[pos], width).to(logits.dtype)
            if critical_ids is not None:
                logits = critical_logits(logits, critical_ids, "sigmoid")
                onehot = critical_targets(onehot, critical_ids, "sigmoid")
            cls_loss = F.binary_cross_entropy_with_logits(logits, onehot, reduction="sum") / pos.sum().clamp_min(1)
        box_pos = pos if critical_ids is None else pos & critical_box_mask(labels, critical_ids)
        if not box_pos.any() or assignment.gt_index is None:
            return cls_loss + head.boxes.sum() * 0.0  # keeps the box branch in the graph
        matched = torch.cat([gt_boxes[i].to(head.boxes.device).float()[assignment.gt_index[i, box_pos[i]]]
                             for i in range(len(gt_boxes))])
        box_loss = (1.0 - generalized_iou(head.boxes[box_pos].float(), matched)).mean()
        return cls_loss + self.box_weight * box_loss


__all__ = ["CriticalObjective", "assign_to_ground_truth", "generalized_iou", "OBJECTIVES"]
