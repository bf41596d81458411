"""``DetQHook``: MMEngine's events translated into :class:`~detq_hooks.session.QuantSession` calls.

MMEngine builds the model, its DDP wrapper, the optimizer and the parameter schedulers before any hook runs,
and reads ``load_from``/``resume`` checkpoints after ``before_run``:

================================  =====================================================================
``before_run`` (``VERY_HIGH``,     ``session.convert`` (before ``EMAHook`` copies the model); quantizer
before ``EMAHook``)                parameters into the optimizer, schedulers rebuilt, DDP wrapped again
``after_load_checkpoint``          float ``load_from``: QAT/PTQ from float weights, which also fill the
(before the weights are copied)    distillation teacher; a quantized checkpoint: ``session.apply_plan``
                                   (the saved per-layer plan is the authority) and ``session.verify``;
                                   resuming a float checkpoint into a quantized run is an error
``before_train``                   ``session.load_state``, ``session.calibrate`` (or ``run_ptq``),
                                   ``session.start_training``; the loss terms go into the loss dict of
                                   ``forward(mode="loss")`` (inside the DDP forward). PTQ / zero
                                   iterations: no step is taken
``before_train_iter``              ``session.before_step`` (curriculum stage)
``after_train_iter``               ``session.after_optimizer_step`` (EMA copies synced), terms logged
``before_save_checkpoint``         ``checkpoint["meta"]["detq"] = session.state(model)``
``after_train``                    ``session.end_training``; PTQ / zero iterations: the calibrated model
                                   saved as ``detq_<recipe name>.pth``
``before_val`` / ``before_test``   PTQ of float weights: ``session.calibrate`` before evaluating
================================  =====================================================================
"""

from __future__ import annotations

import copy
import importlib
from typing import Any, Optional, Sequence

import torch
from torch import nn

from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from ..checkpoint import CHECKPOINT_KEY, CheckpointMismatchError, has_quantizer_state, is_quantizer_key
from ..detectors import DetectorFamily
from ..session import QuantSession
from ..surgery import is_quantized, quantized_layers
from .checkpoints import read_weights
from .metrics import add_critical_metrics


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if is_model_wrapper(model) else model


def mmdet_forward(model: nn.Module, batch: Any) -> Any:
    """Run one dataloader batch through an MMEngine model the way its test step does (raw head outputs).

    MMDetection's single-stage and DETR detectors compute ``forward(mode="tensor")`` with
    ``bbox_head.forward(...)``, past the head's module hooks; the same steps are run here with the head called
    as a module, so that PTQ can read the head's output (DTR's decoded boxes)."""
    data = model.data_preprocessor(batch, False)
    inputs, samples = (data["inputs"], data.get("data_samples")) if isinstance(data, dict) else tuple(data)
    head = getattr(model, "bbox_head", None)
    if isinstance(head, nn.Module) and hasattr(model, "extract_feat") and not hasattr(model, "roi_head"):
        feats = model.extract_feat(inputs)
        if hasattr(model, "forward_transformer"):  # DETR family
            return head(**model.forward_transformer(feats, samples))
        return head(feats)
    return model(inputs, samples, mode="tensor")


def _loss_sum(value: Any) -> torch.Tensor:
    """A loss entry as MMEngine's ``parse_losses`` counts it: a tensor's mean, or the sum of a list's means.
    Detached and left on its device: only a term that needs the value reads it (no sync per loss key)."""
    if isinstance(value, (list, tuple)):
        return sum(v.detach().float().mean() for v in value)
    return value.detach().float().mean()


def family_batch(model: nn.Module, batch: Any) -> tuple:
    """A dataloader batch as the MMDetection family reads it: ``(inputs, data_samples)`` after the model's data
    preprocessor (what ``forward(mode="loss")`` receives)."""
    data = model.data_preprocessor(batch, False)
    return (data["inputs"], data["data_samples"]) if isinstance(data, dict) else tuple(data)


def dataset_classes(runner) -> Optional[list[str]]:
    """Class names of the run's data: ``metainfo.classes`` of the first dataloader config that has them, else
    the dataset class's own ``METAINFO`` (``CocoDataset``: the 80 COCO classes)."""
    from mmengine.registry import DATASETS

    for key in ("train_dataloader", "val_dataloader", "test_dataloader"):
        dataset = (runner.cfg.get(key) or {}).get("dataset") or {}
        while isinstance(dataset, dict) and "dataset" in dataset and "metainfo" not in dataset:
            dataset = dataset["dataset"]  # wrappers (RepeatDataset, ClassBalancedDataset)
        if not isinstance(dataset, dict):
            continue
        classes = (dataset.get("metainfo") or {}).get("classes")
        if classes:
            return list(classes)
        cls = DATASETS.get(dataset.get("type")) if isinstance(dataset.get("type"), str) else dataset.get("type")
        classes = getattr(cls, "METAINFO", {}).get("classes") if cls is not None else None
        if classes:
            return list(classes)
    return None


def _family(family: Any) -> Any:
    """``family=`` from a config may be an import path (``"my_pkg.families.MyFamily"`` or ``"my_pkg:MyFamily"``)."""
    if not isinstance(family, str):
        return family
    module, sep, name = family.partition(":") if ":" in family else family.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"DetQHook: `family` = {family!r} is not an importable DetectorFamily ({err})") from None


@HOOKS.register_module()
class DetQHook(Hook):
    """Quantize an MMEngine model (QAT or PTQ) from a detq-hooks recipe.

    Args:
        recipe: preset name (``w8a8``, ``w4a8``, ``w8a8-ptq``, ``w4a8-crqat``, ...), recipe YAML path or dict.
        calibrate: calibrate activation ranges before the first iteration (training batches) or before a
            PTQ evaluation (skipped when the loaded weights already carry quantizer state).
        calibration_batches: overrides ``calibration.num_batches`` of the recipe.
        prediction_layers: names of the final prediction layers (default: the detector family's answer).
        first_layers: names of the layers that see the image (default: the first layer).
        log_interval: every how many iterations quantizer figures go to the message hub (0: never).
        family: a :class:`~detq_hooks.detectors.DetectorFamily` (instance, class or import path) for a detector
            the built-in families do not read (default: found from the model).

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
        family: Optional[DetectorFamily] = None,
    ) -> None:
        if not isinstance(calibrate, bool):
            raise TypeError(f"DetQHook: `calibrate` = {calibrate!r} must be True or False")
        if isinstance(log_interval, bool) or not isinstance(log_interval, int) or log_interval < 0:
            raise ValueError(f"DetQHook: `log_interval` = {log_interval!r} must be an integer >= 0")
        # validated now: a bad config fails before the runner starts
        self.session = QuantSession(recipe, family=_family(family), prediction_layers=prediction_layers,
                                    first_layers=first_layers, calibration_batches=calibration_batches,
                                    read_weights=read_weights)
        self.recipe = self.session.recipe
        self.calibrate = calibrate
        self.log_interval = log_interval
        self._pending: Optional[tuple[dict, str, bool]] = None  # a verified entry, applied when the loop starts
        self._no_steps = False

    # ------------------------------------------------------------------ conversion
    def before_run(self, runner) -> None:
        from mmengine.optim import OptimWrapper

        model = unwrap(runner.model)
        if self.session.owns(model):
            return  # the same runner running again (e.g. test after train)
        if is_quantized(model):
            raise RuntimeError("DetQHook: the model is already quantized; is DetQHook listed twice in `custom_hooks`?")
        training = isinstance(getattr(runner, "optim_wrapper", None), OptimWrapper)
        self.session.class_names = dataset_classes(runner)  # the recipe's critical class names resolve against them
        self.session.convert(model, training=training and not self.session.ptq)
        # Modules that freeze parts of themselves in `train()` (mmdet backbones' `frozen_stages`) freeze the new
        # quantizer parameters too: now, before the optimizer group and the DDP wrapper are built.
        model.train(model.training)
        runner.logger.info(f"DetQHook: {len(quantized_layers(model))} layers quantized with recipe {self.recipe.name!r} "
                           f"(detector family {self.session.family.name!r})")
        if training:
            self._attach_optimizer(runner, model)
        if is_model_wrapper(runner.model):
            # The old DDP wrapper registered only the float parameters: wrap again so the quantizer
            # parameters are all-reduced as well.
            runner.model = runner.wrap_model(runner.cfg.get("model_wrapper_cfg"), model)

    def _attach_optimizer(self, runner, model: nn.Module) -> None:
        from mmengine.optim import OptimWrapperDict

        if isinstance(runner.optim_wrapper, OptimWrapperDict):
            raise NotImplementedError("DetQHook: models with several optimizers (OptimWrapperDict) are not supported yet")
        n = self.session.attach_optimizer(runner.optim_wrapper.optimizer, model)
        runner.logger.info(f"DetQHook: {n} quantizer parameters in their own optimizer group (no weight decay)")
        if runner.param_schedulers is not None and runner.cfg.get("param_scheduler") is not None:
            # Schedulers remember each group's base value when built: build them again to cover the new group.
            runner.param_schedulers = runner.build_param_scheduler(runner.cfg.get("param_scheduler"))

    # ------------------------------------------------------------------ checkpoints
    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        model = unwrap(runner.model)
        state_dict = checkpoint.get("state_dict", checkpoint)
        entry = (checkpoint.get("meta") or {}).get(CHECKPOINT_KEY)
        source = str(getattr(runner, "_load_from", None) or "the resumed checkpoint")
        resume = bool(runner._resume)
        if entry is None and not has_quantizer_state(state_dict):
            if resume:
                raise CheckpointMismatchError(
                    f"DetQHook: cannot resume from {source}: it was written by a float run (no quantizer state). "
                    "Use `load_from` (without `resume`) to start QAT from float weights."
                )
            # `load_from` float weights: the usual start of QAT (or PTQ); they are the distillation teacher and
            # PTQ reconstruction's float reference too.
            self.session.set_float_weights(state_dict, source)
            # A float checkpoint has no quantizer values (calibration sets them): the model's own are filled in,
            # a no-op load, so MMEngine does not print every quantizer key as "missing" and real gaps stand out.
            for key, value in model.state_dict().items():
                if is_quantizer_key(key):
                    state_dict.setdefault(key, value)
            return
        for m in [model] + self._averaged(runner):  # EMAHook loads its copy right after this hook
            self.session.apply_plan(m, entry, source=source)
        self._pending = (self.session.verify(model, state_dict, entry, source=source), source, resume)

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        checkpoint.setdefault("meta", {})[CHECKPOINT_KEY] = self.session.state(unwrap(runner.model))

    def _load_pending(self, model: nn.Module, resume: bool) -> None:
        if self._pending is not None:
            entry, source, resumed = self._pending
            self._pending = None
            self.session.load_state(model, entry, source=source, resume=resume and resumed)

    # ------------------------------------------------------------------ training
    def before_train(self, runner) -> None:
        model = unwrap(runner.model)
        self._load_pending(model, resume=True)
        if self.session.teacher is not None and self.session.teacher_source is None:
            raise RuntimeError("DetQHook: distillation needs the float model's weights: set `load_from` to the float "
                               "checkpoint or `distillation.teacher` in the recipe")
        if self.calibrate and self.session.needs_calibration(model):
            self._calibrate(runner, model, runner.train_dataloader)
        self._no_steps = self.session.ptq or runner.max_iters == 0
        if self._no_steps:  # PTQ: calibrated and saved; the weights stay as they are
            if not hasattr(runner.train_loop, "stop_training"):
                raise NotImplementedError(f"DetQHook: {type(runner.train_loop).__name__} has no `stop_training`; "
                                          "a PTQ recipe cannot keep it from taking optimizer steps (use Runner.test)")
            runner.train_loop.stop_training = True
            return
        message = self.session.start_training(model, progress=self._progress(runner))
        if message:
            runner.logger.info(f"DetQHook: {message}")
        if self.session.terms:
            self._add_loss_terms(model)

    def _add_loss_terms(self, model: nn.Module) -> None:
        """The session's terms go into the loss dict of ``forward(mode="loss")`` (which MMDetection's detectors
        answer with ``model.loss``): an instance attribute, so they are computed inside the DDP-wrapped forward
        (MMEngine sums every key that contains ``loss``). The batch is ``(inputs, data_samples)``."""
        if "forward" in model.__dict__:
            return
        original, session = model.forward, self.session

        def forward(inputs, data_samples=None, mode="tensor", **kwargs):
            out = original(inputs, data_samples, mode=mode, **kwargs)
            if mode == "loss":
                task = sum(_loss_sum(v) for k, v in out.items() if "loss" in k)  # what MMEngine's parse_losses sums
                for name, value in session.loss_terms(model, (inputs, data_samples), task_loss=task).items():
                    out["loss_" + name.lstrip("_")] = value
            return out

        model.forward = forward

    def _progress(self, runner) -> float:
        if self.recipe.curriculum.unit == "epoch" and getattr(runner.train_loop, "_max_epochs", None):
            return runner.epoch / runner.max_epochs
        return runner.iter / max(runner.max_iters, 1)

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        message = self.session.before_step(unwrap(runner.model), self._progress(runner))
        if message:
            runner.logger.info(f"DetQHook: {message} (iteration {runner.iter})")

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        model = unwrap(runner.model)
        self.session.after_optimizer_step(model, averaged=self._averaged(runner))
        for name, value in self.session.last_terms.items():
            runner.message_hub.update_scalar(f"train/{name}", value)
        if self.log_interval and self.every_n_train_iters(runner, self.log_interval):
            for name, value in self.session.figures(model).items():
                runner.message_hub.update_scalar(f"train/detq_{name}", value)

    def after_train(self, runner) -> None:
        # Evaluation and export after training see the whole model quantized and nothing frozen.
        model = unwrap(runner.model)
        self.session.end_training(model)
        model.__dict__.pop("forward", None)
        if self._no_steps:
            name = f"detq_{self.recipe.name}.pth"
            runner.save_checkpoint(runner.work_dir, name, meta=dict(epoch=runner.epoch, iter=runner.iter))
            runner.logger.info(f"DetQHook: no optimizer step ({'PTQ recipe' if self.session.ptq else 'zero iterations'}); "
                               f"the calibrated model is saved as {name}")

    # ------------------------------------------------------------------ evaluation (PTQ)
    def before_val(self, runner) -> None:
        self._before_evaluation(runner, "val")

    def before_test(self, runner) -> None:
        self._before_evaluation(runner, "test")

    def _before_evaluation(self, runner, phase: str) -> None:
        """``Runner.val()`` / ``test()`` of float weights is PTQ: calibrate (training data if the config has
        them, else the evaluation data) before evaluating. The evaluator reports the critical categories too."""
        model = unwrap(runner.model)
        self._load_pending(model, resume=False)
        if self.recipe.critical.classes and self.session.owns(model):
            loop = getattr(runner, f"{phase}_loop", None)
            add_critical_metrics(getattr(loop, "evaluator", None), self.session.critical_class_ids(model))
        if not (self.calibrate and self.session.owns(model) and self.session.needs_calibration(model)):
            return
        if not getattr(runner, "_load_from", None):
            # Runner.val()/test() never runs init_weights(): without `load_from` the model holds the config's raw
            # initialisation (some parameters, such as Deformable DETR's level_embed, uninitialised memory)
            runner.logger.warning(f"DetQHook: PTQ in Runner.{phase}() of a model no checkpoint was loaded into: it "
                                  "quantizes the config's initial weights; set `load_from` to the trained checkpoint")
        loader = None
        if runner.cfg.get("train_dataloader"):
            try:
                loader = runner.train_dataloader
            except Exception:  # no usable training data: the evaluation data are all we have
                loader = None
        self._calibrate(runner, model, loader if loader is not None else getattr(runner, f"{phase}_dataloader"))

    # ------------------------------------------------------------------ helpers
    def _calibrate(self, runner, model: nn.Module, loader) -> None:
        run = self.session.run_ptq if self.session.ptq else self.session.calibrate
        result = run(model, loader, mmdet_forward, family_batch=lambda batch: family_batch(model, batch))
        if result.mixed_precision is not None:
            plan = result.mixed_precision
            runner.logger.info(f"DetQHook: Fisher mixed precision: {plan.summary()}")
        runner.logger.info(f"DetQHook: calibrated {len(result.ranges)} activation ranges on {result.num_batches} "
                           f"batches ({result.method})")
        # EMAHook copied the model in its before_run, before calibration; its first update copies again, but a
        # validation before that update (or a test run) would otherwise see uncalibrated ranges. The copy takes
        # the model's plan first: Fisher mixed precision set per-layer bits after the copy was made.
        entry = self.session.state(model, include_teacher=False)
        for ema in self._averaging_wrappers(runner):
            if set(ema.module.state_dict()) == set(model.state_dict()):
                self.session.apply_plan(ema.module, entry, source="the model being trained")
                ema.module.load_state_dict(model.state_dict())
            else:  # calibration changed the structure (TASKQ's sparse outlier quantizers): copy the model anew
                ema.module = copy.deepcopy(model).requires_grad_(False)
                buffers = getattr(ema, "update_buffers", False)
                ema.avg_parameters = ema.module.state_dict() if buffers else dict(ema.module.named_parameters())

    @staticmethod
    def _averaging_wrappers(runner) -> list[nn.Module]:
        """``EMAHook``'s averaged-model wrappers (``.module`` is the averaged copy of the model)."""
        return [hook.ema_model for hook in runner.hooks
                if isinstance(getattr(hook, "ema_model", None), nn.Module)
                and isinstance(getattr(hook.ema_model, "module", None), nn.Module)]

    @classmethod
    def _averaged(cls, runner) -> list[nn.Module]:
        """The averaged copies of the model (``EMAHook``'s)."""
        return [ema.module for ema in cls._averaging_wrappers(runner)]


__all__ = ["DetQHook", "mmdet_forward", "unwrap"]
