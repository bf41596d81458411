"""Lightning adapter: one callback quantizes any LightningModule's detector (QAT/PTQ down to 4 bits).

    from detq_hooks.lightning import DetQCallback
    trainer = Trainer(callbacks=[DetQCallback(recipe="w4a8")])

or, in a LightningCLI config (see ``integrations/lightning/``)::

    trainer:
      callbacks:
        - class_path: detq_hooks.lightning.DetQCallback
          init_args: {recipe: w4a8}

Life cycle (``Trainer._run``: callbacks' ``setup`` → ``configure_model`` → checkpoint restore →
``strategy.setup`` (DDP wrap, ``configure_optimizers``) → ``on_fit_start`` → optimizer/loop restore →
``on_train_start`` → steps):

* ``setup``: the module is converted at once, or, when it overrides ``configure_model``, right after that
  hook returns (the callback wraps it), so layers created there are quantized too. Both happen before the
  checkpoint is restored and before DDP and the optimizers are built: quantizer parameters are all-reduced
  and optimized, and a strict resume loads every quantizer value. The module's ``on_load_checkpoint`` is
  wrapped so that a checkpoint is verified *before* Lightning copies its weights (float checkpoint into a
  quantized run, different recipe, missing quantizer keys: :class:`CheckpointMismatchError`). Its
  ``training_step`` is wrapped so auxiliary loss terms (distillation) are computed inside the DDP forward.
* ``on_fit_start``: quantizer parameters move to their own optimizer group (no weight decay,
  ``quantizer_lr_scale`` × the base rate) before the optimizer state of a resumed run is loaded; the LR
  schedulers are extended to cover the group.
* ``on_train_start``: activation ranges are calibrated on a few training batches unless the weights already
  carry calibrated quantizer state (resume); under DDP the statistics are reduced so every rank gets the same
  scales.
* ``on_save_checkpoint`` / ``state_dict``: the recipe, the per-layer bits and the layer roles go into the
  checkpoint (``checkpoint["detq"]``), so :func:`load_quantized_checkpoint` can rebuild the model outside the
  Trainer.
* ``on_train_batch_start`` / ``on_train_batch_end`` (CR-QAT, recipe sections ``curriculum`` and
  ``distillation``): the curriculum stage follows the training progress (iterations or epochs); frozen
  stages are restored after each optimizer step; its state is in the callback's ``state_dict`` and the
  float teacher's weights in ``checkpoint["detq_teacher"]``, so a resume mid-curriculum continues exactly.
  Distillation terms are computed in the wrapped ``training_step`` (stage features and head outputs come
  from forward hooks on the student; the teacher, a frozen float copy taken before conversion and kept
  outside the module tree, runs on the same batch) and logged as ``detq/distill_<term>``.
* Weight averaging: ``EMAWeightAveraging`` / ``StochasticWeightAveraging`` that copied the module before
  conversion copy it again once it is quantized, and the EMA's integer quantizer buffers (bits, enabled,
  initialized flags) are copied exactly from the live model after each update instead of being blended.
* ``on_train_batch_end``: ``detq/quantized_layers``, ``detq/act_scale_mean``, ``detq/weight_scale_mean``,
  ``detq/enabled_quantizers`` (and ``detq/curriculum_stage``) go through ``pl_module.log``.
* ``teardown`` / ``on_exception``: the wrappers are removed; the module stays quantized.

Outside the Trainer, :func:`load_quantized_checkpoint` rebuilds a module from such a checkpoint.

The adapter holds no algorithm: conversion, calibration and checkpoint checks are the core's.
"""

from __future__ import annotations

import re
import types
from copy import deepcopy
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.model_helpers import is_overridden

from .calibration import calibrate
from .checkpoint import CheckpointMismatchError, QUANTIZER_KEY_MARKERS, check_compatible, quantization_state
from .optim import QUANTIZER_GROUP_NAME, add_quantizer_param_group
from .quantizers import iter_quantizers, quantizer_parameters
from .recipe import Recipe, RecipeError, load_recipe
from .surgery import is_quantized, quantize, quantized_layers, recipe_of

CHECKPOINT_KEY = "detq"
TEACHER_KEY = "detq_teacher"

# Final prediction layers of torchvision / common detection heads (kept at `prediction_layer_bits`).
_PREDICTION_LEAF = re.compile(
    r"(^|\.)(cls_logits|bbox_reg|bbox_ctrness|cls_score|bbox_pred|conv_cls|conv_reg|conv_centerness|"
    r"retina_cls|retina_reg|class_embed|fc_cls|fc_reg)$"
)

LossTerm = Callable[["pl.LightningModule", Any, Any], "dict[str, torch.Tensor]"]


def default_prediction_layers(model: nn.Module) -> Optional[list[str]]:
    """Names of the final classification/regression layers of common detection heads (torchvision FCOS,
    RetinaNet, Faster R-CNN, MMDetection-style heads), or ``None`` when none is recognised."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.ConvTranspose2d))]
    found = [n for n in names if _PREDICTION_LEAF.search(n)]
    return found or None


def _has_quantizer_keys(state_dict, prefix: str = "") -> bool:
    return any(k.startswith(prefix) and any(m in "." + k[len(prefix):] for m in QUANTIZER_KEY_MARKERS) for k in state_dict)


def _default_calibration_forward(pl_module: "pl.LightningModule", batch: Any) -> Any:
    """``pl_module(inputs)``: for a ``(inputs, targets, ...)`` batch the first element, else the batch."""
    if isinstance(batch, (list, tuple)) and len(batch) >= 1:
        return pl_module(batch[0])
    return pl_module(batch)


class DetQCallback(Callback):
    """Quantize a LightningModule (fake-quant QAT) from a detq-hooks recipe.

    Args:
        recipe: preset name (``w8a8``, ``w4a8``, ``w4a4``, ...), recipe YAML path or dict.
        target: attribute path of the sub-module to quantize (e.g. ``"model"``); default: the whole module.
        calibrate: calibrate activation ranges on training batches before the first step (skipped when the
            weights came with calibrated quantizer state, e.g. on resume).
        calibration_batches: overrides ``calibration.num_batches`` of the recipe.
        calibration_forward: ``fn(pl_module, batch)`` running one (device-side) training batch through the
            model for calibration, in eval mode. Default: ``pl_module.calibration_forward(batch)`` if the
            module defines it, else ``pl_module(batch[0])`` for tuple/list batches and ``pl_module(batch)``
            otherwise. A string is an import path (``"pkg.mod.fn"``), for YAML configs.
        prediction_layers: names (relative to ``target``) of the final prediction layers; default: the
            ``cls_logits``/``bbox_reg``-style layers of the head, else the last layer.
        first_layers: names of the layers that see the image; default: the first layer.
        log_every_n_steps: how often quantization figures are logged through ``pl_module.log``
            (0: never; default: the Trainer's ``log_every_n_steps``).

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[DetQCallback(recipe="w4a8")], max_steps=10)  # doctest: +SKIP
    """

    def __init__(
        self,
        recipe: Union[str, dict[str, Any]] = "w8a8",
        target: Optional[str] = None,
        calibrate: bool = True,
        calibration_batches: Optional[int] = None,
        calibration_forward: Optional[Union[str, Callable[..., Any]]] = None,
        prediction_layers: Optional[list[str]] = None,
        first_layers: Optional[list[str]] = None,
        log_every_n_steps: Optional[int] = None,
    ) -> None:
        self.recipe: Recipe = load_recipe(recipe)  # validated now: a bad config fails before the Trainer runs
        if not isinstance(calibrate, bool):
            raise TypeError(f"DetQCallback: `calibrate` = {calibrate!r} must be True or False")
        if calibration_batches is not None and (
            isinstance(calibration_batches, bool) or not isinstance(calibration_batches, int) or calibration_batches < 1
        ):
            raise ValueError(f"DetQCallback: `calibration_batches` = {calibration_batches!r} must be a positive integer")
        if log_every_n_steps is not None and (not isinstance(log_every_n_steps, int) or log_every_n_steps < 0):
            raise ValueError(f"DetQCallback: `log_every_n_steps` = {log_every_n_steps!r} must be an integer >= 0")
        if target is not None and not isinstance(target, str):
            raise TypeError(f"DetQCallback: `target` = {target!r} must be an attribute path such as 'model'")
        if isinstance(calibration_forward, str):
            calibration_forward = _import_object(calibration_forward, "calibration_forward")
        if calibration_forward is not None and not callable(calibration_forward):
            raise TypeError(f"DetQCallback: `calibration_forward` = {calibration_forward!r} is not callable")
        self.target = target or ""
        self.calibrate = calibrate
        self.calibration_batches = calibration_batches
        self.calibration_forward = calibration_forward
        self.prediction_layers = list(prediction_layers) if prediction_layers is not None else None
        self.first_layers = list(first_layers) if first_layers is not None else None
        self.log_every_n_steps = log_every_n_steps
        self._module: Optional[pl.LightningModule] = None  # the module this callback converted
        self._resolved_prediction_layers: Optional[list[str]] = None
        self._loss_terms: list[tuple[str, LossTerm]] = []
        self._step_batch: Any = None
        self._step_terms_done = False
        self._installed: list[str] = []
        self.last_calibration = None
        self.last_loss_terms: dict[str, float] = {}
        self.distillation_inputs = None  # fn(pl_module, batch) -> (images, targets); see _distillation_inputs
        self.crqat: Optional[CRQAT] = None
        self._stage_fn: Optional[str] = None
        self._recorder: Optional[_Recorder] = None

    # ================================================================== public helpers
    def quantized_model(self, pl_module: "pl.LightningModule") -> nn.Module:
        """The sub-module this callback quantizes (``target``)."""
        return pl_module.get_submodule(self.target) if self.target else pl_module

    def add_loss_term(self, name: str, fn: LossTerm) -> None:
        """Add ``fn(pl_module, batch, step_output) -> {name: tensor}`` to the training loss.

        The terms are computed inside the wrapped ``training_step`` (hence inside the DDP forward) and added
        to its loss (tensor or ``{"loss": ...}`` returns); with manual optimization they are added to the
        first ``manual_backward`` of the step. Each term is logged as ``detq/<name>``.
        """
        if any(n == name for n, _ in self._loss_terms):
            raise ValueError(f"DetQCallback: a loss term named {name!r} is already registered")
        self._loss_terms.append((name, fn))

    # ================================================================== conversion
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        mine = [cb for cb in trainer.callbacks if isinstance(cb, DetQCallback)]
        if len(mine) > 1:
            raise RuntimeError(
                f"DetQCallback: {len(mine)} DetQCallbacks are attached to the Trainer; a model is quantized by one "
                "recipe: keep a single DetQCallback (merge the rules into its recipe)"
            )
        self._trainer_ref = trainer
        self._stage_fn = stage
        has_configure_model = is_overridden("configure_model", pl_module, parent=pl.LightningModule)
        self._install_wrappers(pl_module, wrap_configure_model=has_configure_model and not self._converted(pl_module))
        if not has_configure_model or self._converted(pl_module):
            self._convert(trainer, pl_module)
        # else: converted right after `configure_model` (see _install_wrappers), still before restore/optimizers.

    def _converted(self, pl_module) -> bool:
        return self._module is pl_module

    def _convert(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._converted(pl_module):
            return  # the same module again (validate/test after fit, a second fit)
        model = self.quantized_model(pl_module)
        if is_quantized(model):
            theirs = recipe_of(model)
            if theirs is None or theirs.fingerprint() != self.recipe.fingerprint():
                raise RuntimeError(
                    "DetQCallback: the module is already quantized with a different recipe "
                    f"({theirs.name if theirs else 'unknown'!r} vs {self.recipe.name!r}); is it quantized twice?"
                )
            self._module = pl_module  # quantized earlier with the same recipe (e.g. by another Trainer)
            return
        preds = self.prediction_layers if self.prediction_layers is not None else default_prediction_layers(model)
        crqat = None
        if self._stage_fn == "fit" and (self.recipe.curriculum.enabled or self.recipe.distillation.enabled):
            crqat = CRQAT(self.recipe, model)  # the teacher is copied from the float model, before conversion
        quantize(model, self.recipe, prediction_layers=preds, first_layers=self.first_layers)
        self._resolved_prediction_layers = preds
        self.crqat = crqat
        if crqat is not None and crqat.loss is not None and not any(n == "distill" for n, _ in self._loss_terms):
            self._loss_terms.append(("distill", self._distillation_term))
        if crqat is not None and crqat.schedule is not None and not any(n == "_ddp" for n, _ in self._loss_terms):
            self._loss_terms.append(("_ddp", self._disabled_quantizer_anchor))
        self._module = pl_module
        self._reattach_weight_averaging(trainer, pl_module)
        if trainer.is_global_zero:
            n = len(quantized_layers(model))
            pl.utilities.rank_zero_info(f"DetQCallback: {n} layers quantized with recipe {self.recipe.name!r}")

    def _reattach_weight_averaging(self, trainer, pl_module) -> None:
        """Averaging callbacks that copied the module before conversion copy it again, quantized."""
        from lightning.pytorch.callbacks import StochasticWeightAveraging
        from lightning.pytorch.callbacks.weight_averaging import WeightAveraging

        for cb in trainer.callbacks:
            if isinstance(cb, WeightAveraging) and cb._average_model is not None and not is_quantized(cb._average_model.module):
                cb.setup(trainer, pl_module, "fit")
            if isinstance(cb, StochasticWeightAveraging) and cb._average_model is not None and not is_quantized(cb._average_model):
                cb._average_model = deepcopy(pl_module)

    # ================================================================== wrappers on the module
    def _install_wrappers(self, pl_module: "pl.LightningModule", wrap_configure_model: bool) -> None:
        if self._installed:
            return
        callback = self

        orig_configure = type(pl_module).configure_model

        def configure_model(module_self):
            orig_configure(module_self)
            if callback._trainer_ref is not None:
                callback._convert(callback._trainer_ref, module_self)

        orig_step = type(pl_module).training_step

        def training_step(module_self, *args, **kwargs):
            batch = args[0] if args else kwargs.get("batch")
            callback._step_batch, callback._step_terms_done = batch, False
            callback._begin_recording(module_self)
            try:
                out = orig_step(module_self, *args, **kwargs)
                if module_self.automatic_optimization:
                    out = callback._add_loss_terms(module_self, batch, out)
            finally:
                callback._end_recording()
                callback._step_batch = None
            return out

        orig_on_load = type(pl_module).on_load_checkpoint

        def on_load_checkpoint(module_self, checkpoint):
            orig_on_load(module_self, checkpoint)
            callback._verify_checkpoint(module_self, checkpoint)

        orig_manual_backward = type(pl_module).manual_backward

        def manual_backward(module_self, loss, *args, **kwargs):
            # Manual optimization: the terms join the first backward of the step (after the forward ran).
            if callback._loss_terms and not callback._step_terms_done and callback._step_batch is not None:
                callback._step_terms_done = True
                total = callback._compute_loss_terms(module_self, callback._step_batch, None)
                if total is not None:
                    loss = loss + total.to(loss.dtype)
            return orig_manual_backward(module_self, loss, *args, **kwargs)

        wrappers = [("configure_model", configure_model)] if wrap_configure_model else []
        for name, fn in wrappers + [
            ("training_step", training_step),
            ("on_load_checkpoint", on_load_checkpoint),
            ("manual_backward", manual_backward),
        ]:
            # A bound method: deepcopy (EMA/SWA copies of the module) rebinds it to the copy.
            object.__setattr__(pl_module, name, types.MethodType(fn, pl_module))
            self._installed.append(name)

    def _remove_wrappers(self, pl_module: "pl.LightningModule") -> None:
        for name in self._installed:
            pl_module.__dict__.pop(name, None)
        self._installed = []

    # Lightning has no hook between `configure_model` and restore: the trainer is remembered in `setup`.
    _trainer_ref: Optional["pl.Trainer"] = None

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._remove_wrappers(pl_module)
        self._end_recording()
        self._step_batch = None
        self._trainer_ref = None

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "exception")

    # ================================================================== loss terms (inside the DDP forward)
    def _begin_recording(self, pl_module) -> None:
        if self.crqat is not None and self.crqat.loss is not None and self._module is pl_module:
            names = self.crqat.record_names()
            if names:
                self._recorder = _Recorder(self.quantized_model(pl_module), names)

    def _end_recording(self) -> None:
        if self._recorder is not None:
            self._recorder.remove()
            self._recorder = None

    def _distillation_term(self, pl_module, batch, out) -> dict[str, torch.Tensor]:
        recorded = self._recorder.outputs if self._recorder is not None else {}
        return self.crqat.distillation_terms(pl_module, self.quantized_model(pl_module), batch, recorded,
                                             self._distillation_inputs(pl_module))

    def _disabled_quantizer_anchor(self, pl_module, batch, out) -> dict[str, torch.Tensor]:
        # Quantizers switched off by the curriculum pass their input through, so their scales take no part in
        # the loss and DDP (find_unused_parameters=False) would stop with an error. A zero-weighted term keeps
        # them in the graph: their gradient is exactly 0, and the curriculum restores frozen stages anyway.
        params = [p for _, q in iter_quantizers(self.quantized_model(pl_module)) if not q.enabled
                  for p in q.parameters(recurse=False) if p.requires_grad]
        return {"_ddp_anchor": torch.stack([p.sum() for p in params]).sum() * 0.0} if params else {}

    def _distillation_inputs(self, pl_module):
        if self.distillation_inputs is not None:
            return self.distillation_inputs
        if callable(getattr(pl_module, "distillation_inputs", None)):
            return lambda m, b: m.distillation_inputs(b)
        return _default_distillation_inputs

    def _compute_loss_terms(self, pl_module, batch, out) -> Optional[torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        for _, fn in self._loss_terms:
            terms.update(fn(pl_module, batch, out))
        if not terms:
            return None
        self.last_loss_terms = {k: float(v.detach()) for k, v in terms.items() if not k.startswith("_")}
        for k, v in terms.items():
            if k.startswith("_"):
                continue
            _log(pl_module, f"detq/{k}", v.detach().float())
        return torch.stack([t.float() for t in terms.values()]).sum()

    def _add_loss_terms(self, pl_module, batch, out):
        if not self._loss_terms or out is None:
            return out  # None: the user skips this step
        if not (isinstance(out, torch.Tensor) or (isinstance(out, dict) and isinstance(out.get("loss"), torch.Tensor))):
            raise TypeError(
                "DetQCallback: training_step must return a loss tensor or a dict with a 'loss' tensor to receive "
                f"the auxiliary loss terms; it returned {type(out).__name__}"
            )
        total = self._compute_loss_terms(pl_module, batch, out)
        if total is None:
            return out
        if isinstance(out, torch.Tensor):
            return out + total.to(out.dtype)
        out = dict(out)
        out["loss"] = out["loss"] + total.to(out["loss"].dtype)
        return out

    # ================================================================== optimizer
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        _guard_weight_averaging(trainer, pl_module)
        model = self.quantized_model(pl_module)
        if self.crqat is not None and self.crqat.teacher is not None:
            self.crqat.teacher.to(pl_module.device)
        scale = self.recipe.quantization.quantizer_lr_scale
        for opt in trainer.optimizers:
            if any(g.get("name") == QUANTIZER_GROUP_NAME for g in opt.param_groups):
                continue
            owned = {id(p) for g in opt.param_groups for p in g["params"]}
            if not any(id(p) in owned for p in quantizer_parameters(model)):
                continue  # this optimizer does not train the quantized model (e.g. a GAN's other net)
            before = len(opt.param_groups)
            n = add_quantizer_param_group(opt, model, scale)
            if n:
                _extend_schedulers(trainer, opt, before)

    # ================================================================== calibration
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        model = self.quantized_model(pl_module)
        acts = [q for _, q in iter_quantizers(model) if q.role == "activation" and q.enabled]
        if not self.calibrate or not acts or all(q.initialized for q in acts):
            return  # resumed or loaded with calibrated state: keep it
        loader = trainer.train_dataloader
        if loader is None:
            return
        num = self.calibration_batches or self.recipe.calibration.num_batches
        forward = self._calibration_forward(pl_module)

        def batches():
            for i, batch in enumerate(loader):
                if i >= num:
                    break
                yield pl_module._apply_batch_transfer_handler(batch, dataloader_idx=0)

        def fwd(_model, batch):
            with trainer.precision_plugin.forward_context():
                return forward(pl_module, batch)

        # The data drawn for calibration must not change the random stream of training (resume reproduces).
        with torch.random.fork_rng(devices=[]):
            was = pl_module.training
            try:
                self.last_calibration = calibrate(model, batches(), forward_fn=fwd, num_batches=num)
            finally:
                pl_module.train(was)

    def _calibration_forward(self, pl_module):
        if self.calibration_forward is not None:
            return self.calibration_forward
        if callable(getattr(pl_module, "calibration_forward", None)):
            return lambda m, b: m.calibration_forward(b)
        return _default_calibration_forward

    # ================================================================== curriculum
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        sched = self.crqat.schedule if self.crqat is not None else None
        if sched is None:
            return
        if self.recipe.curriculum.unit == "epoch" and trainer.max_epochs not in (None, -1):
            progress = trainer.current_epoch / max(1, trainer.max_epochs or 1)
        else:
            progress = trainer.global_step / max(1, trainer.estimated_stepping_batches)
        if sched.update(self.quantized_model(pl_module), progress):
            pl.utilities.rank_zero_info(
                f"DetQCallback: curriculum stage {sched.current + 1}/{len(sched.stages)} ({sched.stage_name()}) "
                f"from step {trainer.global_step}")

    # ================================================================== logging
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.crqat is not None and self.crqat.schedule is not None:
            self.crqat.schedule.after_optimizer_step(self.quantized_model(pl_module))
            pl_module.log("detq/curriculum_stage", float(self.crqat.schedule.current + 1), on_step=True, on_epoch=False)
        every = self.log_every_n_steps if self.log_every_n_steps is not None else trainer.log_every_n_steps
        if not every or (trainer.global_step % every and batch_idx % every):
            return
        for k, v in quantization_figures(self.quantized_model(pl_module)).items():
            pl_module.log(f"detq/{k}", v, on_step=True, on_epoch=False, prog_bar=False)

    # ================================================================== checkpoints
    def _saved_state(self, pl_module) -> dict:
        model = self.quantized_model(pl_module)
        state = quantization_state(model)
        state["target"] = self.target
        # The layers that got the first/prediction-layer bits, as the conversion chose them (roles are kept on
        # the layers, so this also holds for a module quantized by an earlier Trainer).
        roles = {n: getattr(m, "detq_layer_role", "body") for n, m in quantized_layers(model)}
        state["prediction_layers"] = [n for n, r in roles.items() if r == "prediction"] or self._resolved_prediction_layers
        state["first_layers"] = [n for n, r in roles.items() if r == "first"] or self.first_layers
        return state

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = self._saved_state(pl_module)
        if self.crqat is not None and self.crqat.teacher is not None:
            # The teacher is the float model at the start of QAT: resume cannot rebuild it from the student.
            checkpoint[TEACHER_KEY] = self.crqat.teacher.state_dict()

    def state_dict(self) -> dict[str, Any]:
        state = {"recipe": self.recipe.to_dict(), "target": self.target}
        if self.crqat is not None:
            state.update(self.crqat.state_dict())
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        theirs = load_recipe(state_dict["recipe"]).fingerprint()
        if theirs != self.recipe.fingerprint():
            raise CheckpointMismatchError(
                f"DetQCallback: the checkpoint's callback state was written with recipe "
                f"{state_dict['recipe'].get('name')!r}, this run uses {self.recipe.name!r}"
            )
        cur = state_dict.get("curriculum")
        if self.crqat is not None and self.crqat.schedule is not None:
            if cur is None:
                raise CheckpointMismatchError("DetQCallback: the checkpoint has no curriculum state but this run uses a curriculum")
            self.crqat.schedule.load_state_dict(cur, self.quantized_model(self._module))

    def _verify_checkpoint(self, pl_module, checkpoint: dict) -> None:
        """Runs before Lightning copies the checkpoint's weights into the module (strictly)."""
        if self._module is not pl_module:
            return
        sd = checkpoint.get("state_dict", {})
        prefix = f"{self.target}." if self.target else ""
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is None and not _has_quantizer_keys(sd, prefix):
            raise CheckpointMismatchError(
                "DetQCallback: the checkpoint holds float weights without quantizer state, but this run quantizes "
                "the model; to start QAT from float weights load them into the module before `fit` "
                "(e.g. `Module.load_from_checkpoint(path)`) and pass no `ckpt_path`, or resume from a checkpoint "
                "written by a quantized run"
            )
        check_compatible(self.quantized_model(pl_module), sd, saved, source="checkpoint", prefix=prefix)
        if self.crqat is not None and self.crqat.teacher is not None:
            if TEACHER_KEY in checkpoint:
                self.crqat.teacher.load_state_dict(checkpoint[TEACHER_KEY])
            elif not self.recipe.distillation.teacher:
                raise CheckpointMismatchError(
                    "DetQCallback: the checkpoint has no distillation teacher (it was not written by a distillation "
                    "run); give `distillation.teacher` (the float checkpoint QAT started from) to resume from it"
                )


def _log(pl_module, name: str, value) -> None:
    """``pl_module.log`` on step, when a Lightning loop is collecting results (not in direct calls)."""
    trainer = getattr(pl_module, "_trainer", None)
    if trainer is None or getattr(trainer, "_results", None) is None:
        return
    pl_module.log(name, value, on_step=True, on_epoch=False, prog_bar=False)


# ====================================================================== weight averaging
def _guard_weight_averaging(trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
    """``EMAWeightAveraging`` blends every buffer with float arithmetic, which would truncate the quantizers'
    integer flags (a stage switched on by the curriculum, 0 -> 1, stays 0 in the average forever). After each
    update the averaged model's integer buffers are copied exactly from the live model."""
    from lightning.pytorch.callbacks.weight_averaging import WeightAveraging

    for cb in trainer.callbacks:
        avg = getattr(cb, "_average_model", None) if isinstance(cb, WeightAveraging) else None
        if avg is None or getattr(avg, "_detq_guarded", False):
            continue
        orig = avg.update_parameters

        def update_parameters(model, _orig=orig, _avg=avg):
            _orig(model)
            sync_integer_buffers(_avg.module, model)

        avg.update_parameters = update_parameters
        avg._detq_guarded = True


@torch.no_grad()
def sync_integer_buffers(dst: nn.Module, src: nn.Module) -> None:
    """Copy the non-floating buffers (quantizer bits/enabled/initialized flags) of ``src`` into ``dst`` and
    refresh ``dst``'s quantizers from them."""
    for (name, b_dst), (_, b_src) in zip(dst.named_buffers(), src.named_buffers()):
        if not b_dst.is_floating_point():
            b_dst.copy_(b_src.to(b_dst.device))
    for _, q in iter_quantizers(dst):
        q._bits, q._enabled, q._initialized = int(q.bits_state), bool(q.enabled_state), bool(q.initialized_state)


# ====================================================================== figures
@torch.no_grad()
def quantization_figures(model: nn.Module) -> dict[str, float]:
    """Scalars worth logging: number of quantized layers, mean activation/weight scale, enabled quantizers."""
    layers = quantized_layers(model)
    acts = [q for _, q in iter_quantizers(model) if q.role == "activation"]
    weights = [q for _, q in iter_quantizers(model) if q.role == "weight"]
    figs = {"quantized_layers": float(len(layers))}
    if acts:
        figs["act_scale_mean"] = float(torch.stack([q.scale.detach().float().mean() for q in acts]).mean())
    if weights:
        figs["weight_scale_mean"] = float(torch.stack([q.scale.detach().float().mean() for q in weights]).mean())
    figs["enabled_quantizers"] = float(sum(q.enabled for q in acts + weights))
    return figs


# ====================================================================== schedulers
def _extend_schedulers(trainer: "pl.Trainer", optimizer: torch.optim.Optimizer, n_before: int) -> None:
    """Schedulers built before the quantizer group existed remember one base value per old group."""
    for cfg in trainer.lr_scheduler_configs:
        sched = cfg.scheduler
        if getattr(sched, "optimizer", None) is not optimizer:
            continue
        group = optimizer.param_groups[-1]
        group.setdefault("initial_lr", group["lr"])
        if hasattr(sched, "base_lrs") and len(sched.base_lrs) == n_before:
            sched.base_lrs.append(group["initial_lr"])
        if hasattr(sched, "_last_lr") and isinstance(sched._last_lr, list) and len(sched._last_lr) == n_before:
            sched._last_lr.append(group["lr"])
        for attr in ("lr_lambdas",):
            fns = getattr(sched, attr, None)
            if isinstance(fns, list) and len(fns) == n_before:
                if len({id(f) for f in fns}) != 1:
                    raise RuntimeError(
                        f"DetQCallback: {type(sched).__name__} has one lambda per parameter group; give the quantizer "
                        f"group ('{QUANTIZER_GROUP_NAME}') its own in configure_optimizers or use one lambda"
                    )
                fns.append(fns[0])
        if type(sched).__name__ in ("OneCycleLR", "CyclicLR"):
            for key in ("max_lr", "min_lr", "max_momentum", "base_momentum"):
                if key in optimizer.param_groups[0] and key not in group:
                    ratio = group["initial_lr"] / max(optimizer.param_groups[0].get("initial_lr", 1.0), 1e-30)
                    group[key] = optimizer.param_groups[0][key] * (ratio if "lr" in key else 1.0)
            if hasattr(sched, "max_lrs") and len(sched.max_lrs) == n_before:
                sched.max_lrs.append(group.get("max_lr", group["lr"]))
            if hasattr(sched, "base_lrs") and len(sched.base_lrs) == n_before:
                sched.base_lrs.append(group["initial_lr"])


# ====================================================================== loading outside the Trainer
def load_quantized_checkpoint(
    module_cls: type,
    checkpoint_path: Union[str, Path],
    *,
    map_location: Any = None,
    strict: bool = True,
    **kwargs: Any,
) -> "pl.LightningModule":
    """Load a checkpoint written by a run with :class:`DetQCallback` into a new ``module_cls`` instance.

    The module is built like ``module_cls.load_from_checkpoint`` does (hyper-parameters from the checkpoint,
    ``kwargs`` override them), quantized with the checkpoint's recipe and layer choices, verified, then
    loaded strictly: every quantizer value comes from the checkpoint.

    Raises:
        CheckpointMismatchError: the checkpoint has no quantizer state (it is a float checkpoint: use
            ``module_cls.load_from_checkpoint``) or does not fit the quantized module.

    Example:
        >>> model = load_quantized_checkpoint(MyDetector, "last.ckpt", map_location="cpu")  # doctest: +SKIP
        >>> model.eval(); preds = model(images)                                              # doctest: +SKIP
    """
    orig = module_cls.on_load_checkpoint

    def on_load_checkpoint(self, checkpoint):
        orig(self, checkpoint)
        saved = checkpoint.get(CHECKPOINT_KEY)
        sd = checkpoint.get("state_dict", {})
        if saved is None:
            raise CheckpointMismatchError(
                f"{checkpoint_path}: no detq quantization state (was it written by a run with DetQCallback?); "
                f"load float checkpoints with {module_cls.__name__}.load_from_checkpoint"
            )
        target = saved.get("target") or ""
        model = self.get_submodule(target) if target else self
        if is_overridden("configure_model", self, parent=pl.LightningModule):
            self.configure_model()
        quantize(model, saved["recipe"], prediction_layers=saved.get("prediction_layers"), first_layers=saved.get("first_layers"))
        check_compatible(model, sd, saved, source=str(checkpoint_path), prefix=f"{target}." if target else "")

    loader_cls = type(module_cls.__name__, (module_cls,), {"on_load_checkpoint": on_load_checkpoint, "__module__": module_cls.__module__})
    model = loader_cls.load_from_checkpoint(checkpoint_path, map_location=map_location, strict=strict, **kwargs)
    model.__class__ = module_cls
    return model


def _import_object(path: str, what: str):
    import importlib

    mod, _, name = path.rpartition(".")
    if not mod:
        raise ValueError(f"DetQCallback: `{what}` = {path!r} must be an import path such as 'package.module.function'")
    try:
        return getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"DetQCallback: `{what}` = {path!r} cannot be imported: {e}") from None




# ====================================================================== CR-QAT: stages and distillation
def detector_root(model: nn.Module) -> Optional[str]:
    """Name of the first sub-module laid out like a torchvision detector (``backbone.body``,
    ``backbone.fpn``, ``head``), or ``None``."""
    for name, m in model.named_modules():
        bb, head = getattr(m, "backbone", None), getattr(m, "head", None)
        if isinstance(bb, nn.Module) and isinstance(head, nn.Module) and hasattr(bb, "body") and hasattr(bb, "fpn"):
            return name
    return None


def automatic_stages(model: nn.Module):
    """The data-flow stages of ``model`` where its structure shows them, else ``None``.

    * torchvision detectors (FCOS, RetinaNet, ...): ``backbone`` = ``backbone.body``, then
      ``neck_head`` = ``backbone.fpn`` + ``head`` (CR-QAT's two stages); the body's outputs are the
      features distilled during stage 1.
    * modules with children ``backbone`` and ``neck``/``head``/``bbox_head`` (MMDetection/Ultralytics style).
    """
    from .curriculum import Stage

    root = detector_root(model)
    if root is not None:
        p = f"{root}." if root else ""
        return [Stage("backbone", [p + "backbone.body"], [p + "backbone.body"]),
                Stage("neck_head", [p + "backbone.fpn", p + "head"], [])]
    for name, m in model.named_modules():
        kids = dict(m.named_children())
        later = [k for k in ("neck", "head", "bbox_head", "decode_head") if k in kids]
        if "backbone" in kids and later:
            p = f"{name}." if name else ""
            return [Stage("backbone", [p + "backbone"], [p + "backbone"]), Stage("neck_head", [p + k for k in later], [])]
    return None


def _as_tensor_list(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        return [v for v in x.values() if isinstance(v, torch.Tensor)]
    if isinstance(x, (list, tuple)):
        return [v for v in x if isinstance(v, torch.Tensor)]
    return []


class _Recorder:
    """Forward hooks that record every output of named sub-modules (a head's tower runs once per level)."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self.outputs: dict[str, list[Any]] = {n: [] for n in names}
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise RecipeError(f"distillation: no sub-module named {missing} in {type(model).__name__}")
        self.handles = [modules[n].register_forward_hook(lambda m, i, o, _n=n: self.outputs[_n].append(o)) for n in names]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class TorchvisionDenseHead:
    """Distillation adapter for torchvision's dense detectors (FCOS, RetinaNet): raw class logits, decoded
    boxes, the classification tower's features as region embeddings, and the teacher's classifier weights
    (averaged over the kernel) as class anchors."""

    def __init__(self, root: str) -> None:
        self.root = root
        p = f"{root}." if root else ""
        self.head_name, self.tower_name, self.body_name = p + "head", p + "head.classification_head.conv", p + "backbone.body"

    def record_names(self) -> list[str]:
        return [self.head_name, self.tower_name, self.body_name]

    @staticmethod
    def _embeddings(tower_outputs: Sequence[torch.Tensor], num_anchors_total: int) -> torch.Tensor:
        per_level = [t.flatten(2).transpose(1, 2) for t in tower_outputs]  # (N, HW, D) in H, W order
        hw = sum(t.shape[1] for t in per_level)
        a = max(1, num_anchors_total // max(hw, 1))
        return torch.cat([t.repeat_interleave(a, dim=1) if a > 1 else t for t in per_level], 1)

    def _decode(self, det: nn.Module, regression: torch.Tensor, anchors: list[torch.Tensor]) -> torch.Tensor:
        coder = det.box_coder
        if hasattr(coder, "decode_single") and not hasattr(coder, "normalize_by_size"):
            return torch.stack([coder.decode_single(regression[b].float(), anchors[b]) for b in range(len(anchors))])
        return coder.decode(regression.float(), torch.stack(anchors))

    @torch.no_grad()
    def teacher_pass(self, teacher: nn.Module, images, targets):
        det = teacher.get_submodule(self.root) if self.root else teacher
        det.eval()
        image_list, targets_t = det.transform(images, [dict(t) for t in targets] if targets is not None else None)
        body = det.backbone.body(image_list.tensors)
        feats = list(det.backbone.fpn(body).values())
        rec = _Recorder(det.head, ["classification_head.conv"])
        try:
            head = det.head(feats)
        finally:
            rec.remove()
        anchors = det.anchor_generator(image_list, feats)
        logits = head["cls_logits"]
        w = det.head.classification_head.cls_logits.weight.detach().float().mean((2, 3))  # (A*C, D)
        c = logits.shape[-1]
        anchors_tc = w.view(-1, c, w.shape[1]).mean(0)
        from .distill import HeadOutputs

        out = HeadOutputs(
            cls_logits=logits.float(), boxes=self._decode(det, head["bbox_regression"], anchors),
            embeddings=self._embeddings(rec.outputs["classification_head.conv"], logits.shape[1]).float(),
            class_anchors=anchors_tc,
        )
        return out, list(body.values()), anchors, targets_t

    def student_outputs(self, student: nn.Module, recorded: dict[str, list[Any]], anchors):
        det = student.get_submodule(self.root) if self.root else student
        head = recorded[self.head_name][-1]
        logits = head["cls_logits"]
        from .distill import HeadOutputs

        return HeadOutputs(
            cls_logits=logits.float(), boxes=self._decode(det, head["bbox_regression"], anchors),
            embeddings=self._embeddings(recorded[self.tower_name][-len(recorded[self.tower_name]):], logits.shape[1]).float(),
        )


def _default_distillation_inputs(pl_module, batch):
    """``(images, targets)`` from a ``(images, targets)`` batch (torchvision detection convention)."""
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return batch[0], batch[1]
    if isinstance(batch, (list, tuple)):
        return batch[0], None
    return batch, None


class CRQAT:
    """CR-QAT wiring for one Lightning run: curriculum schedule, teacher and distillation terms.

    Built by :class:`DetQCallback` from the recipe's ``curriculum`` and ``distillation`` sections; it holds
    no algorithm (those are :mod:`detq_hooks.curriculum` and :mod:`detq_hooks.distill`).
    """

    def __init__(self, recipe: Recipe, float_model: nn.Module) -> None:
        from .curriculum import CurriculumSchedule, assign_parameters
        from .distill import DistillationLoss, Teacher

        self.recipe = recipe
        cur, dis = recipe.curriculum, recipe.distillation
        auto = automatic_stages(float_model)
        self.schedule = None
        stages = None
        if cur.enabled:
            if cur.stages is None and auto is None:
                raise RecipeError(
                    f"curriculum: the stages of {type(float_model).__name__} cannot be found automatically; name them in "
                    "`curriculum.stages` (module-name prefixes/globs in data-flow order, e.g. "
                    "[{name: backbone, modules: [model.backbone]}, {name: head, modules: [model.head]}])"
                )
            self.schedule = CurriculumSchedule.from_recipe(cur, auto or [])
            assign_parameters(float_model, self.schedule.stages)  # every parameter in exactly one stage, now
            stages = self.schedule.stages
        else:
            from .curriculum import stages_from_recipe

            stages = stages_from_recipe(cur) or auto or []
        self.stages = stages
        self.num_stages = max(2, len(stages))
        self.teacher = None
        self.adapter = None
        self.loss = None
        if dis.enabled:
            self.teacher = Teacher.from_model(float_model)
            if dis.teacher:
                self._load_teacher(dis.teacher)
            root = detector_root(float_model)
            self.adapter = TorchvisionDenseHead(root) if root is not None and hasattr(
                (float_model.get_submodule(root) if root else float_model), "anchor_generator") else None
            self.loss = DistillationLoss(dis, num_stages=self.num_stages if self.schedule is not None else self.num_stages)
        self.feature_names = [o for st in stages[:-1] for o in st.outputs] if stages else []

    def _load_teacher(self, path: str) -> None:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        sd = ckpt.get("state_dict", ckpt)
        own = self.teacher.module.state_dict()
        # A Lightning checkpoint prefixes the keys with the quantized sub-module's path: strip what does not fit.
        if not set(own) <= set(sd):
            for prefix in {k.split(".", 1)[0] + "." for k in sd}:
                stripped = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
                if set(own) <= set(stripped):
                    sd = stripped
                    break
        self.teacher.module.load_state_dict({k: sd[k] for k in own}, strict=True)

    @property
    def stage(self) -> Optional[int]:
        return self.schedule.current if self.schedule is not None and self.schedule.current >= 0 else None

    # ---------------------------------------------------------------- distillation term
    def record_names(self) -> list[str]:
        names = list(self.feature_names)
        if self.adapter is not None:
            names = sorted(set(names) | set(self.adapter.record_names()))
        return names

    def distillation_terms(self, pl_module, student: nn.Module, batch, recorded, inputs_fn) -> dict[str, torch.Tensor]:
        from .distill import task_aligned_positives

        images, targets = inputs_fn(pl_module, batch)
        t_head = s_head = assignment = None
        s_feats = t_feats = None
        if self.adapter is not None:
            t_head, t_body, anchors, targets_t = self.adapter.teacher_pass(self.teacher.module, images, targets)
            s_head = self.adapter.student_outputs(student, recorded, anchors)
            if targets_t is not None:
                centers = (anchors[0][:, :2] + anchors[0][:, 2:]) / 2
                assignment = task_aligned_positives(
                    t_head.cls_logits, t_head.boxes, centers,
                    [t["boxes"] for t in targets_t], [t["labels"] for t in targets_t])
            if self.feature_names:
                s_feats = [_as_tensor_list(recorded[n][-1]) for n in self.feature_names]
                t_feats = [t_body]
        elif self.feature_names:
            rec = _Recorder(self.teacher.module, self.feature_names)
            try:
                self.teacher(images)
            finally:
                rec.remove()
            s_feats = [_as_tensor_list(recorded[n][-1]) for n in self.feature_names]
            t_feats = [_as_tensor_list(rec.outputs[n][-1]) for n in self.feature_names]
        total, parts = self.loss(stage=self.stage, student_feats=s_feats, teacher_feats=t_feats,
                                 student_head=s_head, teacher_head=t_head, assignment=assignment)
        for k, v in parts.items():
            _log(pl_module, f"detq/distill_{k}", v)
        self.last_terms = parts
        return {"distill": total}

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"curriculum": self.schedule.state_dict() if self.schedule is not None else None}


__all__ = [
    "DetQCallback",
    "load_quantized_checkpoint",
    "quantization_figures",
    "default_prediction_layers",
    "automatic_stages",
    "TorchvisionDenseHead",
    "CRQAT",
    "CheckpointMismatchError",
]
