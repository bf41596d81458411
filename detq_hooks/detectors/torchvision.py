"""The torchvision families: dense detectors laid out like torchvision's (``transform``, ``backbone.body``,
``backbone.fpn``, ``head``, ``anchor_generator``): FCOS and RetinaNet, found anywhere in the model (e.g. as
``self.model`` of a LightningModule); and SSD / SSDlite (:class:`TorchvisionSSDFamily`, below).

* Prediction layers: the head's ``cls_logits``/``bbox_reg``/``bbox_ctrness`` convs.
* Stages: ``backbone`` = ``backbone.body`` (its outputs are PKD's features), then ``neck_head`` = FPN + head.
* Head outputs: class logits (FCOS: with its centerness folded in, as its postprocess scores), boxes decoded by the detector's box coder at its anchors, the
  classification tower's outputs as region embeddings, the teacher's classifier rows (averaged over the
  kernel and the anchors of a location) as class anchors. Targets are the ones the detector's own
  ``transform`` resized, read from the student's forward.
* PTQ's detection-aware task regularisation reads ``head`` (boxes decoded at a unit anchor, see
  :meth:`TorchvisionFamily.decode_head_output`).
* Batches are ``(images, targets)`` as torchvision detectors take them.
"""

from __future__ import annotations

import math
import re
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..curriculum import Stage
from ..distill import HeadOutputs
from ..recording import Recorded, Taps
from .base import DetectorFamily, blank_image, called_blocks


def detector_root(model: nn.Module) -> Optional[str]:
    """Name of the first sub-module laid out like a torchvision dense detector, or ``None``."""
    for name, m in model.named_modules():
        bb, head = getattr(m, "backbone", None), getattr(m, "head", None)
        if (isinstance(bb, nn.Module) and isinstance(head, nn.Module) and hasattr(bb, "body") and hasattr(bb, "fpn")
                and hasattr(m, "anchor_generator") and hasattr(m, "transform")):
            return name
    return None


class TorchvisionFamily(DetectorFamily):
    name = "torchvision"
    reads_head = True
    #: finds the detector inside the user's module (its name, or None)
    root_of = staticmethod(detector_root)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return cls.root_of(model) is not None

    def example_forward(self, model: nn.Module):
        root = self.root_of(model)
        # two images: GroupNorm heads cannot normalise the 1x1 top level of one small image
        return lambda m: m.get_submodule(root)([blank_image(m, (3, 64, 64)), blank_image(m, (3, 64, 64))])

    def _p(self, model: nn.Module) -> str:
        root = self.root_of(model)
        return f"{root}." if root else ""

    def _det(self, model: nn.Module) -> nn.Module:
        root = self.root_of(model)
        return model.get_submodule(root) if root else model

    # ------------------------------------------------------------------ layers / structure
    def stages(self, model: nn.Module) -> list[Stage]:
        p = self._p(model)
        return [Stage("backbone", [p + "backbone.body"], [p + "backbone.body"]),
                Stage("neck_head", [p + "backbone.fpn", p + "head"], [])]

    def reconstruction_blocks(self, model: nn.Module) -> list[str]:
        p, det = self._p(model), self._det(model)
        body = [f"{p}backbone.body.{n}" for n, c in det.backbone.body.named_children() if any(True for _ in c.parameters())]
        return body + [p + "backbone.fpn", p + "head.classification_head", p + "head.regression_head"]

    # ------------------------------------------------------------------ head outputs
    def head_taps(self, model: nn.Module) -> Taps:
        p = self._p(model)
        return Taps(outputs=[p + "transform", p + "head", p + "head.classification_head.conv", p + "anchor_generator"])

    def teacher_forward(self, teacher: nn.Module, batch: Any) -> None:
        """The teacher's transform → body → FPN → head → anchors, called as modules so the taps record."""
        images, targets = batch[0], batch[1] if isinstance(batch, (list, tuple)) and len(batch) > 1 else None
        det = self._det(teacher)
        image_list, _ = det.transform(images, [dict(t) for t in targets] if targets is not None else None)
        feats = list(det.backbone.fpn(det.backbone.body(image_list.tensors)).values())
        det.head(feats)
        det.anchor_generator(image_list, feats)

    @staticmethod
    def _embeddings(tower_outputs: Sequence[torch.Tensor], num_anchors_total: int) -> torch.Tensor:
        per_level = [t.flatten(2).transpose(1, 2) for t in tower_outputs]  # (N, HW, D) in H, W order
        hw = sum(t.shape[1] for t in per_level)
        a = max(1, num_anchors_total // max(hw, 1))
        return torch.cat([t.repeat_interleave(a, dim=1) if a > 1 else t for t in per_level], 1)

    @staticmethod
    def _decode(det: nn.Module, regression: torch.Tensor, anchors: list[torch.Tensor]) -> torch.Tensor:
        coder = det.box_coder
        if hasattr(coder, "decode_single") and not hasattr(coder, "normalize_by_size"):
            return torch.stack([coder.decode_single(regression[b].float(), anchors[b]) for b in range(len(anchors))])
        return coder.decode(regression.float(), torch.stack(anchors))

    def head_outputs(self, model: nn.Module, recorded: Recorded, batch: Any) -> HeadOutputs:
        p, det = self._p(model), self._det(model)
        head = recorded.output(p + "head")
        anchors = recorded.output(p + "anchor_generator")
        logits = self._score_logits(head)
        towers = recorded.outputs[p + "head.classification_head.conv"]
        levels = len(recorded.outputs[p + "head.classification_head.conv"]) // max(1, len(recorded.outputs[p + "head"]))
        w = det.head.classification_head.cls_logits.weight.detach().float().mean((2, 3))  # (A*C, D)
        c = logits.shape[-1]
        return HeadOutputs(
            cls_logits=logits.float(), boxes=self._decode(det, head["bbox_regression"], anchors),
            embeddings=self._embeddings(towers[-levels:], logits.shape[1]).float(),
            class_anchors=w.view(-1, c, w.shape[1]).mean(0), score_kind="sigmoid",
            points=(anchors[0][:, :2] + anchors[0][:, 2:]) / 2,
        )

    # ------------------------------------------------------------------ PTQ: the head's decoded boxes
    def head_block(self, model: nn.Module) -> Optional[str]:
        """``head``: its eval-mode output is the dict of per-anchor tensors, every level concatenated."""
        return self._p(model) + "head"

    def decode_head_output(self, model: nn.Module, output: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Boxes by the detector's own box coder at a unit anchor (0, 0, 1, 1) in every place, and the scores
        its postprocess ranks by: sigmoid (FCOS: ``sqrt(sigmoid(cls)·sigmoid(centerness))``), softmax without the
        background for SSD.

        The head's output no longer says which image and feature sizes its anchors came from; each coder decodes
        an anchor's box by a scale and shift per axis of that anchor, which leaves the IoU of two boxes decoded at
        the same anchor (all DTR reads) as it is at the real anchor."""
        regression = output["bbox_regression"].float()
        unit = regression.new_tensor([0.0, 0.0, 1.0, 1.0]).expand(regression.shape[1], 4)
        boxes = self._decode(self._det(model), regression, [unit] * regression.shape[0])
        return boxes, self._scores(output)

    @staticmethod
    def _scores(output: dict) -> torch.Tensor:
        scores = output["cls_logits"].float().sigmoid()
        if "bbox_ctrness" in output:
            scores = (scores * output["bbox_ctrness"].float().sigmoid()).sqrt()
        return scores

    @staticmethod
    def _score_logits(output: dict) -> torch.Tensor:
        """The logits of the scores inference ranks by: FCOS's ``logit(sqrt(σ(cls)·σ(centerness)))`` (so
        distillation and the critical objective see the centerness its postprocess multiplies in), else the class
        logits as they are. In log space; clamped just below a score of 1, where the logit would be infinite."""
        logits = output["cls_logits"].float()
        if "bbox_ctrness" not in output:
            return logits
        log_score = 0.5 * (F.logsigmoid(logits) + F.logsigmoid(output["bbox_ctrness"].float()))
        log_score = log_score.clamp(max=math.log1p(-1e-6))
        return log_score - torch.log(-torch.expm1(log_score))

    def targets(self, model: nn.Module, recorded: Recorded, batch: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        _, targets = recorded.output(self._p(model) + "transform")
        if targets is None:
            raise ValueError("distillation needs the batch's targets: the detector ran without them (is it in training mode?)")
        return [t["boxes"].float() for t in targets], [t["labels"].long() for t in targets]


def ssd_root(model: nn.Module) -> Optional[str]:
    """Name of the first sub-module laid out like torchvision's SSD/SSDlite (a feature extractor with
    ``features``/``extra``, a head whose class and box branches keep one ``module_list`` item per level), or ``None``."""
    for name, m in model.named_modules():
        bb, head = getattr(m, "backbone", None), getattr(m, "head", None)
        if (isinstance(bb, nn.Module) and hasattr(bb, "features") and hasattr(bb, "extra")
                and isinstance(getattr(getattr(head, "classification_head", None), "module_list", None), nn.ModuleList)
                and hasattr(m, "anchor_generator") and hasattr(m, "transform") and hasattr(m, "box_coder")):
            return name
    return None


def _last_conv(module: nn.Module, prefix: str) -> str:
    """The name of the last convolution in ``module`` (SSD: the level's conv itself; SSDlite: its 1x1 after the
    depthwise block)."""
    convs = [n for n, m in module.named_modules() if isinstance(m, nn.Conv2d)]
    return f"{prefix}.{convs[-1]}" if convs[-1] else prefix


class TorchvisionSSDFamily(TorchvisionFamily):
    """torchvision's SSD (VGG) and SSDlite (MobileNetV3), found anywhere in the model.

    * Prediction layers: the last conv of every level's class and box branch (``head.*_head.module_list.<i>``).
    * Stages: ``backbone`` = the feature extractor's ``features`` (its last called block's output is PKD's
      feature), then ``neck_head`` = its ``extra`` layers + the head.
    * Head outputs: softmax class logits (background at index 0, as SSD scores them), boxes decoded by its box
      coder at its default boxes; as region embeddings, each level's classifier input (levels differ in
      channels: zero-padded to the widest, with the teacher's classifier rows of that level as its class
      anchors, so relations stay within a level).
    """

    name = "torchvision-ssd"
    root_of = staticmethod(ssd_root)

    def _classifiers(self, model: nn.Module) -> list[str]:
        p, det = self._p(model), self._det(model)
        items = det.head.classification_head.module_list
        return [_last_conv(m, f"{p}head.classification_head.module_list.{i}") for i, m in enumerate(items)]

    def prediction_layers(self, model: nn.Module) -> Optional[list[str]]:
        p, det = self._p(model), self._det(model)
        boxes = det.head.regression_head.module_list
        return self._classifiers(model) + [_last_conv(m, f"{p}head.regression_head.module_list.{i}")
                                           for i, m in enumerate(boxes)]

    @staticmethod
    def _feature_blocks(det: nn.Module, p: str) -> list[str]:
        """The units of the extractor's ``features`` that run: VGG's extractor calls the container, SSDlite's
        calls its blocks one by one (the container itself never runs)."""
        if type(det.backbone).__name__ == "SSDFeatureExtractorVGG":
            return [p + "backbone.features"]
        return [f"{p}backbone.features.{n}" for n, c in det.backbone.features.named_children()
                if any(True for _ in c.parameters())]

    def stages(self, model: nn.Module) -> list[Stage]:
        p, det = self._p(model), self._det(model)
        last = self._feature_blocks(det, p)[-1]
        # parameters the extractor holds itself (VGG's L2Norm scale) go with `features`, not with `extra`
        own = [f"re:^{re.escape(p + 'backbone')}$"] if any(True for _ in det.backbone.parameters(recurse=False)) else []
        return [Stage("backbone", [p + "backbone.features", *own], [last]),
                Stage("neck_head", [p + "backbone.extra", p + "head"], [])]

    def reconstruction_blocks(self, model: nn.Module) -> list[str]:
        p, det = self._p(model), self._det(model)
        heads = [b for h in ("classification_head", "regression_head")
                 for b in called_blocks(getattr(det.head, h).module_list, f"{p}head.{h}.module_list")]
        return self._feature_blocks(det, p) + called_blocks(det.backbone.extra, f"{p}backbone.extra") + heads

    def head_taps(self, model: nn.Module) -> Taps:
        p = self._p(model)
        return Taps(outputs=[p + "transform", p + "head", p + "anchor_generator"], inputs=self._classifiers(model))

    def teacher_forward(self, teacher: nn.Module, batch: Any) -> None:
        """The teacher's transform → feature extractor → head → default boxes, called as modules so the taps
        record."""
        images, targets = batch[0], batch[1] if isinstance(batch, (list, tuple)) and len(batch) > 1 else None
        det = self._det(teacher)
        image_list, _ = det.transform(images, [dict(t) for t in targets] if targets is not None else None)
        feats = list(det.backbone(image_list.tensors).values())
        det.head(feats)
        det.anchor_generator(image_list, feats)

    @staticmethod
    def _scores(output: dict) -> torch.Tensor:
        return output["cls_logits"].float().softmax(-1)[..., 1:]  # SSD's background is class 0

    def head_outputs(self, model: nn.Module, recorded: Recorded, batch: Any) -> HeadOutputs:
        det = self._det(model)
        p = self._p(model)
        head = recorded.output(p + "head")
        anchors = recorded.output(p + "anchor_generator")
        logits = head["cls_logits"]
        c = logits.shape[-1]
        classifiers = self._classifiers(model)
        convs = [model.get_submodule(n) for n in classifiers]
        width = max(conv.in_channels for conv in convs)
        embeddings, class_anchors, level_of = [], [], []
        for level, (name, conv) in enumerate(zip(classifiers, convs)):
            x = recorded.input(name)  # (N, D_l, H, W)
            a = conv.out_channels // c
            emb = x.flatten(2).transpose(1, 2).repeat_interleave(a, dim=1)  # (N, H*W*A, D_l): H, W, then anchors
            embeddings.append(nn.functional.pad(emb.float(), (0, width - emb.shape[-1])))
            w = conv.weight.detach().float().view(a, c, conv.in_channels, -1).mean((0, 3))  # (C, D_l)
            class_anchors.append(nn.functional.pad(w, (0, width - w.shape[-1])))
            level_of.append(torch.full((emb.shape[1],), level, dtype=torch.long, device=logits.device))
        boxes = torch.stack([det.box_coder.decode_single(head["bbox_regression"][b].float(), anchors[b])
                             for b in range(len(anchors))])
        return HeadOutputs(
            cls_logits=logits.float(), boxes=boxes, embeddings=torch.cat(embeddings, 1),
            class_anchors=torch.stack(class_anchors), anchor_index=torch.cat(level_of), score_kind="softmax",
            points=(anchors[0][:, :2] + anchors[0][:, 2:]) / 2, no_object=0,  # SSD's background class
        )


__all__ = ["TorchvisionFamily", "TorchvisionSSDFamily", "detector_root", "ssd_root"]
