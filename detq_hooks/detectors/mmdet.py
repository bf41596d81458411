"""The MMDetection family: models with a ``bbox_head`` (dense heads: RetinaNet, RTMDet, FCOS, ATSS, GFL, ...;
the DETR family), and MMEngine models laid out the same way.

* Prediction layers: the heads' final class/box convs (``conv_cls``, ``retina_reg``, ``rtm_cls.<i>``, ...) and
  the last layer of each DETR ``cls_branches``/``reg_branches`` MLP. Float-only: TOOD's task-decomposition
  ``reduction_conv`` (its weight is applied with ``bmm``; the conv's forward never runs).
* Stages: ``backbone`` / neck (with a transformer's encoder, decoder and query embeddings, and the head branches
  the transformer calls: DINO's box refinement, a two-stage DETR's proposal scoring) / head.
* Head outputs, dense heads: per-level outputs flattened to (B, A, C) logits and boxes decoded by the head's
  own ``bbox_coder`` at its priors; the classifier's inputs as region embeddings; its weight rows as class
  anchors (per level where each level has its own classifier, as in RTMDet). DETR heads: the last decoder
  layer's queries (``fc_cls`` heads: DETR, Conditional/DAB-DETR; ``cls_branches`` heads: Deformable DETR, DINO,
  whose denoising queries are left out); student queries are paired with the teacher's by Hungarian matching and
  the teacher's positives are its queries matched to the ground truth.
* Batches are what ``model.loss`` receives: ``(inputs, data_samples)``.
"""

from __future__ import annotations

import inspect
import re
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..curriculum import Stage
from ..distill import HeadOutputs
from ..modules import is_quantized_module
from ..recording import Recorded, Taps
from .base import DetectorFamily, UnsupportedDetectorError, blank_image, called_blocks, cxcywh_to_xyxy

PREDICTION_LEAF = re.compile(
    r"(^|\.)(conv_cls|conv_reg|retina_cls|retina_reg|fc_cls|fc_reg|conv_centerness|conv_objectness|"
    r"rtm_cls\.\d+|rtm_reg\.\d+|rtm_obj\.\d+|multi_level_conv_cls\.\d+|multi_level_conv_reg\.\d+|"
    r"multi_level_conv_obj\.\d+|(aux_)?cls_branches\.\d+|atss_cls|atss_reg|atss_centerness|gfl_cls|gfl_reg|tood_cls|"
    r"tood_reg|vfnet_cls|vfnet_reg|vfnet_reg_refine|rpn_cls|rpn_reg|"
    # YOLOv3, YOLOF, RepPoints, guided anchoring, SABL, Mask R-CNN's mask logits
    r"convs_pred\.\d+|cls_score|bbox_pred|object_pred|reppoints_cls_out|reppoints_pts_init_out|"
    r"reppoints_pts_refine_out|conv_loc|conv_shape|retina_bbox_cls|retina_bbox_reg|conv_logits)$"
)
# containers whose last layer predicts: MLP branches (DETR family, DDQ's auxiliary ones), CenterNet's output heads
PREDICTION_BRANCH = re.compile(r"(^|\.)((aux_)?reg_branches\.\d+|(aux_)?cls_branches\.\d+|heatmap_head|wh_head|offset_head)$")
# SSD's per-level `cls_convs.<i>` / `reg_convs.<i>` are its predictors (elsewhere those names are the towers)
SSD_PREDICTION_BRANCH = re.compile(r"^bbox_head\.(cls_convs|reg_convs)\.\d+$")
CLASSIFIER_LEAF = re.compile(r"(^|\.)(conv_cls|retina_cls|rtm_cls\.\d+|multi_level_conv_cls\.\d+|gfl_cls|atss_cls|tood_cls|vfnet_cls|fc_cls)$")
QUERY_CLASSIFIER = re.compile(r"^bbox_head\.cls_branches\.(\d+)$")  # Deformable DETR / DINO: one per decoder layer
HEAD_ROOTS = ("bbox_head", "roi_head", "rpn_head")


class MMDetFamily(DetectorFamily):
    name = "mmdet"
    reads_head = True

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model).__module__.startswith("mmdet.") or isinstance(getattr(model, "bbox_head", None), nn.Module)

    # ------------------------------------------------------------------ layers / structure
    def prediction_layers(self, model: nn.Module) -> Optional[list[str]]:
        names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        in_head = [n for n in names if n.split(".")[0] in HEAD_ROOTS]
        chosen = [n for n in in_head if PREDICTION_LEAF.search(n)]
        ssd = any(c.__name__ == "SSDHead" for c in type(getattr(model, "bbox_head", None)).__mro__)
        branches: dict[str, str] = {}
        for n in in_head:
            parts = n.split(".")
            for i in range(len(parts), 0, -1):
                root = ".".join(parts[:i])
                if (PREDICTION_BRANCH.search(root) or (ssd and SSD_PREDICTION_BRANCH.search(root))) and root != n:
                    branches[root] = n  # modules come in order: the last one wins
                    break
        found = sorted(set(chosen) | set(branches.values()), key=names.index)
        return found or None

    def float_layers(self, model: nn.Module) -> list[str]:
        """Convs whose forward never runs: TOOD's task decomposition multiplies its ``reduction_conv`` weight
        into a per-image attention and applies it with ``bmm``, so a fake-quant layer there would quantize nothing."""
        return [f"{n}.reduction_conv.conv" for n, m in model.named_modules()
                if type(m).__name__ == "TaskDecomposition" and isinstance(getattr(getattr(m, "reduction_conv", None), "conv", None), nn.Conv2d)]

    def stages(self, model: nn.Module) -> Optional[list[Stage]]:
        children = [n for n, m in model.named_children() if any(True for _ in m.parameters())]
        first = [n for n in children if n == "backbone"]
        head = [n for n in children if n in HEAD_ROOTS]
        middle = [n for n in children if n not in first and n not in head]
        if any(True for _ in model.parameters(recurse=False)):
            middle.append("")  # parameters the detector holds itself (Deformable DETR's level_embed): they feed the encoder
        if head and middle:
            # head branches the transformer calls itself join it: a layer trains in the stage of its first call
            called = self._head_layers_called_by_transformer(model)
            middle += called
            in_head = [n for n, _ in model.named_parameters() if n.split(".")[0] in head]
            if in_head and all(any(n.startswith(c + ".") for c in called) for n in in_head):
                head = []  # the transformer calls the whole head (two-stage Deformable DETR with shared branches)
        stages = []
        if first:
            stages.append(Stage("backbone", first, outputs=["backbone"]))
        if middle:
            stages.append(Stage("neck", middle, outputs=["neck"] if "neck" in middle else []))
        if head:
            stages.append(Stage("head", head))
        return stages if len(stages) >= 2 else None

    def _head_layers_called_by_transformer(self, model: nn.Module) -> list[str]:
        """The DETR head's branches that run inside the transformer, before the head's own forward: the box branches
        refining each decoder layer's reference points (Deformable DETR with box refinement, DINO, DDQ; DAB-DETR's
        ``fc_reg``), the branches scoring a two-stage model's encoder proposals (index ``num_layers``) and DDQ's
        classifiers of the inner decoder layers and auxiliary box branches, which its decoder calls to select
        distinct queries. Left in the head stage they would stay float and frozen while the decoder that calls them
        trains (README, "DINO")."""
        if not self._is_detr(model):
            return []
        head = model.bbox_head
        kinds = {c.__name__ for c in type(model).__mro__}
        names = []
        if getattr(model, "with_box_refine", False) or "DDQDETR" in kinds:
            names.append("bbox_head.reg_branches")
        layers = getattr(getattr(model, "decoder", None), "num_layers", None)
        for branches in ("cls_branches", "reg_branches") if getattr(model, "as_two_stage", False) else ():
            container = getattr(head, branches, None)
            if isinstance(container, nn.ModuleList) and layers is not None and layers < len(container):
                # a branch shared across layers (no box refinement) goes by its first name, as its parameters do
                first = next(i for i, m in enumerate(container) if m is container[layers])
                names.append(f"bbox_head.{branches}.{first}")
        if "DABDETR" in kinds:
            names.append("bbox_head.fc_reg")
        classifiers = getattr(head, "cls_branches", None)
        if "DDQDETR" in kinds and isinstance(classifiers, nn.ModuleList) and layers is not None:
            # its decoder scores layers 0..L-2 for the distinct-query selection; the last branch scores dense proposals
            names += [f"bbox_head.cls_branches.{i}" for i in (*range(layers - 1), len(classifiers) - 1)]
            names.append("bbox_head.aux_reg_branches")
        modules = dict(head.named_modules(prefix="bbox_head"))
        found = [n for n in dict.fromkeys(names) if n in modules]
        return [n for n in found if not any(n.startswith(f + ".") for f in found)]  # the widest name covers its items

    def reconstruction_blocks(self, model: nn.Module) -> list[str]:
        """Children of the backbone, neck and head, with containers (``ModuleList`` of levels or convs)
        expanded into the modules a forward calls (a module called several times -- a tower shared across
        levels, DINO's box branches in the decoder and in the head -- is fit to all its calls, and RTMDet's per-level
        tower modules, which share their convolutions, are fit together as one unit; blocks are reconstructed in the
        order the forward first calls them). A DETR head that reads only the decoder's queries is one block: its layers run on
        all decoder layers' queries stacked in front of the batch dimension; one that also reads reference points
        (Conditional DETR, Deformable DETR, DINO: batch first) is reconstructed per branch."""
        blocks = []
        # heads last: DETR models define bbox_head before the encoder and decoder that feed it
        children = sorted(model.named_children(), key=lambda kv: kv[0] in HEAD_ROOTS)
        for name, child in children:
            if not any(True for _ in child.parameters()):
                continue
            if (name == "bbox_head" and self._detr_head_is_one_block(model)) or isinstance(child, (nn.Conv2d, nn.Linear)) \
                    or is_quantized_module(child):
                blocks.append(name)  # a layer the detector calls itself (DINO's memory_trans_fc) is its own block
                continue
            kids = [b for k, c in child.named_children() if any(True for _ in c.parameters())
                    for b in called_blocks(c, f"{name}.{k}")]
            blocks.extend(kids or [name])
        return blocks

    def selected_query_blocks(self, model: nn.Module) -> list[str]:
        """Two-stage DETRs (DINO, two-stage Deformable DETR) pick the decoder's queries as the top-k encoder
        proposals: the decoder, the layers that embed the picked proposals, and the head's branches of the decoder
        layers (the branch scoring the encoder's proposals, index ``num_layers``, runs before the pick)."""
        if not (self._is_detr(model) and getattr(model, "as_two_stage", False)):
            return []
        modules = dict(model.named_modules())
        names = [n for n in ("decoder", "pos_trans_fc", "pos_trans_norm") if n in modules]
        layers = getattr(getattr(model, "decoder", None), "num_layers", None)
        for branches in ("cls_branches", "reg_branches"):
            container = getattr(model.bbox_head, branches, None)
            if isinstance(container, nn.ModuleList):
                names += [f"bbox_head.{branches}.{i}" for i in range(len(container)) if layers is None or i < layers]
        return names

    def class_names(self, model: nn.Module) -> Optional[list[str]]:
        meta = getattr(model, "dataset_meta", None) or {}
        classes = meta.get("classes")
        return list(classes) if classes else None

    # ------------------------------------------------------------------ head outputs
    def _classifiers(self, model: nn.Module) -> list[str]:
        names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n.startswith("bbox_head.")]
        branches = {int(m.group(1)): n for n in names if (m := QUERY_CLASSIFIER.match(n))}
        if branches:
            # the branch that scores the last decoder layer (with two-stage DINO one more scores the encoder's
            # proposals; shared branches appear once under their first name)
            last = getattr(getattr(model, "decoder", None), "num_layers", len(branches)) - 1
            return [branches[max(i for i in branches if i <= last)]]
        return [n for n in names if CLASSIFIER_LEAF.search(n)]

    @staticmethod
    def _is_detr(model: nn.Module) -> bool:
        head = getattr(model, "bbox_head", None)
        return head is not None and (hasattr(head, "fc_cls") or hasattr(head, "cls_branches")) and not hasattr(head, "prior_generator")

    def _detr_head_is_one_block(self, model: nn.Module) -> bool:
        """A DETR head whose forward reads only the stacked queries (DETR's): every tensor it reads and returns
        has the same leading dimension, so it can be reconstructed (and its boxes decoded for TASKQ) as one."""
        if not self._is_detr(model):
            return False
        return list(inspect.signature(model.bbox_head.forward).parameters) == ["hidden_states"]

    @staticmethod
    def _last_layer_queries(model: nn.Module, outs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The last decoder layer's (logits, boxes cxcywh) of a DETR head's output, without DINO's denoising
        queries (they come first; the matching queries are the model's last ``num_queries``)."""
        logits, boxes = outs[0][-1], outs[1][-1]
        n = getattr(model, "num_queries", None)
        if n is not None and logits.shape[-2] > n:
            logits, boxes = logits[..., -n:, :], boxes[..., -n:, :]
        return logits, boxes

    def head_taps(self, model: nn.Module) -> Taps:
        head = getattr(model, "bbox_head", None)
        classifiers = self._classifiers(model) if head is not None else []
        if head is None and hasattr(model, "roi_head"):
            raise UnsupportedDetectorError(
                f"{type(model).__name__} is a two-stage detector (rpn_head + roi_head): no family reads its heads' "
                "outputs, which distillation's head terms and the Fisher methods' critical objective need. "
                "Distillation of features alone works: set distillation.relational_weight/logit_weight/box_weight "
                "to 0; or subclass detq_hooks.detectors.DetectorFamily (README, 'Your own detector')"
            )
        if not classifiers or not (self._is_detr(model) or self._dense_decoding(head) is not None):
            raise UnsupportedDetectorError(
                f"{type(model).__name__}: no classifier layer with priors and a decoding this family knows found in its "
                f"bbox_head ({type(head).__name__ if head is not None else 'none'}); the MMDetection family reads dense "
                "heads (RetinaNet, RTMDet, YOLOX, FCOS, ATSS, AutoAssign, GFL, TOOD, ...: BaseDenseHead's decoding) and "
                "DETR heads. Subclass detq_hooks.detectors.DetectorFamily for this model (README, 'Your own detector') "
                "or use a recipe without distillation head terms"
            )
        return Taps(outputs=["bbox_head"], inputs=classifiers)

    def example_forward(self, model: nn.Module):
        if self._is_detr(model):
            return None  # its transformer needs data samples (image shapes, masks): the calibration batch is traced
        return lambda m: m(blank_image(m, (1, 3, 64, 64)), mode="tensor")

    def teacher_forward(self, teacher: nn.Module, batch: Any) -> None:
        """Calls the head as a module (MMDetection's ``mode="tensor"`` calls ``bbox_head.forward`` directly,
        which bypasses forward hooks)."""
        inputs, data_samples = batch
        feats = teacher.extract_feat(inputs)
        if getattr(teacher, "bbox_head", None) is None:  # two-stage: feature distillation reads backbone and neck only
            return
        if self._is_detr(teacher):
            head_inputs = teacher.forward_transformer(feats, data_samples)
            # what the head's forward takes (two-stage Deformable DETR / DINO add encoder outputs for the loss)
            wanted = inspect.signature(teacher.bbox_head.forward).parameters
            teacher.bbox_head(**{k: v for k, v in head_inputs.items() if k in wanted})
        else:
            teacher.bbox_head(feats)

    def head_outputs(self, model: nn.Module, recorded: Recorded, batch: Any) -> HeadOutputs:
        outs = recorded.output("bbox_head")
        classifiers = self._classifiers(model)
        if self._is_detr(model):
            name = classifiers[-1]
            logits, boxes = self._last_layer_queries(model, outs)
            emb = self._last_layer_input(recorded, name, logits.shape[-2])
            num_classes = model.bbox_head.num_classes
            kind = "softmax" if logits.shape[-1] > num_classes else "sigmoid"
            anchors = dict(model.named_modules())[name].weight.detach().float()[:num_classes]
            return HeadOutputs(logits, cxcywh_to_xyxy(boxes), emb, anchors, None, kind)
        return self._dense(model, outs, recorded, classifiers)

    @staticmethod
    def _last_layer_input(recorded: Recorded, name: str, num_queries: int) -> torch.Tensor:
        """The queries the last decoder layer's classifier read, without denoising queries: ``fc_cls`` runs once
        on all layers stacked (keep the last); a branch shared by all layers runs once per layer (its last call)."""
        emb = recorded.input(name)
        if emb.dim() == 4:
            emb = emb[-1]
        return emb[..., -num_queries:, :]

    @staticmethod
    def _is_yolox(head: nn.Module) -> bool:
        """YOLOX's head: no ``bbox_coder`` (boxes decoded by its own ``_bbox_decode`` at strided points) and an
        objectness branch that multiplies the class scores at inference."""
        return hasattr(head, "multi_level_conv_obj") and hasattr(head, "_bbox_decode")

    @staticmethod
    def _dense_decoding(head: nn.Module) -> Optional[str]:
        """How this dense head's inference turns its outputs into boxes and scores, where the family knows it:
        ``"base"`` (``BaseDenseHead``'s own: its ``bbox_coder`` at its priors, sigmoid or softmax scores, times the
        sigmoid of a third output, the score factor, where the head returns one: FCOS/ATSS centerness,
        AutoAssign objectness), ``"vfnet"`` (the same on its refined boxes, its last output in training and in
        eval), ``"yolox"``, ``"gfl"`` (the integral of the box distribution, times the stride,
        from the anchor centres), ``"tood"`` (boxes in stride units, scores already probabilities); ``None`` for a
        head whose own ``predict_by_feat`` does something else (PAA, FoveaBox, RepPoints, SABL, YOLOv3, ...)."""
        if head is None or not hasattr(head, "prior_generator"):
            return None
        if MMDetFamily._is_yolox(head):
            return "yolox"
        from mmdet.models.dense_heads import GFLHead, TOODHead, VFNetHead
        from mmdet.models.dense_heads.base_dense_head import BaseDenseHead

        single = type(head)._predict_by_feat_single  # a subclass that overrides it decodes its own way
        if isinstance(head, TOODHead) and single is TOODHead._predict_by_feat_single:
            return "tood"
        if isinstance(head, GFLHead) and single is GFLHead._predict_by_feat_single:
            return "gfl"
        base = single is BaseDenseHead._predict_by_feat_single and type(head).predict_by_feat is BaseDenseHead.predict_by_feat
        if base and isinstance(head, VFNetHead):
            return "vfnet"
        return "base" if base and hasattr(head, "bbox_coder") else None

    @classmethod
    def _decode_dense(cls, head: nn.Module, outs: Sequence[Sequence[torch.Tensor]]):
        """Per-level dense outputs flattened to ``(logits (B, A, C), boxes (B, A, 4) xyxy, level (A,), centers
        (A, 2))``, boxes and scores as the head's own ``predict_by_feat`` makes them (:meth:`_dense_decoding`).
        A score factor (YOLOX's objectness, FCOS's centerness) is folded into the logits: ``logit(σ(cls)·σ(f))``,
        the score its inference ranks by; TOOD's probabilities become logits."""
        decoding = cls._dense_decoding(head)
        if decoding is None:
            raise UnsupportedDetectorError(
                f"{type(head).__name__}: its predict_by_feat decodes boxes in a way the MMDetection family does not "
                "know (it reads BaseDenseHead's decoding, YOLOX, GFL, TOOD and VFNet); subclass "
                "detq_hooks.detectors.DetectorFamily for it (README, 'Your own detector')")
        cls_scores, bbox_preds = outs[0], outs[-1 if decoding == "vfnet" else 1]
        b, c, na = cls_scores[0].shape[0], head.cls_out_channels, getattr(head, "num_base_priors", 1)
        logits = torch.cat([s.permute(0, 2, 3, 1).reshape(b, -1, c) for s in cls_scores], 1)
        deltas = torch.cat([p.permute(0, 2, 3, 1).reshape(b, -1, p.shape[1] // na) for p in bbox_preds], 1).float()
        priors = head.prior_generator.grid_priors([s.shape[-2:] for s in cls_scores], device=logits.device,
                                                  **({"with_stride": True} if decoding == "yolox" else {}))
        level = torch.cat([torch.full((len(p),), i, device=logits.device) for i, p in enumerate(priors)])
        priors = torch.cat(priors).float()
        # YOLOX's objectness; BaseDenseHead's predict_by_feat(cls_scores, bbox_preds, score_factors) takes the third
        factor = outs[2] if decoding == "yolox" or (decoding == "base" and len(outs) > 2 and outs[2] is not None) else None
        if factor is not None:
            f = torch.cat([o.permute(0, 2, 3, 1).reshape(b, -1, 1) for o in factor], 1).float()
            cls_logits = logits.float()
            logits = -torch.logsumexp(torch.stack(torch.broadcast_tensors(-cls_logits, -f, -cls_logits - f)), 0)
        if decoding == "yolox":
            return logits, head._bbox_decode(priors, deltas), level, priors[:, :2]
        if priors.shape[-1] == 4 and "Anchor" in type(head.prior_generator).__name__:
            decode_from, centers = priors, (priors[:, :2] + priors[:, 2:]) / 2
        else:  # point priors (x, y[, stride_w, stride_h])
            decode_from = centers = priors[:, :2]
        n = decode_from.shape[0]
        if decoding in ("tood", "gfl"):
            stride = torch.tensor([float(s[0]) for s in head.prior_generator.strides], device=logits.device)[level.long()]
        if decoding == "tood":  # boxes in stride units; scores probabilities
            return torch.logit(logits.float(), eps=1e-6), deltas * stride[None, :, None], level, centers
        if decoding == "gfl":  # distances: the expectation of each side's distribution, in stride units
            distances = head.integral(deltas.reshape(b * n, -1)).reshape(b, n, 4) * stride[None, :, None]
            return logits, head.bbox_coder.decode(centers.repeat(b, 1), distances.reshape(b * n, 4)).reshape(b, n, 4), level, centers
        boxes = head.bbox_coder.decode(decode_from.repeat(b, 1), deltas.reshape(b * n, -1)).reshape(b, n, 4)
        return logits, boxes, level, centers

    @classmethod
    def _dense(cls, model: nn.Module, outs: Any, recorded: Recorded, classifiers: Sequence[str]) -> HeadOutputs:
        head = model.bbox_head
        logits, boxes, level, centers = cls._decode_dense(head, outs)
        b, c, na = logits.shape[0], head.cls_out_channels, getattr(head, "num_base_priors", 1)
        inputs = [x for name in classifiers for x in recorded.inputs[name]]
        emb = torch.cat([x.permute(0, 2, 3, 1).reshape(b, -1, x.shape[1]).repeat_interleave(na, 1) for x in inputs], 1)
        mods = dict(model.named_modules())
        weights = [mods[name].weight.detach().float().flatten(2).mean(-1).reshape(na, c, -1).mean(0) for name in classifiers]
        if len(weights) == 1:
            class_anchors, anchor_index = weights[0], None
        else:  # one classifier per level (RTMDet): anchors per level
            class_anchors, anchor_index = torch.stack(weights), level.long()
        return HeadOutputs(logits, boxes, emb, class_anchors, anchor_index, "sigmoid", centers)

    # ------------------------------------------------------------------ PTQ: the head's decoded boxes
    def head_block(self, model: nn.Module) -> Optional[str]:
        """``bbox_head`` of dense heads with priors and a box coder (or YOLOX's decode), and of DETR heads that are one block (DETR's;
        heads that also read reference points are reconstructed per branch, without the decoded-box loss)."""
        head = getattr(model, "bbox_head", None)
        dense = self._dense_decoding(head) is not None
        return "bbox_head" if dense or (head is not None and self._detr_head_is_one_block(model)) else None

    def decode_head_output(self, model: nn.Module, output: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense heads: boxes decoded by the head's ``bbox_coder`` at its priors (pixels, xyxy) and sigmoid (or
        softmax without background) class scores, per prior; DETR heads: the last decoder layer's boxes (xyxy,
        normalised by the image size) and class scores, per query."""
        head = model.bbox_head
        if self._is_detr(model):
            logits, boxes = self._last_layer_queries(model, output)
            boxes = cxcywh_to_xyxy(boxes)
        else:
            logits, boxes, _, _ = self._decode_dense(head, output)
        if logits.shape[-1] > head.num_classes:  # softmax with a background / no-object class
            return boxes, logits.float().softmax(-1)[..., : head.num_classes]
        return boxes, logits.float().sigmoid()

    def targets(self, model: nn.Module, recorded: Recorded, batch: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        from mmdet.structures.bbox import get_box_tensor

        data_samples = batch[1]
        boxes = [get_box_tensor(d.gt_instances.bboxes).float() for d in data_samples]
        if self._is_detr(model):  # DETR heads predict boxes normalised by the image size
            boxes = [bx / bx.new_tensor([d.metainfo["img_shape"][1], d.metainfo["img_shape"][0]] * 2)
                     for bx, d in zip(boxes, data_samples)]
        return boxes, [d.gt_instances.labels.long() for d in data_samples]

__all__ = ["MMDetFamily", "PREDICTION_LEAF", "CLASSIFIER_LEAF", "HEAD_ROOTS"]
