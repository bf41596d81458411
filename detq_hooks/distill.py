"""Distillation from a frozen full-precision teacher (CR-QAT), written once for every trainer.

The losses take plain tensors that the adapters extract from their detector:

* :func:`pkd_loss`: Pearson-correlation feature distillation (normalise each channel to zero mean and unit
  variance over batch and space, then MSE) on each stage's output features.
* :func:`relational_loss`: class-anchored relational distillation (TRKD/TPSD). For each image and each
  class c among the teacher's positives: ``X_c = [t_c; v_c,1..N]``, rows L2-normalised,
  ``S_c = X̂ X̂ᵀ``; the loss is the mean over (image, class) of ``(1/(1+N)²)·Σ smoothL1(S^s_c − S^t_c)``.
  ``t_c`` is the class anchor (the teacher's classifier weight row of that class for closed-set heads, or a
  text embedding), fixed and shared by student and teacher.
* :func:`logit_loss`: distillation of the classification scores on the teacher's positives (sigmoid heads:
  BCE to the teacher's probabilities; softmax heads: KL at a temperature).
* :func:`box_consistency_loss`: ``1 − IoU`` between student and teacher boxes at the same anchor/query,
  weighted by the teacher's confidence.
* :func:`hungarian_match`: student↔teacher query matching for DETR-style heads (scipy).

:class:`Teacher` holds the frozen float model outside the student's module tree, so optimizers, EMA,
checkpoints and DDP never see it. :class:`DistillationLoss` combines the terms per curriculum stage.
"""

from __future__ import annotations

import copy
import os
import weakref
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torch.overrides import TorchFunctionMode

from .recipe import DistillationSection


# ----------------------------------------------------------------------------------------------- losses
STD_FLOOR = 1e-2  # of the whole feature map's std


def _channel_standardize(f: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    c = f.shape[1]
    # rows in memory order: a channels-last map (the teacher's inference copy on CPU) reshapes to a column-major
    # view, which every reduction below and the MSE against the student's rows would read across strides
    flat = f.transpose(0, 1).reshape(c, -1).contiguous()
    n = flat.shape[1]
    # A channel with (almost) no spread -- dead after an activation, or a 1x1 level over two images -- would be
    # divided by ~eps and its gradient scaled up as much (x1e4 for a constant channel): each channel's std is
    # floored at a small fraction of the whole map's, which leaves healthy channels as they are.
    # The statistics from one centred map (ATen's std along a row is ~10x slower than this on CPU): the whole map's
    # variance by the law of total variance from the channels' (all channels have n elements). The floor is applied
    # to the variances, and the square root taken of at least 1e-30, so that a constant channel's gradient is 0,
    # not 0 * inf.
    mean = flat.mean(1, keepdim=True)
    centred = flat - mean
    squares = centred.square().sum(1, keepdim=True)
    whole_var = (squares / n + (mean - mean.mean()).square()).mean()
    var = torch.maximum(squares / max(n - 1, 1), STD_FLOOR ** 2 * whole_var)  # Bessel's correction where n > 1
    return centred / (var.clamp_min(1e-30).sqrt() + eps)


class _PKDMap(torch.autograd.Function):
    """``mse(standardize(s), t̂) / 2`` for one feature map, whose backward recomputes the standardisation from
    ``s``. Autograd would keep three map-sized tensors of the student's standardisation until the backward (the
    centred map, its standardised copy, the MSE's input); this keeps ``s`` and the teacher's ``t̂`` only (YOLO11n
    W4A4 CR-QAT, batch 16 at 160 px: 9 MB less held for backward). Same forward and gradient. No double backward:
    it raises instead of returning a gradient without second-order terms (the Fisher methods differentiate the
    detection loss twice, never this term)."""

    @staticmethod
    def forward(ctx, s: torch.Tensor, t_hat: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(s, t_hat)
        return F.mse_loss(_channel_standardize(s), t_hat) / 2

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if torch.is_grad_enabled():  # backward(create_graph=True) runs in grad mode
            raise RuntimeError("pkd_loss has no double backward (its backward recomputes the standardisation to save "
                               "memory): leave the distillation terms out of a loss differentiated twice")
        s, t_hat = ctx.saved_tensors
        with torch.enable_grad():
            leaf = s.detach().requires_grad_(True)
            (grad_s,) = torch.autograd.grad(F.mse_loss(_channel_standardize(leaf), t_hat) / 2, leaf, grad)
        return grad_s, None


def pkd_loss(student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor]) -> torch.Tensor:
    """Pearson-correlation (PKD) feature distillation averaged over the given feature maps (N, C, ...)."""
    if len(student_feats) != len(teacher_feats) or not student_feats:
        raise ValueError(f"pkd_loss needs matching non-empty feature lists, got {len(student_feats)} and {len(teacher_feats)}")
    total = 0.0
    for s, t in zip(student_feats, teacher_feats):
        if s.shape != t.shape:
            raise ValueError(f"student feature {tuple(s.shape)} and teacher feature {tuple(t.shape)} differ in shape")
        with torch.no_grad():
            t_hat = _channel_standardize(t.float())
        s = s.float()
        total = total + (_PKDMap.apply(s, t_hat) if s.requires_grad else F.mse_loss(_channel_standardize(s), t_hat) / 2)
    return total / len(student_feats)


_RELATIONAL_CHUNK = 1024  # positives per Gram matrix in relational_loss (1024² floats = 4 MB)


def relational_loss(
    student_emb: torch.Tensor,
    teacher_emb: torch.Tensor,
    class_anchors: torch.Tensor,
    labels: torch.Tensor,
    positives: torch.Tensor,
    anchor_index: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Class-anchored relational distillation (TRKD/TPSD).

    Args:
        student_emb / teacher_emb: region embeddings, (B, A, D).
        class_anchors: (C, D) anchors, or (L, C, D) when each group of anchors (e.g. a YOLO scale) has its own
            classifier; then ``anchor_index`` (A,) gives each anchor's group.
        labels: (B, A) class of each anchor (the teacher's assignment).
        positives: (B, A) bool, the teacher's positive anchors/queries.
    """
    s_emb, t_emb = student_emb.float(), teacher_emb.detach().float()
    anchors = F.normalize(class_anchors.detach().float(), dim=-1)
    total, groups = s_emb.new_zeros(()), 0
    for b in range(s_emb.shape[0]):
        pos = positives[b].nonzero().flatten()
        if pos.numel() == 0:
            continue
        lab = labels[b, pos]
        grp = anchor_index[pos] if anchor_index is not None else torch.zeros_like(lab)
        _, key = torch.stack([lab, grp], 1).unique(dim=0, return_inverse=True)  # one X_c per (class, group)
        group_sizes = torch.bincount(key)
        counts = group_sizes.tolist()
        order = torch.argsort(key, stable=True)
        # All of an image's groups in a few matrix products instead of one small product per group: the groups
        # are taken whole, in chunks of up to _RELATIONAL_CHUNK positives, so a matrix is chunk², never P².
        start = first = 0  # first group of the chunk, and its first position in `order`
        while start < len(counts):
            stop, size = start, 0
            while stop < len(counts) and (size == 0 or size + counts[stop] <= _RELATIONAL_CHUNK):
                size += counts[stop]
                stop += 1
            sel = order[first:first + size]
            k = key[sel]
            xs, xt = F.normalize(s_emb[b, pos[sel]], dim=1), F.normalize(t_emb[b, pos[sel]], dim=1)
            a = anchors[grp[sel], lab[sel]] if anchors.dim() == 3 else anchors[lab[sel]]
            weight = 1.0 / (group_sizes[k].to(xs.dtype) + 1) ** 2  # 1 / |X_c|², the anchor row included
            same = k[:, None] == k[None, :]
            pairs = F.smooth_l1_loss(xs @ xs.T, xt @ xt.T, reduction="none")
            # the anchor's row and column of S_c (its own entry is 1 for both: no loss)
            to_anchor = F.smooth_l1_loss((xs * a).sum(1), (xt * a).sum(1), reduction="none")
            total = total + (pairs * same * weight[:, None]).sum() + 2 * (to_anchor * weight).sum()
            groups += stop - start
            start, first = stop, first + size
    return total / max(groups, 1)


def logit_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    kind: str = "sigmoid",
    temperature: float = 1.0,
) -> torch.Tensor:
    """Score distillation on (..., C) logits, averaged over the anchors selected by ``mask``."""
    s, t = student_logits.float() / temperature, teacher_logits.detach().float() / temperature
    if mask is not None:
        s, t = s[mask], t[mask]
    if s.numel() == 0:
        return student_logits.sum() * 0.0
    if kind == "sigmoid":
        # Bernoulli KL(σ(t) || σ(s)) per class, from log-sigmoids: no cancellation of two large cross-entropies
        # (which rounds small divergences to 0 or below it).
        p = torch.sigmoid(t)
        kl = p * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p) * (F.logsigmoid(-t) - F.logsigmoid(-s))
        per = kl.clamp_min(0).sum(-1)  # >= 0 exactly; rounding near equality could dip below
    elif kind == "softmax":
        per = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1)
    else:
        raise ValueError(f"logit_loss kind {kind!r} is not one of ['sigmoid', 'softmax']")
    return per.mean() * temperature**2


def elementwise_iou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """IoU of paired xyxy boxes (..., 4) -> (...)."""
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)
    return inter / (area_a + area_b - inter + eps)


def box_consistency_loss(
    student_boxes: torch.Tensor,
    teacher_boxes: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Mean of ``1 − IoU(student, teacher)`` over paired boxes, weighted (e.g. by the teacher's confidence)."""
    loss = 1.0 - elementwise_iou(student_boxes.float(), teacher_boxes.detach().float())
    w = torch.ones_like(loss) if weights is None else weights.detach().float()
    if mask is not None:
        loss, w = loss[mask], w[mask]
    if loss.numel() == 0:
        return student_boxes.sum() * 0.0
    return (loss * w).sum() / w.sum().clamp_min(1e-6)


@torch.no_grad()
def hungarian_match(
    student_boxes: torch.Tensor,
    student_logits: torch.Tensor,
    teacher_boxes: torch.Tensor,
    teacher_logits: torch.Tensor,
    box_weight: float = 5.0,
    iou_weight: float = 2.0,
    class_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Match student queries to teacher queries of one image (Q, 4)/(Q, C) with scipy's assignment solver.

    Returns ``(student_index, teacher_index)``: the student query paired with each teacher query.
    """
    from scipy.optimize import linear_sum_assignment

    sb, tb = student_boxes.float(), teacher_boxes.float()
    cost = box_weight * torch.cdist(sb, tb, p=1)
    lt = torch.maximum(sb[:, None, :2], tb[None, :, :2])
    rb = torch.minimum(sb[:, None, 2:], tb[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_s = (sb[:, 2:] - sb[:, :2]).clamp(min=0).prod(-1)
    area_t = (tb[:, 2:] - tb[:, :2]).clamp(min=0).prod(-1)
    iou = inter / (area_s[:, None] + area_t[None, :] - inter + 1e-7)
    cost = cost - iou_weight * iou
    cost = cost + class_weight * torch.cdist(student_logits.float().sigmoid(), teacher_logits.float().sigmoid(), p=1)
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)


@torch.no_grad()
def task_aligned_positives(
    teacher_logits: torch.Tensor,
    teacher_boxes: torch.Tensor,
    prior_centers: torch.Tensor,
    gt_boxes: Sequence[torch.Tensor],
    gt_labels: Sequence[torch.Tensor],
    topk: int = 9,
    alpha: float = 1.0,
    beta: float = 6.0,
    score_kind: str = "sigmoid",
) -> Assignment:
    """The teacher's positive anchors for a dense head: task-aligned assignment (TOOD / YOLOv8's TAL).

    For every ground-truth box, among the anchors whose prior centre lies inside it, the ``topk`` with the
    highest alignment ``score^alpha * IoU^beta`` of the *teacher's* prediction become positives of that
    box's class; an anchor claimed by several boxes goes to the one it is best aligned with.

    Args:
        teacher_logits: (B, A, C) class logits; teacher_boxes: (B, A, 4) decoded xyxy boxes.
        prior_centers: (A, 2) anchor/point centres in the same coordinates as the boxes.
        gt_boxes / gt_labels: per image (M, 4) xyxy and (M,) class indices.
    """
    b, a, _ = teacher_logits.shape
    scores = teacher_logits.float().sigmoid() if score_kind == "sigmoid" else teacher_logits.float().softmax(-1)
    positives = torch.zeros(b, a, dtype=torch.bool, device=teacher_logits.device)
    labels = torch.zeros(b, a, dtype=torch.long, device=teacher_logits.device)
    gt_index = torch.full((b, a), -1, dtype=torch.long, device=teacher_logits.device)
    for i in range(b):
        boxes, lab = gt_boxes[i].to(teacher_boxes.device).float(), gt_labels[i].to(teacher_boxes.device).long()
        if boxes.numel() == 0:
            continue
        inside = ((prior_centers[None, :, 0] > boxes[:, None, 0]) & (prior_centers[None, :, 0] < boxes[:, None, 2])
                  & (prior_centers[None, :, 1] > boxes[:, None, 1]) & (prior_centers[None, :, 1] < boxes[:, None, 3]))
        iou = elementwise_iou(teacher_boxes[i].float()[None], boxes[:, None])  # (M, A)
        # Anchors outside a box rank below every inside one, so the top-k are inside anchors even when the
        # teacher's IoUs underflow to 0 (an untrained teacher): ties then pick among the inside anchors.
        align = torch.where(inside, scores[i].T[lab].pow(alpha) * iou.pow(beta), torch.full_like(iou, -1.0))  # (M, A)
        k = min(topk, a)
        top = align.topk(k, dim=1).indices
        chosen = torch.zeros_like(align, dtype=torch.bool).scatter_(1, top, True) & inside
        align = torch.where(chosen, align, torch.full_like(align, -1.0))
        best_val, best_gt = align.max(0)
        pos = best_val >= 0
        positives[i] = pos
        labels[i, pos] = lab[best_gt[pos]]
        gt_index[i, pos] = best_gt[pos]
    return Assignment(positives, labels, gt_index)


# ----------------------------------------------------------------------------------------------- teacher
# ``DETQ_PLAIN_TEACHER=1`` runs the teacher as given (no BatchNorm folding, no channels-last copy).
_FAST_TEACHER = os.environ.get("DETQ_PLAIN_TEACHER", "") in ("", "0")


def _is_frozen_batchnorm(m: nn.Module) -> bool:
    """torchvision's ``FrozenBatchNorm2d`` (and look-alikes): fixed statistics as buffers, no module to import."""
    return type(m).__name__ == "FrozenBatchNorm2d" and all(
        isinstance(getattr(m, a, None), torch.Tensor) for a in ("weight", "bias", "running_mean", "running_var"))


def _foldable_norm(m: nn.Module) -> bool:
    if type(m) in (nn.BatchNorm2d, nn.SyncBatchNorm):
        return m.track_running_stats and m.running_mean is not None and m.running_var is not None
    return _is_frozen_batchnorm(m)


class _ConsumerTrace(TorchFunctionMode):
    """Which conv outputs go, in every call, straight into one BatchNorm and nowhere else.

    Module hooks see a ``Conv2d`` return a tensor and a norm receive one; the function mode sees every other
    operation that reads a tensor outside a norm's own forward. A conv whose output anything else reads
    (a residual, a tap, a ``.contiguous()``) keeps its BatchNorm."""

    _IGNORED = {"size", "dim", "numel", "__get__", "__len__"}  # shape queries read no values

    def __init__(self) -> None:
        super().__init__()
        # id(output) -> (conv name, weak reference): an id is only trusted while its tensor lives (ids are reused)
        self.produced: dict[int, tuple[str, weakref.ref]] = {}
        self.fed: dict[str, set] = {}  # conv name -> norms its outputs went into (None: read elsewhere)
        self.norm_inputs: dict[str, set] = {}  # norm name -> convs that produced its inputs (None: not a conv's)
        self.in_norm = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.in_norm and getattr(func, "__name__", "") not in self._IGNORED:
            for a in (*args, *kwargs.values()):
                for t in (a if isinstance(a, (list, tuple)) else (a,)):
                    source = self._source(t)
                    if source is not None:
                        self.fed[source].add(None)
        return func(*args, **kwargs)

    def _source(self, t: Any) -> Optional[str]:
        entry = self.produced.get(id(t)) if isinstance(t, torch.Tensor) else None
        return entry[0] if entry is not None and entry[1]() is t else None

    def conv_hook(self, name: str):
        def hook(module, args, output):
            self.fed.setdefault(name, set())
            self.produced[id(output)] = (name, weakref.ref(output))
        return hook

    def norm_pre_hook(self, name: str):
        def hook(module, args):
            source = self._source(args[0]) if args else None
            self.norm_inputs.setdefault(name, set()).add(source)
            if source is not None:
                self.fed[source].add(name)
            self.in_norm += 1
        return hook

    def norm_hook(self, module, args, output):
        self.in_norm -= 1

    def pairs(self) -> list[tuple[str, str]]:
        out = []
        for conv, norms in self.fed.items():
            if len(norms) == 1 and None not in norms:
                (norm,) = norms
                if self.norm_inputs.get(norm) == {conv}:
                    out.append((conv, norm))
        return out


def conv_batchnorm_pairs(model: nn.Module, forward, keep: Sequence[str] = ()) -> list[tuple[str, str]]:
    """``(conv, norm)`` names of the ``nn.Conv2d`` → eval BatchNorm pairs of ``model`` that one eval forward,
    ``forward(model)``, shows to be exactly ``norm(conv(x))`` with nothing else reading the conv's output: the
    pairs whose BatchNorm can be folded into the conv without changing what the model computes. Convs named
    in ``keep`` (their outputs are read by hooks) are left out. What Python does not run (a TorchScript function
    reading a conv's output) is not seen."""
    trace = _ConsumerTrace()
    handles = []
    for name, m in model.named_modules():
        if type(m) is nn.Conv2d and name not in keep:
            handles.append(m.register_forward_hook(trace.conv_hook(name)))
        elif _foldable_norm(m):
            handles.append(m.register_forward_pre_hook(trace.norm_pre_hook(name)))
            handles.append(m.register_forward_hook(trace.norm_hook, always_call=True))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), trace:
            forward(model)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    modules = dict(model.named_modules())
    return [(c, n) for c, n in trace.pairs() if modules[c].out_channels == modules[n].running_mean.numel()]


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


@torch.no_grad()
def folded_copy(model: nn.Module, pairs: Sequence[tuple[str, str]], channels_last: bool = False) -> nn.Module:
    """An inference copy of ``model`` with each ``(conv, norm)`` pair's BatchNorm folded into the conv and
    replaced by ``nn.Identity`` (so every module name still resolves). The copy shares every other parameter
    and buffer with ``model``; only the folded convs get new weights (channels-last where asked)."""
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    copy_ = copy.deepcopy(model, memo=dict(shared))
    for conv_name, norm_name in pairs:
        conv, norm = model.get_submodule(conv_name), model.get_submodule(norm_name)
        double = lambda t: None if t is None else t.double()  # noqa: E731  (the fold in float64, rounded once)
        weight, bias = fuse_conv_bn_weights(double(conv.weight), double(conv.bias), double(norm.running_mean),
                                            double(norm.running_var), norm.eps, double(norm.weight), double(norm.bias))
        weight, bias = weight.detach().to(conv.weight.dtype), bias.detach().to(conv.weight.dtype)
        folded = copy_.get_submodule(conv_name)
        folded.weight = nn.Parameter(weight.contiguous(memory_format=torch.channels_last) if channels_last else weight,
                                     requires_grad=False)
        folded.bias = nn.Parameter(bias, requires_grad=False)
        _set_submodule(copy_, norm_name, nn.Identity())
    return copy_.eval()


class Teacher:
    """A frozen full-precision copy of the detector, kept outside the student's module tree.

    It is a plain Python object (not an ``nn.Module`` attribute of the student), so the student's
    ``parameters()``, ``state_dict()``, EMA copies, checkpoints and DDP wrappers never include it.

    :meth:`inference_module` gives the module distillation runs: on CPU a copy with BatchNorms folded into their
    convs and channels-last weights (~1.5x faster for YOLO11n), rebuilt whenever ``module``'s weights change.

    Example:
        >>> teacher = Teacher.from_model(float_model)  # before detq_hooks.quantize(float_model, ...)  # doctest: +SKIP
        >>> with record(teacher.module, Taps(outputs=["backbone"])) as feats:  # doctest: +SKIP
        ...     out = teacher(images)  # feats.output("backbone"): the teacher's backbone features
    """

    def __init__(self, module: nn.Module, precision: str = "float32") -> None:
        self.module = module.eval()
        self.precision = precision  # "float32", or the autocast dtype of the teacher's forward
        for p in self.module.parameters():
            p.requires_grad_(False)
        self._pairs: dict[tuple, list] = {}  # keep -> foldable (conv, norm) pairs (structure only)
        self._inference: Optional[tuple[tuple, nn.Module]] = None  # (weights' key, folded copy)

    @classmethod
    def from_model(cls, model: nn.Module, precision: str = "float32") -> "Teacher":
        from .surgery import is_quantized

        if is_quantized(model):
            raise ValueError("the teacher must be the float model: take it before detq_hooks.quantize()")
        return cls(copy.deepcopy(model), precision)

    def to(self, device: Any = None, dtype: Optional[torch.dtype] = None) -> "Teacher":
        self.module.to(device=device, dtype=dtype) if dtype is not None else self.module.to(device)
        self._inference = None
        return self

    def __call__(self, *args, **kwargs):
        return self.run(lambda module: module(*args, **kwargs))

    def run(self, fn, module: Optional[nn.Module] = None):
        """``fn(module)`` in eval mode without gradients (for teacher passes that are not a plain call);
        ``module``: the :meth:`inference_module` to run instead of the teacher as given."""
        module = self.module if module is None else module
        module.eval()
        if self.precision == "float32":
            with torch.no_grad():
                return fn(module)
        device = next(iter(module.parameters()), torch.empty(0)).device.type
        with torch.no_grad(), torch.autocast(device, dtype=getattr(torch, self.precision)):
            return fn(module)

    def inference_module(self, forward, keep: Sequence[str] = ()) -> nn.Module:
        """The module to run for distillation: the teacher with its foldable BatchNorms folded (found by one
        traced forward, ``forward(module)``, the first time) and, on CPU, channels-last conv weights. Same names
        as ``module``; convs in ``keep`` are not folded (hooks read their outputs). ``module`` itself where
        folding is off (``DETQ_PLAIN_TEACHER=1``) or finds nothing to fold."""
        if not _FAST_TEACHER:
            return self.module
        key = tuple(sorted(keep))
        if key not in self._pairs:
            self._pairs[key] = conv_batchnorm_pairs(self.module, forward, keep)
        pairs = self._pairs[key]
        if not pairs:
            return self.module
        # the folded weights are stale once any of the teacher's tensors is replaced or written in place
        tensors = (*self.module.parameters(), *self.module.buffers())
        version = (key, tuple((id(t), t._version, t.device) for t in tensors))
        if self._inference is None or self._inference[0] != version:
            channels_last = next(iter(tensors)).device.type == "cpu"
            self._inference = (version, folded_copy(self.module, pairs, channels_last=channels_last))
        return self._inference[1]

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)
        self._inference = None

    def __deepcopy__(self, memo):
        return Teacher(copy.deepcopy(self.module, memo), self.precision)

    # A teacher must never be pickled into the student's checkpoint by accident.
    def __reduce__(self):
        raise TypeError("detq_hooks.distill.Teacher is not picklable: save teacher.state_dict() explicitly")


# ----------------------------------------------------------------------------------------------- combination
@dataclass
class HeadOutputs:
    """What an adapter extracts from a detection head for one batch (student or teacher).

    Attributes:
        cls_logits: (B, A, C) raw class logits at each anchor point / query.
        boxes: (B, A, 4) decoded xyxy boxes.
        embeddings: (B, A, D) region embeddings (the classifier's input), for relational distillation.
        class_anchors: (C, D) or (L, C, D) anchors t_c (teacher classifier rows or text embeddings).
        anchor_index: (A,) group of each anchor when class_anchors is (L, C, D).
        score_kind: ``sigmoid`` or ``softmax``.
        points: (A, 2) anchor/point centres in the boxes' frame (dense heads: for the positives' assignment).
        no_object: softmax heads: index of the no-object / background logit (DETR: the last, ``-1``; torchvision's
            SSD: ``0``).
    """

    cls_logits: torch.Tensor
    boxes: torch.Tensor
    embeddings: Optional[torch.Tensor] = None
    class_anchors: Optional[torch.Tensor] = None
    anchor_index: Optional[torch.Tensor] = None
    score_kind: str = "sigmoid"
    points: Optional[torch.Tensor] = None
    no_object: int = -1

    def object_scores(self) -> torch.Tensor:
        """(B, A, C') class probabilities without the no-object column (softmax heads) / sigmoid scores."""
        logits = self.cls_logits.float()
        if self.score_kind == "sigmoid":
            return logits.sigmoid()
        probs, nobj = logits.softmax(-1), self.no_object % logits.shape[-1]
        return torch.cat([probs[..., :nobj], probs[..., nobj + 1:]], -1)


@dataclass
class Assignment:
    """The teacher's positive anchors/queries for a batch: (B, A) bool and (B, A) class labels; ``gt_index``
    (B, A): which ground truth of the image each positive belongs to (where the assigner knows it)."""

    positives: torch.Tensor
    labels: torch.Tensor
    gt_index: Optional[torch.Tensor] = None


class DistillationLoss:
    """Weighted CR-QAT distillation terms for the current curriculum stage.

    Feature (PKD) terms belong to the non-final stages, head terms (relational, logit, box) to the final
    stage; a term is active once its stage has started, and stays on afterwards ("earlier stages' terms
    stay on"). Without a curriculum every term is active.
    """

    def __init__(self, cfg: DistillationSection, num_stages: int = 2) -> None:
        self.cfg = cfg
        self.num_stages = num_stages

    def __call__(
        self,
        *,
        stage: Optional[int],
        student_feats: Optional[Sequence[Sequence[torch.Tensor]]] = None,
        teacher_feats: Optional[Sequence[Sequence[torch.Tensor]]] = None,
        student_head: Optional[HeadOutputs] = None,
        teacher_head: Optional[HeadOutputs] = None,
        assignment: Optional[Assignment] = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Returns ``(total, terms)``; ``terms`` has the unweighted value of each active term for logging.

        ``student_feats[i]`` / ``teacher_feats[i]`` are the output features of stage i (non-final stages).
        """
        cfg = self.cfg
        final = self.num_stages - 1
        active = final if stage is None else stage
        terms: dict[str, torch.Tensor] = {}
        if cfg.feature_weight > 0 and student_feats is not None and teacher_feats is not None:
            for i in range(min(active + 1, final, len(student_feats))):
                if student_feats[i]:
                    terms[f"pkd_stage{i + 1}"] = pkd_loss(student_feats[i], teacher_feats[i])
        if active >= final and student_head is not None and teacher_head is not None and assignment is not None:
            pos, lab = assignment.positives, assignment.labels
            if cfg.relational_weight > 0 and student_head.embeddings is not None and teacher_head.class_anchors is not None:
                terms["relational"] = relational_loss(
                    student_head.embeddings, teacher_head.embeddings, teacher_head.class_anchors, lab, pos,
                    teacher_head.anchor_index,
                )
            if cfg.logit_weight > 0:
                terms["logit"] = logit_loss(student_head.cls_logits, teacher_head.cls_logits, pos,
                                            student_head.score_kind, cfg.temperature)
            if cfg.box_weight > 0:
                conf = teacher_head.object_scores().detach().amax(-1)  # the teacher's confidence in an object
                terms["box"] = box_consistency_loss(student_head.boxes, teacher_head.boxes, conf, pos)
        weights = {"relational": cfg.relational_weight, "logit": cfg.logit_weight, "box": cfg.box_weight}
        total = None
        for k, v in terms.items():
            w = cfg.feature_weight if k.startswith("pkd") else weights[k]
            total = w * v if total is None else total + w * v
        if total is None:
            ref = student_head.cls_logits if student_head is not None else None
            total = ref.sum() * 0.0 if ref is not None else torch.zeros(())
        return total, {k: float(v.detach()) for k, v in terms.items()}


__all__ = [
    "pkd_loss",
    "relational_loss",
    "logit_loss",
    "box_consistency_loss",
    "elementwise_iou",
    "hungarian_match",
    "task_aligned_positives",
    "Teacher",
    "HeadOutputs",
    "Assignment",
    "DistillationLoss",
]
