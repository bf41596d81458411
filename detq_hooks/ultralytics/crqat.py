"""CR-QAT in the Ultralytics trainer: curriculum stages from the model yaml and distillation from a float teacher.

* Stages (default, CR-QAT's K = 2): ``backbone`` = ``model.0 .. model.{nb-1}`` (``nb = len(yaml['backbone'])``) and
  ``neck_head`` = the rest (neck + Detect/RTDETRDecoder). ``stages="three"`` gives backbone / neck / head. A recipe's
  ``curriculum.stages`` overrides them. A stage's PKD features are the outputs of its layers that later layers read
  (backbone: the levels the neck consumes; neck: the head's inputs).
* Distillation (YOLO Detect / v10Detect / YOLO26 heads; end-to-end heads distil from the one-to-many branch):
  PKD on stage features, class-anchored relational loss with the teacher's last class-conv rows as anchors (one
  set per scale) over the teacher's task-aligned positives, logit loss, box consistency (1 - IoU of decoded boxes at
  the same anchor). RT-DETR distillation (Hungarian query matching) is not wired yet: a clear error says so.
* The student's loss is extended by wrapping its ``criterion`` (``DistillCriterion``), so the trainer's own loop,
  AMP, DDP and logging (each term is a loss item: ``d_pkd1``, ``d_rel``, ``d_logit``, ``d_box``) are unchanged.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..curriculum import CurriculumSchedule, Stage
from ..distill import (
    Assignment,
    DistillationLoss,
    HeadOutputs,
    Teacher,
    capture_outputs,
    task_aligned_positives,
)
from ..recipe import Recipe


def ultralytics_stages(model: nn.Module, split: str = "paper") -> list[Stage]:
    """Data-flow stages of an Ultralytics model from its yaml (see module docstring)."""
    yaml_cfg = getattr(model, "yaml", None) or {}
    nb = len(yaml_cfg.get("backbone", []))
    n = len(model.model)
    if not 0 < nb < n - 1:
        raise ValueError(f"cannot split {type(model).__name__} into stages: backbone has {nb} of {n} layers")
    head_idx = n - 1
    head = model.model[-1]
    head_in = [head.f] if isinstance(head.f, int) else list(head.f)
    head_in = [i if i >= 0 else head_idx + i for i in head_in]
    read_later = set()
    for m in model.model[nb:]:
        for j in ([m.f] if isinstance(m.f, int) else m.f):
            src = j if j >= 0 else m.i + j
            if src < nb:
                read_later.add(src)
    backbone_out = [f"model.{i}" for i in sorted(read_later)]
    backbone = Stage("backbone", [f"model.{i}" for i in range(nb)], backbone_out)
    if split == "three":
        neck = Stage("neck", [f"model.{i}" for i in range(nb, head_idx)], [f"model.{i}" for i in head_in])
        return [backbone, neck, Stage("head", [f"model.{head_idx}"], [])]
    return [backbone, Stage("neck_head", [f"model.{i}" for i in range(nb, n)], [])]


def _is_detect_head(model: nn.Module) -> bool:
    return hasattr(model.model[-1], "cv3") and hasattr(model.model[-1], "cv2")


class DistillCriterion:
    """Wraps the student's Ultralytics criterion: task loss + CR-QAT distillation terms (constant item keys)."""

    def __init__(self, base, model: nn.Module, teacher: Teacher, stages: list[Stage], cfg, schedule_ref):
        self.base = base
        self.teacher = teacher
        self.stages = stages
        self.loss_fn = DistillationLoss(cfg, num_stages=len(stages))
        self.schedule_ref = schedule_ref  # callable -> current stage index (None: no curriculum)
        self.feature_names = [s.outputs for s in stages[:-1]]
        head = model.model[-1]
        prefix = f"model.{len(model.model) - 1}"
        self.cls_layers = [f"{prefix}.cv3.{i}.{len(b) - 1}" for i, b in enumerate(head.cv3)]
        self.student_store: dict = {}
        self._handles = []
        modules = dict(model.named_modules())
        for names in self.feature_names:
            for n in names:
                self._handles.append(modules[n].register_forward_hook(lambda m, i, o, _n=n: self.student_store.__setitem__(_n, o)))
        for n in self.cls_layers:
            self._handles.append(modules[n].register_forward_pre_hook(lambda m, a, _n=n: self.student_store.__setitem__("emb:" + _n, a[0])))
        self.term_names = [f"pkd_stage{i + 1}" for i in range(len(stages) - 1)] + ["relational", "logit", "box"]
        self.last_terms: dict[str, float] = {}

    def __getattr__(self, name):  # update(), hyp, ... of the wrapped criterion
        if name in ("base", "__setstate__", "__getstate__"):
            raise AttributeError(name)
        return getattr(self.base, name)

    def __deepcopy__(self, memo):  # EMA copies of the model keep the plain criterion
        return None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # -------------------------------------------------------------- head decoding
    def _det_loss(self):
        return self.base.one2many if hasattr(self.base, "one2many") else self.base

    def _head_outputs(self, preds: dict, store: dict, cls_layers, class_anchors=None) -> tuple[HeadOutputs, torch.Tensor]:
        from ultralytics.utils.tal import make_anchors

        crit = self._det_loss()
        p = preds["one2many"] if "one2many" in preds else preds
        logits = p["scores"].permute(0, 2, 1)
        dist = p["boxes"].permute(0, 2, 1)
        anchors, strides = make_anchors(p["feats"], crit.stride, 0.5)
        boxes = crit.bbox_decode(anchors, dist.float()) * strides
        embs, index = [], []
        for lvl, n in enumerate(cls_layers):
            e = store["emb:" + n]
            embs.append(e.flatten(2).transpose(1, 2))
            index.append(torch.full((e.shape[2] * e.shape[3],), lvl, dtype=torch.long, device=e.device))
        emb = torch.cat(embs, 1) if embs else None
        out = HeadOutputs(logits, boxes, emb, class_anchors, torch.cat(index) if index else None, "sigmoid")
        return out, anchors * strides

    def __call__(self, preds, batch):
        loss, items = self.base(preds, batch)
        stage = self.schedule_ref()
        img = batch["img"]
        student_feats = [[self.student_store[n] for n in names] for names in self.feature_names]
        tmodel = self.teacher.module
        if next(tmodel.parameters()).device != img.device:
            self.teacher.to(img.device)
        t_names = [n for names in self.feature_names for n in names]
        t_store: dict = {}
        t_handles = []
        t_modules = dict(tmodel.named_modules())
        for n in self.cls_layers:
            t_handles.append(t_modules[n].register_forward_pre_hook(lambda m, a, _n=n: t_store.__setitem__("emb:" + _n, a[0])))
        try:
            with capture_outputs(tmodel, t_names) as tf:
                t_out = self.teacher(img)
        finally:
            for h in t_handles:
                h.remove()
        t_preds = t_out[1] if isinstance(t_out, tuple) else t_out
        teacher_feats = [[tf[n] for n in names] for names in self.feature_names]
        anchors_w = torch.stack([t_modules[n].weight.detach().flatten(1) for n in self.cls_layers])  # (L, C, D)
        s_head, _ = self._head_outputs(preds, self.student_store, self.cls_layers)
        t_head, centers = self._head_outputs(t_preds, t_store, self.cls_layers, class_anchors=anchors_w)
        h, w = img.shape[2:]
        gt_boxes, gt_labels = [], []
        scale = torch.tensor([w, h, w, h], device=img.device, dtype=torch.float32)
        for i in range(img.shape[0]):
            sel = batch["batch_idx"].view(-1) == i
            b = batch["bboxes"][sel].to(img.device).float() * scale
            gt_boxes.append(torch.cat([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], 1))
            gt_labels.append(batch["cls"][sel].view(-1).long())
        with torch.no_grad():
            assignment = task_aligned_positives(t_head.cls_logits.detach(), t_head.boxes.detach(), centers, gt_boxes, gt_labels)
        total, terms = self.loss_fn(stage=stage, student_feats=student_feats, teacher_feats=teacher_feats,
                                    student_head=s_head, teacher_head=t_head, assignment=assignment)
        self.student_store.clear()
        self.last_terms = terms
        bs = img.shape[0]
        loss = torch.cat([loss.reshape(-1), (total * bs).reshape(1).to(loss.dtype)])
        items = dict(items)
        for k in self.term_names:
            items["d_" + k] = torch.tensor(terms.get(k, 0.0), device=loss.device)
        return loss, items


def build_schedule(recipe: Recipe, model: nn.Module) -> CurriculumSchedule:
    return CurriculumSchedule.from_recipe(recipe.curriculum, ultralytics_stages(model))


def teacher_from_path(path: str, trainer) -> Teacher:
    """A float Ultralytics checkpoint as the teacher (built like the student, float)."""
    from ultralytics.nn.tasks import load_checkpoint

    from ..surgery import is_quantized

    weights, _ = load_checkpoint(path)
    if is_quantized(weights):
        raise ValueError(f"the teacher {path} is a quantized checkpoint; give a float model")
    return Teacher(weights.float())


__all__ = ["ultralytics_stages", "DistillCriterion", "build_schedule", "teacher_from_path", "_is_detect_head"]
