"""What a detector family is, asked once and answered once per family (used by every trainer adapter).

A family answers a few questions about a model: which layers are its final prediction layers, which must
stay float, its data-flow stages, its reconstruction blocks, and — for methods that read the head
(distillation, Fisher) — how to get class logits and decoded boxes of a batch and the batch's targets.

A user with a detector the built-in families do not know subclasses :class:`DetectorFamily` and answers
what they need (quantization, calibration, PTQ and export need nothing; the curriculum needs
:meth:`~DetectorFamily.stages`; distillation's head terms need :meth:`~DetectorFamily.head_taps`,
:meth:`~DetectorFamily.teacher_forward`, :meth:`~DetectorFamily.head_outputs` and
:meth:`~DetectorFamily.targets`). The README has a complete example.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from ..curriculum import Stage
from ..distill import Assignment, HeadOutputs, hungarian_match, task_aligned_positives
from ..recording import Recorded, Taps


class UnsupportedDetectorError(NotImplementedError):
    """A method needs an answer the model's detector family does not give (e.g. head outputs)."""


# Final classification/regression layers of common dense and query heads (torchvision, MMDetection-style names).
PREDICTION_LEAF = re.compile(
    r"(^|\.)(cls_logits|bbox_reg|bbox_ctrness|cls_score|bbox_pred|conv_cls|conv_reg|conv_centerness|"
    r"retina_cls|retina_reg|class_embed|fc_cls|fc_reg|"
    r"mask_fcn_logits|kps_score_lowres)$"  # torchvision Mask R-CNN / Keypoint R-CNN predictors
)


def cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    """Centre-size boxes (..., 4) as corner boxes."""
    return torch.cat([b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2], -1)


def called_blocks(module: nn.Module, prefix: str) -> list[str]:
    """``module``'s name, or — for containers that are never called themselves (``ModuleList``/``ModuleDict``)
    — the names of their items, recursively: the units a forward hook sees run."""
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        out = []
        for name, child in module.named_children():
            if any(True for _ in child.parameters()):
                out.extend(called_blocks(child, f"{prefix}.{name}" if prefix else name))
        return out
    return [prefix]


class DetectorFamily:
    """Answers detq-hooks' questions about one family of detectors. Subclass it for your own detector.

    Every method has a default that works for any model where it can (quantization needs no answer at all);
    the head-reading methods raise :class:`UnsupportedDetectorError` until a family implements them.
    """

    name = "generic"
    #: whether :meth:`head_outputs` / :meth:`targets` are implemented (distillation's head terms, Fisher).
    reads_head = False

    # ------------------------------------------------------------------ recognition
    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """Whether ``model`` belongs to this family (used by :func:`family_for`)."""
        return False

    # ------------------------------------------------------------------ layers
    def prediction_layers(self, model: nn.Module) -> Optional[list[str]]:
        """Names of the final class/box layers (kept at ``prediction_layer_bits``); ``None``: the last layer."""
        names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.ConvTranspose2d))]
        found = [n for n in names if PREDICTION_LEAF.search(n)]
        return found or None

    def first_layers(self, model: nn.Module) -> Optional[list[str]]:
        """Names of the layers that see the image; ``None``: the first quantizable layer."""
        return None

    def float_layers(self, model: nn.Module) -> list[str]:
        """Layers that must stay float whatever the recipe says (fixed, non-learned maths)."""
        return []

    # ------------------------------------------------------------------ structure
    def stages(self, model: nn.Module) -> Optional[list[Stage]]:
        """Data-flow stages for curriculum QAT (``None``: unknown; the recipe must name them).

        Default: a child ``backbone`` followed by ``neck``/``head``/``bbox_head``/``decode_head`` children (or a
        two-stage detector's ``rpn``/``roi_heads``, torchvision's R-CNNs), at the first module that has them (e.g.
        ``model.backbone`` inside a LightningModule).
        """
        for name, m in model.named_modules():
            kids = dict(m.named_children())
            later = [k for k in ("neck", "head", "bbox_head", "decode_head", "rpn", "roi_heads") if k in kids]
            if "backbone" in kids and later:
                p = f"{name}." if name else ""
                return [Stage("backbone", [p + "backbone"], [p + "backbone"]), Stage("neck_head", [p + k for k in later], [])]
        return None

    def reconstruction_blocks(self, model: nn.Module) -> list[str]:
        """Module names, in data-flow order, that PTQ block reconstruction optimises one at a time.

        Default: the children of each stage's modules, else the model's direct children."""
        stages = self.stages(model)
        mods = dict(model.named_modules())
        roots = [p for st in stages for p in st.prefixes if p in mods] if stages else [""]
        blocks = []
        for root in roots:
            kids = [b for k, c in mods[root].named_children() if any(True for _ in c.parameters())
                    for b in called_blocks(c, f"{root}.{k}" if root else k)]
            blocks.extend(kids or [root])
        return blocks

    def head_paths(self, model: nn.Module) -> list[str]:
        """The detection head's paths as module names — each scale's box branch and class branch — for head-wise
        PTQ reconstruction (TASKQ's STAHQ). ``[]``: not known (the head is
        reconstructed as the blocks :meth:`reconstruction_blocks` gives)."""
        return []

    def selected_query_blocks(self, model: nn.Module) -> list[str]:
        """Module names that run on queries the model selects from its own data (a two-stage DETR's top-k encoder
        proposals). A quantized model selects other queries than the float model (on a W4A8 DINO 12 % of the
        decoder's queries kept their index), so PTQ reconstructs a block inside one of them, or enclosing one,
        against the float block run on the quantized model's own input: the float model's output there belongs to
        other queries. ``[]`` (default): every block's inputs correspond element by element in both models."""
        return []

    def head_block(self, model: nn.Module) -> Optional[str]:
        """The module whose output is the head's (decoded in eval mode): where PTQ's detection-aware task
        regularisation reads boxes and scores (:meth:`decode_head_output`). ``None``: not known."""
        return None

    def decode_head_output(self, model: nn.Module, output: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(boxes (B, A, 4) xyxy, class scores (B, A, C) in [0, 1])`` from the eval-mode output of
        :meth:`head_block`, decoded the way the trainer's own inference does. DTR only compares the boxes of one
        anchor with each other (IoU): a frame that differs from the image's by a scale and shift per axis and
        anchor is as good."""
        raise self._unsupported(model, "decode_head_output")

    def example_forward(self, model: nn.Module) -> Optional[Callable[[nn.Module], Any]]:
        """``run(model)``: one forward pass on a small blank image, to trace which layers read which tensors
        (``quantization.shared_activations``, at conversion, before DDP and the optimizer see the model).
        ``None``: not known here (the first calibration batch is traced instead)."""
        return None

    def class_names(self, model: nn.Module) -> Optional[list[str]]:
        """Class names in label order, where the model knows them."""
        return None

    # ------------------------------------------------------------------ head outputs
    def head_taps(self, model: nn.Module) -> Taps:
        """The modules whose outputs/inputs :meth:`head_outputs` and :meth:`targets` read."""
        raise self._unsupported(model, "head_taps")

    def teacher_forward(self, teacher: nn.Module, batch: Any) -> None:
        """Run the (eval, no-grad) teacher on the batch's images so its taps are recorded.

        Default: ``teacher(images)`` with the images from :meth:`images`."""
        teacher(self.images(batch))

    def images(self, batch: Any) -> Any:
        """The model input of a batch in this family's convention (default: ``batch[0]`` of a tuple/list,
        ``batch["img"]``/``batch["inputs"]`` of a dict, else the batch)."""
        if isinstance(batch, (list, tuple)):
            return batch[0]
        if isinstance(batch, dict):
            for key in ("img", "inputs", "images"):
                if key in batch:
                    return batch[key]
        return batch

    def head_outputs(self, model: nn.Module, recorded: Recorded, batch: Any) -> HeadOutputs:
        """Class logits (B, A, C), decoded xyxy boxes (B, A, 4), region embeddings, class anchors and the
        anchor/query points of one batch, from what was recorded at :meth:`head_taps`."""
        raise self._unsupported(model, "head_outputs")

    def targets(self, model: nn.Module, recorded: Recorded, batch: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Ground truth of the batch per image, in the frame of the decoded boxes: (M, 4) xyxy and (M,) labels."""
        raise self._unsupported(model, "targets")

    def distillation_pair(self, student: HeadOutputs, teacher: HeadOutputs,
                          targets: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]) -> tuple[HeadOutputs, HeadOutputs, Assignment]:
        """Pair student and teacher predictions and pick the teacher's positives.

        Dense heads (``points`` given): the same anchor in both; positives by task-aligned assignment of the
        teacher's predictions to the ground truth. Query heads (no ``points``): :func:`pair_queries`."""
        if teacher.points is None:
            return pair_queries(student, teacher, targets)
        assignment = task_aligned_positives(teacher.cls_logits.detach(), teacher.boxes.detach(), teacher.points,
                                            targets[0], targets[1], score_kind=teacher.score_kind)
        return student, teacher, assignment

    # ------------------------------------------------------------------ messages
    def _unsupported(self, model: nn.Module, what: str) -> UnsupportedDetectorError:
        return UnsupportedDetectorError(
            f"{type(model).__name__} is not a detector family detq-hooks can read the head of "
            f"(family {self.name!r} has no `{what}`); distillation's head terms need it. Subclass "
            "detq_hooks.detectors.DetectorFamily and answer head_taps/head_outputs/targets (README, "
            "'Your own detector'), pass it as `family=`, or use a recipe without head terms "
            "(distillation.relational_weight/logit_weight/box_weight: 0)"
        )


def blank_image(model: nn.Module, shape: tuple) -> torch.Tensor:
    """Zeros of ``shape`` on the device and in the float type of ``model``'s parameters."""
    p = next(model.parameters(), None)
    return torch.zeros(shape, device=p.device if p is not None else None,
                       dtype=p.dtype if p is not None and p.is_floating_point() else None)


def pair_queries(student: HeadOutputs, teacher: HeadOutputs, targets) -> tuple[HeadOutputs, HeadOutputs, Assignment]:
    """Query heads (DETR family: no anchor points): each teacher query paired with a student query by Hungarian
    matching of their boxes and scores (the student's reordered to the teacher's), the teacher's positives by
    Hungarian matching of its queries to the ground truth."""
    s_logits, s_boxes = student.cls_logits, student.boxes
    t_logits, t_boxes = teacher.cls_logits.detach(), teacher.boxes.detach()
    b, q, c1 = t_logits.shape
    num_classes = teacher.class_anchors.shape[0]
    order = []
    positives = torch.zeros(b, q, dtype=torch.bool, device=t_logits.device)
    labels = torch.zeros(b, q, dtype=torch.long, device=t_logits.device)
    gt_boxes, gt_labels = targets
    for i in range(b):
        s_idx, t_idx = hungarian_match(s_boxes[i].detach(), s_logits[i, :, :num_classes].detach(),
                                       t_boxes[i], t_logits[i, :, :num_classes])
        perm = torch.empty(q, dtype=torch.long, device=t_logits.device)
        perm[t_idx] = s_idx.to(t_logits.device)
        order.append(perm)
        if len(gt_boxes[i]):
            onehot = torch.full((len(gt_boxes[i]), num_classes), -10.0, device=t_logits.device)
            onehot[torch.arange(len(gt_boxes[i])), gt_labels[i]] = 10.0
            tq, g = hungarian_match(t_boxes[i], t_logits[i, :, :num_classes], gt_boxes[i].to(t_logits.device), onehot)
            positives[i, tq] = True
            labels[i, tq] = gt_labels[i].to(t_logits.device)[g]
    idx = torch.stack(order)

    def take(x: torch.Tensor) -> torch.Tensor:
        return torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))

    s = HeadOutputs(take(s_logits), take(s_boxes), take(student.embeddings), None, None, student.score_kind)
    return s, teacher, Assignment(positives, labels)


__all__ = ["DetectorFamily", "UnsupportedDetectorError", "PREDICTION_LEAF", "blank_image", "called_blocks",
           "cxcywh_to_xyxy", "pair_queries"]

