"""MMEngine / MMDetection adapter: one hook in the config quantizes the model.

    custom_imports = dict(imports=["detq_hooks.mmengine"], allow_failed_imports=False)
    custom_hooks = [dict(type="DetQHook", recipe="w4a8")]

Life cycle (MMEngine builds the model, its DDP wrapper, the optimizer and the parameter schedulers before
any hook runs):

* ``before_run`` (priority ``VERY_HIGH``, so before ``EMAHook`` copies the model): swap the layers for
  fake-quant ones, put the new quantizer parameters into their own optimizer group (no weight decay,
  ``quantizer_lr_scale`` × base lr), rebuild the parameter schedulers from the config so they cover that
  group, and re-wrap the model in a fresh DDP wrapper so the quantizer parameters are all-reduced.
* ``after_load_checkpoint`` (called before the weights are copied into the model): a checkpoint written by
  a quantized run is verified against this run's recipe; resuming a float checkpoint into a quantized run is
  an error; ``load_from`` a float checkpoint is the normal "QAT from float weights" start.
* ``before_train``: calibrate on training batches unless the weights came with quantizer state.
* ``before_save_checkpoint``: the recipe and per-layer bits go to ``checkpoint["meta"]["detq"]``.

The adapter holds no algorithm: conversion, calibration and checkpoint checks are the core's.
"""

from __future__ import annotations

import re
from typing import Any, Optional, Sequence

import torch
from torch import nn

from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from .calibration import calibrate
from .curriculum import CurriculumSchedule, Stage
from .distill import (
    Assignment,
    DistillationLoss,
    HeadOutputs,
    Teacher,
    capture_outputs,
    hungarian_match,
    task_aligned_positives,
)
from .checkpoint import CheckpointMismatchError, check_compatible, quantization_state
from .optim import add_quantizer_param_group
from .quantizers import iter_quantizers
from .recipe import load_recipe
from .surgery import is_quantized, quantize, quantized_layers

# Final prediction layers of MMDetection heads (kept at `prediction_layer_bits`).
_PREDICTION_LEAF = re.compile(
    r"(^|\.)(conv_cls|conv_reg|retina_cls|retina_reg|fc_cls|fc_reg|conv_centerness|conv_objectness|"
    r"rtm_cls\.\d+|rtm_reg\.\d+|rtm_obj\.\d+|multi_level_conv_cls\.\d+|multi_level_conv_reg\.\d+|"
    r"multi_level_conv_obj\.\d+|cls_branches\.\d+)$"
)
_PREDICTION_BRANCH = re.compile(r"(^|\.)(reg_branches\.\d+|cls_branches\.\d+)$")  # MLP branches: their last layer
_HEAD_ROOTS = ("bbox_head", "roi_head", "rpn_head")


def _history_buffer_reduce(self):
    # Plain data only (two arrays and an int): the default pickle of a HistoryBuffer also stores its
    # statistics methods through `builtins.getattr`, which a safe (weights_only) load must refuse.
    return (type(self), (self._log_history, self._count_history, self.max_length))


def _register_safe_checkpoint_globals() -> None:
    """Let ``torch.load``'s default ``weights_only=True`` (torch >= 2.6) read MMEngine checkpoints.

    MMEngine calls ``torch.load`` without ``weights_only``; its checkpoints carry a message hub with
    ``HistoryBuffer`` objects and numpy arrays. Instead of turning the safe loader off (or asking users
    for an environment variable), ``HistoryBuffer`` is made to pickle as plain data and the few classes
    involved are allow-listed. Checkpoints written without this import need a full load (see
    :func:`_register_local_checkpoint_loader`).
    """
    import numpy as np

    try:
        from mmengine.logging.history_buffer import HistoryBuffer
    except Exception:  # pragma: no cover - very old mmengine
        return
    HistoryBuffer.__reduce__ = _history_buffer_reduce
    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core
    safe: list[Any] = [HistoryBuffer, np.ndarray, np.dtype, core.multiarray._reconstruct, core.multiarray.scalar]
    for name in dir(np.dtypes):
        cls = getattr(np.dtypes, name)
        if isinstance(cls, type):
            safe.append(cls)
    torch.serialization.add_safe_globals(safe)


_register_safe_checkpoint_globals()


def _register_local_checkpoint_loader() -> None:
    """Local checkpoints: torch's safe load first; a file that only a full unpickle reads (an MMEngine
    checkpoint written by a run that did not import this module: its message hub pickles through
    ``builtins.getattr``) is the user's own file, named in their config (``load_from``/``resume``), so it is
    loaded fully, as MMEngine did before torch 2.6, with a warning that names it."""
    import os.path as osp
    import pickle
    import warnings

    from mmengine.runner.checkpoint import CheckpointLoader

    def load_from_local(filename, map_location=None):
        filename = osp.expanduser(filename)
        if not osp.isfile(filename):
            raise FileNotFoundError(f"{filename} can not be found.")
        try:
            return torch.load(filename, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            warnings.warn(
                f"detq-hooks: {filename} needs a full (weights_only=False) unpickle ({str(e).splitlines()[0][:120]}...); "
                "loading it because the config names it. Checkpoints written with detq_hooks.mmengine imported load safely.",
                stacklevel=2,
            )
            return torch.load(filename, map_location=map_location, weights_only=False)

    CheckpointLoader.register_scheme(prefixes="", loader=load_from_local, force=True)


try:
    _register_local_checkpoint_loader()
except Exception:  # pragma: no cover - an MMEngine without CheckpointLoader schemes
    pass


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if is_model_wrapper(model) else model


def mmdet_prediction_layers(model: nn.Module) -> list[str]:
    """Names of the final classification/regression layers of an MMDetection model's heads."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    in_head = [n for n in names if n.split(".")[0] in _HEAD_ROOTS]
    chosen = [n for n in in_head if _PREDICTION_LEAF.search(n)]
    branches: dict[str, str] = {}
    for n in in_head:
        parts = n.split(".")
        for i in range(len(parts), 0, -1):
            root = ".".join(parts[:i])
            if _PREDICTION_BRANCH.search(root) and root != n:
                branches[root] = n  # modules come in order: the last one wins
                break
    return sorted(set(chosen) | set(branches.values()), key=names.index)


def mmdet_forward(model: nn.Module, batch: Any) -> Any:
    """Run one dataloader batch through an MMEngine model the way its test step does (raw head outputs)."""
    data = model.data_preprocessor(batch, False)
    if isinstance(data, dict):
        return model(**data, mode="tensor")
    return model(*data, mode="tensor")


# ----------------------------------------------------------------------------------------------- CR-QAT interfaces
_CLASSIFIER_LEAF = re.compile(r"(^|\.)(conv_cls|retina_cls|rtm_cls\.\d+|gfl_cls|atss_cls|fc_cls)$")


def mmdet_stages(model: nn.Module) -> list[Stage]:
    """The data-flow stages of an MMDetection model: ``backbone`` / ``neck`` (with a transformer's encoder,
    decoder and query embeddings) / head (``bbox_head``, ``rpn_head``, ``roi_head``)."""
    children = [n for n, m in model.named_children() if any(True for _ in m.parameters())]
    first = [n for n in children if n == "backbone"]
    head = [n for n in children if n in _HEAD_ROOTS]
    middle = [n for n in children if n not in first and n not in head]
    stages = []
    if first:
        stages.append(Stage("backbone", first, outputs=["backbone"]))
    if middle:
        stages.append(Stage("neck", middle, outputs=["neck"] if "neck" in middle else []))
    if head:
        stages.append(Stage("head", head))
    return stages


def _feature_maps(output: Any) -> list[torch.Tensor]:
    """The (N, C, H, W) maps in a module's output (a tensor or a tuple/list of them)."""
    items = output if isinstance(output, (list, tuple)) else [output]
    return [t for t in items if isinstance(t, torch.Tensor) and t.dim() == 4]


class _CaptureInputs:
    """Forward pre-hooks that collect every call's first input of the named modules (in call order)."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        modules = dict(model.named_modules())
        self.inputs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        self._handles = [modules[n].register_forward_pre_hook(lambda m, a, _n=n: self.inputs[_n].append(a[0])) for n in names]

    def __enter__(self) -> dict[str, list[torch.Tensor]]:
        return self.inputs

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()


def _gt_of(data_samples) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    from mmdet.structures.bbox import get_box_tensor

    return ([get_box_tensor(d.gt_instances.bboxes).float() for d in data_samples],
            [d.gt_instances.labels.long() for d in data_samples])


def _dense_head_outputs(head: nn.Module, outs: Any, cls_inputs: dict[str, list[torch.Tensor]],
                        classifier_names: Sequence[str], anchors_from: nn.Module) -> tuple[HeadOutputs, torch.Tensor]:
    """Flatten a dense head's per-level outputs to (B, A, C) logits, decoded (B, A, 4) boxes and the
    classifier's inputs as region embeddings; the class anchors are ``anchors_from``'s classifier rows."""
    cls_scores, bbox_preds = outs[0], outs[1]
    b, c, na = cls_scores[0].shape[0], head.cls_out_channels, head.num_base_priors
    logits = torch.cat([s.permute(0, 2, 3, 1).reshape(b, -1, c) for s in cls_scores], 1)
    deltas = torch.cat([p.permute(0, 2, 3, 1).reshape(b, -1, p.shape[1] // na) for p in bbox_preds], 1)
    sizes = [s.shape[-2:] for s in cls_scores]
    priors = head.prior_generator.grid_priors(sizes, device=logits.device)
    level = torch.cat([torch.full((len(p),), i, device=logits.device) for i, p in enumerate(priors)])
    priors = torch.cat(priors).float()
    if priors.shape[-1] == 4 and "Anchor" in type(head.prior_generator).__name__:
        decode_from, centers = priors, (priors[:, :2] + priors[:, 2:]) / 2
    else:  # point priors (x, y[, stride_w, stride_h])
        decode_from = centers = priors[:, :2]
    n = decode_from.shape[0]
    boxes = head.bbox_coder.decode(decode_from.repeat(b, 1), deltas.reshape(b * n, -1).float()).reshape(b, n, 4)
    inputs = [x for name in classifier_names for x in cls_inputs[name]]
    emb = torch.cat([x.permute(0, 2, 3, 1).reshape(b, -1, x.shape[1]).repeat_interleave(na, 1) for x in inputs], 1)
    mods = dict(anchors_from.named_modules())
    weights = [mods[name].weight.detach().float().flatten(2).mean(-1).reshape(na, c, -1).mean(0) for name in classifier_names]
    if len(weights) == 1:
        class_anchors, anchor_index = weights[0], None
    else:  # one classifier per level (RTMDet): anchors per level
        class_anchors, anchor_index = torch.stack(weights), level.long()
    return HeadOutputs(logits, boxes, emb, class_anchors, anchor_index, "sigmoid"), centers


def _cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    return torch.cat([b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2], -1)


class MMDetDistiller:
    """Answers CR-QAT's questions for an MMDetection model (stage features, head outputs, the teacher's
    positives) and adds the core's distillation loss to ``model.loss``'s dict, inside the DDP forward."""

    def __init__(self, model: nn.Module, teacher: Teacher, stages: Sequence[Stage], loss: DistillationLoss,
                 schedule: Optional[CurriculumSchedule]) -> None:
        self.model, self.teacher, self.loss, self.schedule = model, teacher, loss, schedule
        self.feature_modules = [[o for o in st.outputs] for st in stages[:-1]]
        names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n.startswith("bbox_head.")]
        self.classifiers = [n for n in names if _CLASSIFIER_LEAF.search(n)]
        self.is_detr = hasattr(model.bbox_head, "fc_cls") and not hasattr(model.bbox_head, "prior_generator")
        if not self.classifiers:
            raise NotImplementedError(
                f"CR-QAT distillation: no classifier layer found in {type(model.bbox_head).__name__}; "
                "dense heads (RetinaNet, RTMDet, FCOS, ATSS, GFL) and DETR heads are supported"
            )
        self.last_terms: dict[str, float] = {}
        self._original_loss = model.loss
        model.loss = self._loss  # an instance attribute: called by forward(mode="loss") inside DDP

    def remove(self) -> None:
        if self.model.__dict__.get("loss") == self._loss:
            del self.model.loss

    def _run(self, model: nn.Module, fn):
        feats = [n for group in self.feature_modules for n in group]
        with capture_outputs(model, feats + ["bbox_head"]) as outs, _CaptureInputs(model, self.classifiers) as cls_in:
            result = fn()
        return result, outs, cls_in

    def _loss(self, inputs: torch.Tensor, data_samples):
        losses, s_out, s_in = self._run(self.model, lambda: self._original_loss(inputs, data_samples))
        t_model = self.teacher.module
        _, t_out, t_in = self._run(t_model, lambda: self.teacher.run(lambda m: self._teacher_pass(m, inputs, data_samples)))
        s_feats = [[f for n in group for f in _feature_maps(s_out[n])] for group in self.feature_modules]
        t_feats = [[f for n in group for f in _feature_maps(t_out[n])] for group in self.feature_modules]
        if self.is_detr:
            s_head, t_head, assignment = self._detr_heads(s_out["bbox_head"], t_out["bbox_head"], s_in, t_in, data_samples)
        else:
            s_head, _ = _dense_head_outputs(self.model.bbox_head, s_out["bbox_head"], s_in, self.classifiers, t_model)
            t_head, centers = _dense_head_outputs(t_model.bbox_head, t_out["bbox_head"], t_in, self.classifiers, t_model)
            gt_boxes, gt_labels = _gt_of(data_samples)
            assignment = task_aligned_positives(t_head.cls_logits, t_head.boxes, centers, gt_boxes, gt_labels)
        stage = self.schedule.current if self.schedule is not None else None
        total, terms = self.loss(stage=stage, student_feats=s_feats, teacher_feats=t_feats,
                                 student_head=s_head, teacher_head=t_head, assignment=assignment)
        losses["loss_distill"] = total
        self.last_terms = terms
        return losses

    def _teacher_pass(self, t_model: nn.Module, inputs: torch.Tensor, data_samples):
        """The teacher's head outputs. MMDetection's ``mode="tensor"`` calls ``bbox_head.forward`` directly,
        which bypasses forward hooks; calling the modules keeps the capture hooks working."""
        feats = t_model.extract_feat(inputs)
        if self.is_detr:
            return t_model.bbox_head(**t_model.forward_transformer(feats, data_samples))
        return t_model.bbox_head(feats)

    def _detr_heads(self, s_outs, t_outs, s_in, t_in, data_samples):
        """DETR: the last decoder layer's queries; student queries reordered to the teacher's by Hungarian
        matching, the teacher's positives are its queries matched to the ground truth."""
        s_logits, s_boxes = s_outs[0][-1], _cxcywh_to_xyxy(s_outs[1][-1])
        t_logits, t_boxes = t_outs[0][-1].detach(), _cxcywh_to_xyxy(t_outs[1][-1].detach())
        name = self.classifiers[-1]
        s_emb, t_emb = s_in[name][-1], t_in[name][-1]
        if s_emb.dim() == 4:  # fc_cls ran on all decoder layers at once: keep the last
            s_emb, t_emb = s_emb[-1], t_emb[-1]
        b, q, c1 = t_logits.shape
        num_classes = c1 - 1 if c1 > self.model.bbox_head.num_classes else c1
        order = []
        positives = torch.zeros(b, q, dtype=torch.bool, device=t_logits.device)
        labels = torch.zeros(b, q, dtype=torch.long, device=t_logits.device)
        gt_boxes, gt_labels = _gt_of(data_samples)
        for i, ds in enumerate(data_samples):
            s_idx, t_idx = hungarian_match(s_boxes[i].detach(), s_logits[i, :, :num_classes].detach(),
                                           t_boxes[i], t_logits[i, :, :num_classes])
            perm = torch.empty(q, dtype=torch.long, device=t_logits.device)
            perm[t_idx] = s_idx
            order.append(perm)
            if len(gt_boxes[i]):
                h, w = ds.metainfo["img_shape"][:2]
                gt = gt_boxes[i] / gt_boxes[i].new_tensor([w, h, w, h])
                onehot = torch.full((len(gt), num_classes), -10.0, device=gt.device)
                onehot[torch.arange(len(gt)), gt_labels[i]] = 10.0
                tq, g = hungarian_match(t_boxes[i], t_logits[i, :, :num_classes], gt, onehot)
                positives[i, tq] = True
                labels[i, tq] = gt_labels[i][g]
        idx = torch.stack(order)
        take = lambda x: torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))  # noqa: E731
        anchors = dict(self.teacher.module.named_modules())[name].weight.detach().float()[:num_classes]
        kind = "softmax" if c1 > num_classes else "sigmoid"
        s_head = HeadOutputs(take(s_logits), take(s_boxes), take(s_emb), None, None, kind)
        t_head = HeadOutputs(t_logits, t_boxes, t_emb, anchors, None, kind)
        return s_head, t_head, Assignment(positives, labels)


@HOOKS.register_module()
class DetQHook(Hook):
    """Quantize an MMEngine model (QAT or PTQ) from a detq-hooks recipe.

    Args:
        recipe: preset name (``w8a8``, ``w4a8``, ``w4a4``, ...), recipe YAML path or dict.
        calibrate: calibrate activation ranges on training batches before the first iteration
            (skipped when the loaded weights already carry quantizer state).
        calibration_batches: overrides ``calibration.num_batches`` of the recipe.
        prediction_layers: names of the final prediction layers (default: found in ``bbox_head``).
        first_layers: names of the layers that see the image (default: the first layer).
        log_interval: every how many iterations quantizer figures go to the message hub (0: never).

    Example:
        >>> custom_hooks = [dict(type="DetQHook", recipe="w4a8")]  # in an MMDetection config
    """

    priority = "VERY_HIGH"

    def __init__(
        self,
        recipe: Any = "w8a8",
        calibrate: bool = True,
        calibration_batches: Optional[int] = None,
        prediction_layers: Optional[Sequence[str]] = None,
        first_layers: Optional[Sequence[str]] = None,
        log_interval: int = 50,
    ) -> None:
        self.recipe = load_recipe(recipe)  # validated now: a bad config fails before the runner starts
        if not isinstance(calibrate, bool):
            raise TypeError(f"DetQHook: `calibrate` = {calibrate!r} must be True or False")
        if calibration_batches is not None and (not isinstance(calibration_batches, int) or calibration_batches < 1):
            raise ValueError(f"DetQHook: `calibration_batches` = {calibration_batches!r} must be a positive integer")
        if not isinstance(log_interval, int) or log_interval < 0:
            raise ValueError(f"DetQHook: `log_interval` = {log_interval!r} must be an integer >= 0")
        self.calibrate = calibrate
        self.calibration_batches = calibration_batches
        self.prediction_layers = list(prediction_layers) if prediction_layers is not None else None
        self.first_layers = list(first_layers) if first_layers is not None else None
        self.log_interval = log_interval
        self._converted_model: Optional[nn.Module] = None
        self._weights_have_quantizer_state = False
        # CR-QAT (recipe sections `curriculum` / `distillation`)
        self.teacher: Optional[Teacher] = None
        self.teacher_source: Optional[str] = None
        self.schedule: Optional[CurriculumSchedule] = None
        self.distiller: Optional[MMDetDistiller] = None
        self._stages: list[Stage] = []
        self._pending_curriculum: Optional[dict] = None

    # ------------------------------------------------------------------ conversion
    def before_run(self, runner) -> None:
        model = unwrap(runner.model)
        if model is self._converted_model:
            return  # the same runner running again (e.g. test after train)
        if is_quantized(model):
            raise RuntimeError(
                "DetQHook: the model is already quantized; is DetQHook listed twice in `custom_hooks`?"
            )
        preds = self.prediction_layers if self.prediction_layers is not None else (mmdet_prediction_layers(model) or None)
        if self.recipe.curriculum.enabled or self.recipe.distillation.enabled:
            from .curriculum import assign_parameters, stages_from_recipe

            self._stages = stages_from_recipe(self.recipe.curriculum) or mmdet_stages(model)
            assign_parameters(model, self._stages)  # every parameter in one stage, or a RecipeError now
        if self.recipe.distillation.enabled:
            # The float copy is taken before conversion; its weights arrive with `load_from` (or from
            # `distillation.teacher`), which MMEngine loads after this hook ran.
            self.teacher = Teacher.from_model(model)
        quantize(model, self.recipe, prediction_layers=preds, first_layers=self.first_layers)
        # Modules that freeze parts of themselves in `train()` (mmdet backbones' `frozen_stages`) freeze the new
        # quantizer parameters too; do it now, before the optimizer group and the DDP wrapper are built from
        # `requires_grad`, not later in the train loop (DDP would wait for gradients that never come).
        model.train(model.training)
        if self.recipe.curriculum.enabled:
            self.schedule = CurriculumSchedule.from_recipe(self.recipe.curriculum, self._stages)
        self._converted_model = model
        n_layers = len(quantized_layers(model))
        runner.logger.info(f"DetQHook: {n_layers} layers quantized with recipe {self.recipe.name!r}; prediction layers {preds}")
        self._attach_to_optimizer(runner, model)
        if is_model_wrapper(runner.model):
            # The old DDP wrapper registered only the float parameters: wrap again so the quantizer
            # parameters are all-reduced as well.
            runner.model = runner.wrap_model(runner.cfg.get("model_wrapper_cfg"), model)

    def _attach_to_optimizer(self, runner, model: nn.Module) -> None:
        from mmengine.optim import OptimWrapper, OptimWrapperDict

        wrapper = getattr(runner, "optim_wrapper", None)
        if not isinstance(wrapper, OptimWrapper):
            return  # validation/test run, or optimizer not built (no training)
        if isinstance(wrapper, OptimWrapperDict):
            raise NotImplementedError("DetQHook: models with several optimizers (OptimWrapperDict) are not supported yet")
        n = add_quantizer_param_group(wrapper.optimizer, model, self.recipe.quantization.quantizer_lr_scale)
        runner.logger.info(f"DetQHook: {n} quantizer parameters in their own optimizer group (no weight decay)")
        if runner.param_schedulers is not None and runner.cfg.get("param_scheduler") is not None:
            # Schedulers remember each group's base value when built: build them again to cover the new group.
            runner.param_schedulers = runner.build_param_scheduler(runner.cfg.get("param_scheduler"))

    # ------------------------------------------------------------------ checkpoints
    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        model = unwrap(runner.model)
        state_dict = checkpoint.get("state_dict", checkpoint)
        saved = (checkpoint.get("meta") or {}).get("detq")
        has_quantizer_state = any(".weight_quantizer." in k or ".input_quantizer." in k for k in state_dict)
        source = str(getattr(runner, "_load_from", None) or "checkpoint")
        if not has_quantizer_state and saved is None and not runner._resume:
            # `load_from` a float model: the usual start of QAT. Ranges are calibrated in before_train.
            self._weights_have_quantizer_state = False
            if self.teacher is not None and self.recipe.distillation.teacher is None:
                self._load_teacher(state_dict, source)
            return
        if not has_quantizer_state and runner._resume:
            raise CheckpointMismatchError(
                f"DetQHook: cannot resume from {source}: it was written by a float run (no quantizer state). "
                "Use `load_from` (without `resume`) to start QAT from float weights."
            )
        check_compatible(model, state_dict, saved, source=source)
        self._weights_have_quantizer_state = True
        saved = saved or {}
        if self.schedule is not None and runner._resume:
            if "curriculum" not in saved:
                raise CheckpointMismatchError(f"DetQHook: {source} has no curriculum state but this run's recipe has a curriculum")
            self._pending_curriculum = saved["curriculum"]
        if self.teacher is not None and self.recipe.distillation.teacher is None and saved.get("teacher_source"):
            self._load_teacher(saved["teacher_source"], saved["teacher_source"])

    def _load_teacher(self, weights: Any, source: str) -> None:
        """Fill the teacher with float weights: a state dict or a checkpoint path."""
        if isinstance(weights, (str, bytes)) or hasattr(weights, "__fspath__"):
            from mmengine.runner.checkpoint import _load_checkpoint

            ckpt = _load_checkpoint(str(weights), map_location="cpu")
            weights = ckpt.get("state_dict", ckpt)
        weights = {k[len("module."):] if k.startswith("module.") else k: v for k, v in weights.items()}
        if any(".weight_quantizer." in k or ".input_quantizer." in k for k in weights):
            raise CheckpointMismatchError(f"DetQHook: the distillation teacher must be a float model, {source} is quantized")
        try:
            self.teacher.load_state_dict(weights)
        except RuntimeError as err:
            raise CheckpointMismatchError(f"DetQHook: the teacher weights from {source} do not fit the model: {err}") from None
        self.teacher_source = str(source)

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        state = quantization_state(unwrap(runner.model))
        if self.schedule is not None:
            state["curriculum"] = self.schedule.state_dict()
        if self.teacher_source is not None:
            state["teacher_source"] = self.teacher_source  # the teacher is rebuilt from it on resume
        checkpoint.setdefault("meta", {})["detq"] = state

    # ------------------------------------------------------------------ training
    def before_train(self, runner) -> None:
        model = unwrap(runner.model)
        self._start_crqat(runner, model)
        if not self.calibrate or self._weights_have_quantizer_state:
            return
        self._calibrate(runner, model, runner.train_dataloader)

    def _start_crqat(self, runner, model: nn.Module) -> None:
        if self.teacher is not None:
            if self.recipe.distillation.teacher is not None and self.teacher_source is None:
                self._load_teacher(self.recipe.distillation.teacher, self.recipe.distillation.teacher)
            if self.teacher_source is None:
                raise RuntimeError(
                    "DetQHook: distillation needs the float model's weights: set `load_from` to the float checkpoint "
                    "or `distillation.teacher` in the recipe"
                )
            self.teacher.to(next(model.parameters()).device)
            if self.distiller is None:
                self.distiller = MMDetDistiller(model, self.teacher, self._stages,
                                                DistillationLoss(self.recipe.distillation, len(self._stages)), self.schedule)
        if self.schedule is not None:
            if self._pending_curriculum is not None:
                self.schedule.load_state_dict(self._pending_curriculum, model)
                self._pending_curriculum = None
            else:
                self.schedule.update(model, self._progress(runner))
            runner.logger.info(f"DetQHook: curriculum stage {self.schedule.stage_name()!r} "
                               f"({[s.name for s in self.schedule.stages]}, boundaries {self.schedule.boundaries})")

    def _progress(self, runner) -> float:
        if self.recipe.curriculum.unit == "epoch" and getattr(runner.train_loop, "_max_epochs", None):
            return runner.epoch / runner.max_epochs
        return runner.iter / max(runner.max_iters, 1)

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        if self.schedule is not None and self.schedule.update(unwrap(runner.model), self._progress(runner)):
            runner.logger.info(f"DetQHook: curriculum stage {self.schedule.stage_name()!r} from iteration {runner.iter}")

    def after_train(self, runner) -> None:
        # Evaluation and export after training see the whole model quantized and nothing frozen.
        if self.schedule is not None:
            self.schedule.remove_hooks()
        if self.distiller is not None:
            self.distiller.remove()
            self.distiller = None

    def before_val(self, runner) -> None:
        self._calibrate_if_needed(runner, "val")

    def before_test(self, runner) -> None:
        self._calibrate_if_needed(runner, "test")

    def _calibrate_if_needed(self, runner, phase: str) -> None:
        """A PTQ run (``Runner.test()`` / ``val()`` of float weights) calibrates before it evaluates."""
        model = unwrap(runner.model)
        if not self.calibrate or not is_quantized(model):
            return
        if all(q.initialized for _, q in iter_quantizers(model) if q.role == "activation"):
            return
        try:
            loader = runner.train_dataloader if runner.cfg.get("train_dataloader") else getattr(runner, f"{phase}_dataloader")
        except Exception:  # no training data configured: the evaluation data are all we have
            loader = getattr(runner, f"{phase}_dataloader")
        self._calibrate(runner, model, loader)

    def _calibrate(self, runner, model: nn.Module, loader) -> None:
        num = self.calibration_batches or self.recipe.calibration.num_batches
        result = calibrate(model, loader, forward_fn=mmdet_forward, num_batches=num)
        runner.logger.info(f"DetQHook: calibrated {len(result.ranges)} activation ranges on {result.num_batches} batches ({result.method})")
        # EMAHook copied the model in its before_run, before calibration; its first update copies again, but
        # a validation before that update (or a test run) would otherwise see uncalibrated ranges.
        for hook in runner.hooks:
            ema = getattr(hook, "ema_model", None)
            if isinstance(ema, nn.Module) and hasattr(ema, "module"):
                ema.module.load_state_dict(model.state_dict())

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        model = unwrap(runner.model)
        if self.schedule is not None:
            self.schedule.after_optimizer_step(model)  # frozen stages: undo weight decay / momentum
        if self.distiller is not None:
            for k, v in self.distiller.last_terms.items():
                runner.message_hub.update_scalar(f"train/distill_{k}", v)
        if self.log_interval and self.every_n_train_iters(runner, self.log_interval):
            scales = [q.scale.detach().float().mean() for _, q in iter_quantizers(unwrap(runner.model)) if q.role == "activation"]
            if scales:
                runner.message_hub.update_scalar("train/detq_act_scale_mean", float(torch.stack(scales).mean()))


__all__ = ["DetQHook", "MMDetDistiller", "mmdet_prediction_layers", "mmdet_forward", "mmdet_stages"]
