"""The Ultralytics family: YOLOv8/YOLO11/YOLO26 (``Detect``/``v10Detect``/``YOLO26`` heads), their
segmentation, pose and oriented-box heads, and RT-DETR.

* Prediction layers: the last Conv2d/Linear of each branch of the head (``cv2``/``cv3``, the end-to-end
  ``one2one_*`` branches, the mask-coefficient / keypoint / angle branches ``cv4``, the mask prototypes'
  output conv, RT-DETR's score/box heads). Float-only: DFL's fixed integral conv, and the branches only
  the training loss runs (YOLO26 pose's keypoint sigmas and RealNVP flow, YOLO26 segment's semantic
  logits): inference, calibration and export never run them.
* Stages (CR-QAT's K = 2): ``backbone`` = ``model.0 .. model.{nb-1}`` (``nb = len(yaml['backbone'])``) and
  ``neck_head`` = the rest; a stage's PKD features are the outputs of its layers that later layers read.
* Head outputs (YOLO heads; end-to-end heads give the one-to-many branch): class logits, boxes decoded from
  the DFL distribution at each anchor point, the last class conv's inputs as region embeddings and its
  weight rows (one set per scale) as class anchors. RT-DETR (``RTDETRDecoder``): the queries of the decoder
  layer inference reads (``eval_idx``), denoising queries left out, boxes normalised xyxy (as DETR heads
  are matched: student to teacher queries and teacher to ground truth by the Hungarian algorithm), the
  queries its classifier reads as region embeddings, its rows as class anchors.
* Batches are Ultralytics' preprocessed batch dicts (``img``, ``batch_idx``, ``bboxes`` normalised xywh, ``cls``).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..curriculum import Stage
from ..distill import HeadOutputs
from ..recording import Recorded, Taps
from .base import DetectorFamily, UnsupportedDetectorError, blank_image, called_blocks, cxcywh_to_xyxy

# Attributes of Ultralytics heads whose sub-branches each end in one prediction layer.
HEAD_BRANCHES = (
    "cv2", "cv3", "one2one_cv2", "one2one_cv3",  # Detect / v10Detect / YOLO26 (end-to-end)
    "cv4", "one2one_cv4",  # Segment mask coefficients, Pose keypoints, OBB angles
    "cv4_kpts", "one2one_cv4_kpts",  # YOLO26 pose keypoints
    "dec_score_head", "dec_bbox_head", "enc_score_head", "enc_bbox_head",  # RTDETRDecoder
)

# Head branches only the training loss runs (eval, calibration and export skip them): kept float.
TRAINING_ONLY_BRANCHES = (
    "cv4_sigma", "one2one_cv4_sigma", "flow_model",  # YOLO26 pose: keypoint sigmas, RealNVP density of the loss
    "proto.semseg",  # YOLO26 segment: semantic-segmentation logits of an auxiliary loss
)


def head_name(model: nn.Module) -> str:
    return f"model.{len(model.model) - 1}"


def is_yolo_head(model: nn.Module) -> bool:
    head = model.model[-1]
    return hasattr(head, "cv3") and hasattr(head, "cv2")


def is_rtdetr_head(model: nn.Module) -> bool:
    head = model.model[-1]
    return hasattr(head, "dec_score_head") and hasattr(head, "decoder")


def is_obb_head(model: nn.Module) -> bool:
    """Oriented boxes (``OBB``/``OBB26``): their boxes are rotated by a predicted angle."""
    from ultralytics.nn.modules.head import OBB

    return isinstance(model.model[-1], OBB)


def _rtdetr_layer(head: nn.Module) -> int:
    """The decoder layer inference reads (``eval_idx``, negative from the end)."""
    n = len(head.dec_score_head)
    return head.decoder.eval_idx % n


def ultralytics_stages(model: nn.Module, split: str = "paper") -> list[Stage]:
    """Data-flow stages of an Ultralytics model from its yaml (``split="three"``: backbone / neck / head)."""
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
    backbone = Stage("backbone", [f"model.{i}" for i in range(nb)], [f"model.{i}" for i in sorted(read_later)])
    if split == "three":
        neck = Stage("neck", [f"model.{i}" for i in range(nb, head_idx)], [f"model.{i}" for i in head_in])
        return [backbone, neck, Stage("head", [f"model.{head_idx}"], [])]
    return [backbone, Stage("neck_head", [f"model.{i}" for i in range(nb, n)], [])]


class UltralyticsFamily(DetectorFamily):
    name = "ultralytics"
    reads_head = True

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model).__module__.startswith("ultralytics.") and isinstance(getattr(model, "model", None), nn.Sequential)

    # ------------------------------------------------------------------ layers
    def prediction_layers(self, model: nn.Module) -> list[str]:
        head = model.model[-1]
        prefix = head_name(model)
        names: list[str] = []
        for attr in HEAD_BRANCHES:
            sub = getattr(head, attr, None)
            if not isinstance(sub, nn.Module):
                continue
            branches = list(sub.named_children()) if isinstance(sub, nn.ModuleList) else [("", sub)]
            for idx, branch in branches:
                leaves = [n for n, m in branch.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
                if leaves:
                    names.append(".".join(p for p in (prefix, attr, idx, leaves[-1]) if p))
        proto_out = getattr(getattr(getattr(head, "proto", None), "cv3", None), "conv", None)
        if isinstance(proto_out, nn.Conv2d):  # the mask prototypes the coefficients combine
            names.append(f"{prefix}.proto.cv3.conv")
        return names

    def float_layers(self, model: nn.Module) -> list[str]:
        head, prefix = model.model[-1], head_name(model)
        conv = getattr(getattr(head, "dfl", None), "conv", None)
        names = [f"{prefix}.dfl.conv"] if isinstance(conv, nn.Conv2d) else []
        for path in TRAINING_ONLY_BRANCHES:
            try:
                sub = head.get_submodule(path)
            except AttributeError:  # this head has no such branch
                continue
            names += [".".join(p for p in (prefix, path, n) if p) for n, m in sub.named_modules()
                      if isinstance(m, (nn.Conv2d, nn.Linear, nn.ConvTranspose2d))]
        return names

    def stages(self, model: nn.Module) -> list[Stage]:
        return ultralytics_stages(model)

    def reconstruction_blocks(self, model: nn.Module) -> list[str]:
        """Each layer of the yaml; RT-DETR's decoder head by its parts (its own output stacks the decoder layers
        in front of the batch): input projections, encoder-output heads, query position head, then each decoder
        layer with its box and score heads."""
        blocks = [f"model.{i}" for i in range(len(model.model))]
        if not is_rtdetr_head(model):
            return blocks
        head, p = model.model[-1], blocks.pop()
        parts = called_blocks(head.input_proj, f"{p}.input_proj")
        parts += [f"{p}.{n}" for n in ("enc_output", "enc_score_head", "enc_bbox_head", "query_pos_head")]
        for i in range(len(head.decoder.layers)):
            parts += [f"{p}.decoder.layers.{i}", f"{p}.dec_bbox_head.{i}", f"{p}.dec_score_head.{i}"]
        return blocks + parts

    def selected_query_blocks(self, model: nn.Module) -> list[str]:
        """RT-DETR's decoder runs on the top-k encoder proposals: its layers, query position head, box and score
        heads (and a learned query embedding)."""
        if not is_rtdetr_head(model):
            return []
        p, head = head_name(model), model.model[-1]
        return [f"{p}.{n}" for n in ("decoder", "query_pos_head", "dec_bbox_head", "dec_score_head", "tgt_embed")
                if hasattr(head, n)]

    def head_paths(self, model: nn.Module) -> list[str]:
        """Box (``cv2``) and class (``cv3``) branch of each scale; end-to-end heads (YOLOv10, YOLO26): the
        one-to-one branches, the ones inference runs."""
        if not is_yolo_head(model):
            return []
        head = model.model[-1]
        prefix = "one2one_" if getattr(head, "end2end", False) and hasattr(head, "one2one_cv2") else ""
        return [f"{head_name(model)}.{prefix}{branch}.{i}" for i in range(head.nl) for branch in ("cv2", "cv3")]

    def head_block(self, model: nn.Module) -> Optional[str]:
        return head_name(model) if is_yolo_head(model) and not is_obb_head(model) else None

    def decode_head_output(self, model: nn.Module, output: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The Detect head's own inference decoding (``Detect._inference`` on the branch inference uses: the
        one-to-one branch of end-to-end heads) of its eval-mode raw predictions: xyxy boxes in pixels and
        sigmoid class scores."""
        head = model.model[-1]
        if is_obb_head(model):
            raise UnsupportedDetectorError(f"{type(head).__name__}: rotated boxes are not decoded by the Ultralytics "
                                           "family (axis-aligned YOLO heads and RT-DETR are)")
        preds = output[1] if isinstance(output, (tuple, list)) and len(output) > 1 and isinstance(output[1], dict) else None
        if preds is None or not hasattr(head, "_inference"):
            raise UnsupportedDetectorError(f"{type(head).__name__} gave no raw predictions (export mode?): the decoded "
                                           "boxes per anchor cannot be read")
        end2end = bool(getattr(head, "end2end", False))
        branch = preds["one2one" if end2end else "one2many"] if "one2one" in preds else preds
        decoded = head._inference(branch)  # (B, 4 + C, A)
        boxes, scores = decoded[:, :4].transpose(1, 2), decoded[:, 4 : 4 + head.nc].transpose(1, 2)
        if not end2end and not getattr(head, "xyxy", False):  # xywh -> xyxy
            boxes = cxcywh_to_xyxy(boxes)
        return boxes, scores

    def class_names(self, model: nn.Module) -> Optional[list[str]]:
        names = getattr(model, "names", None)
        if isinstance(names, dict):
            return [names[i] for i in sorted(names)]
        return list(names) if names else None

    # ------------------------------------------------------------------ head outputs
    def _class_convs(self, model: nn.Module) -> list[str]:
        head = model.model[-1]
        return [f"{head_name(model)}.cv3.{i}.{len(b) - 1}" for i, b in enumerate(head.cv3)]

    def _query_classifier(self, model: nn.Module) -> str:
        return f"{head_name(model)}.dec_score_head.{_rtdetr_layer(model.model[-1])}"

    def head_taps(self, model: nn.Module) -> Taps:
        if is_rtdetr_head(model):
            return Taps(outputs=[head_name(model)], inputs=[self._query_classifier(model)])
        if is_obb_head(model):
            raise UnsupportedDetectorError(
                f"detq: the {type(model.model[-1]).__name__} head's boxes are rotated by a predicted angle, which the "
                "Ultralytics family does not read (it reads axis-aligned YOLO heads, their segment and pose variants, "
                "and RT-DETR); use a recipe without distillation head terms or the Fisher critical objective"
            )
        if not is_yolo_head(model):
            raise UnsupportedDetectorError(
                f"detq: the {type(model.model[-1]).__name__} head of {type(model).__name__} is not read by the "
                "Ultralytics family yet (YOLO Detect/v10Detect/YOLO26 and RT-DETR heads are); use a recipe without "
                "distillation head terms (the curriculum alone works)"
            )
        return Taps(outputs=[head_name(model)], inputs=self._class_convs(model))

    def teacher_forward(self, teacher: nn.Module, batch: Any) -> None:
        teacher(batch["img"])

    def example_forward(self, model: nn.Module):
        return lambda m: m(blank_image(m, (1, 3, 64, 64)))

    def _query_outputs(self, model: nn.Module, recorded: Recorded) -> HeadOutputs:
        """RT-DETR: training returns ``(dec_bboxes, dec_scores, enc_bboxes, enc_scores, dn_meta)`` for every
        decoder layer, denoising queries first; eval returns ``(predictions, that tuple)`` for ``eval_idx`` only."""
        out = recorded.output(head_name(model))
        raw = out[1] if len(out) == 2 else out
        dec_bboxes, dec_scores, dn_meta = raw[0], raw[1], raw[4]
        layer = _rtdetr_layer(model.model[-1]) if dec_scores.shape[0] > 1 else -1
        num_dn = int(dn_meta["dn_num_split"][0]) if dn_meta else 0
        name = self._query_classifier(model)
        emb = recorded.input(name)[:, num_dn:]
        anchors = dict(model.named_modules())[name].weight.detach().float()
        return HeadOutputs(dec_scores[layer][:, num_dn:], cxcywh_to_xyxy(dec_bboxes[layer][:, num_dn:].float()),
                           emb, anchors, None, "sigmoid")

    def head_outputs(self, model: nn.Module, recorded: Recorded, batch: Any) -> HeadOutputs:
        from ultralytics.utils.tal import dist2bbox, make_anchors

        if is_rtdetr_head(model):
            return self._query_outputs(model, recorded)

        head = model.model[-1]
        out = recorded.output(head_name(model))
        preds = out[1] if isinstance(out, tuple) else out  # eval mode (teacher) returns (decoded, raw)
        p = preds["one2many"] if "one2many" in preds else preds
        logits = p["scores"].permute(0, 2, 1)
        dist = p["boxes"].permute(0, 2, 1).float()
        anchors, strides = make_anchors(p["feats"], head.stride, 0.5)
        if head.reg_max > 1:
            b, a, c = dist.shape
            proj = torch.arange(head.reg_max, dtype=torch.float, device=dist.device)
            dist = dist.view(b, a, 4, c // 4).softmax(3).matmul(proj)
        boxes = dist2bbox(dist, anchors, xywh=False) * strides
        embs, index = [], []
        for lvl, name in enumerate(self._class_convs(model)):
            e = recorded.input(name)
            embs.append(e.flatten(2).transpose(1, 2))
            index.append(torch.full((e.shape[2] * e.shape[3],), lvl, dtype=torch.long, device=e.device))
        modules = dict(model.named_modules())
        class_anchors = torch.stack([modules[n].weight.detach().flatten(1).float() for n in self._class_convs(model)])
        return HeadOutputs(logits, boxes, torch.cat(embs, 1), class_anchors, torch.cat(index), "sigmoid", anchors * strides)

    def targets(self, model: nn.Module, recorded: Recorded, batch: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        img = batch["img"]
        h, w = img.shape[2:]
        # YOLO heads' boxes are in pixels; RT-DETR's queries normalised, as the batch's boxes are
        scale = torch.tensor([w, h, w, h], device=img.device, dtype=torch.float32) if not is_rtdetr_head(model) else 1.0
        boxes, labels = [], []
        for i in range(img.shape[0]):
            sel = batch["batch_idx"].view(-1) == i
            b = batch["bboxes"][sel].to(img.device).float() * scale
            boxes.append(cxcywh_to_xyxy(b))
            labels.append(batch["cls"][sel].view(-1).long().to(img.device))
        return boxes, labels


__all__ = ["UltralyticsFamily", "ultralytics_stages", "is_yolo_head", "is_rtdetr_head", "is_obb_head", "head_name",
           "HEAD_BRANCHES"]
