"""``DetQCallback``: Lightning's events translated into :class:`~detq_hooks.session.QuantSession` calls.

The callback holds no algorithm, head decoding or checkpoint format; it answers the session's
:class:`~detq_hooks.session.TrainerInterface` the Lightning way (calibration batches from the train loader,
moved by the strategy; progress from ``global_step`` / ``estimated_stepping_batches`` or epochs) and decides
where the loss terms are added (the ``training_step`` loss, inside the DDP forward).
"""

from __future__ import annotations

import contextlib
import types
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import nn

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden

from ..checkpoint import CHECKPOINT_KEY, CheckpointMismatchError, has_quantizer_state
from ..detectors import DetectorFamily
from ..loss_terms import FunctionTerm
from ..optim import QUANTIZER_GROUP_NAME
from ..quantizers import quantizer_parameters
from ..recipe import Recipe, load_recipe
from ..session import QuantSession, quantization_figures
from ..surgery import dequantize, is_quantized, quantized_layers
from . import averaging
from .loading import read_entry
from .metrics import CriticalMAP, detections_in
from .schedulers import _extend_schedulers

UserLossTerm = Callable[["pl.LightningModule", Any, Any], "dict[str, torch.Tensor]"]


def _default_calibration_forward(pl_module: "pl.LightningModule", batch: Any) -> Any:
    """``pl_module(inputs)``: for a ``(inputs, targets, ...)`` batch the first element, else the batch."""
    if isinstance(batch, (list, tuple)) and len(batch) >= 1:
        return pl_module(batch[0])
    return pl_module(batch)


def _default_distillation_inputs(pl_module, batch):
    """``(images, targets)`` from a ``(images, targets)`` batch (torchvision detection convention)."""
    if isinstance(batch, (list, tuple)):
        return (batch[0], batch[1]) if len(batch) >= 2 else (batch[0], None)
    return batch, None


def _log(pl_module, name: str, value) -> None:
    """``pl_module.log`` on step, when a Lightning loop is collecting results (not in direct calls)."""
    trainer = getattr(pl_module, "_trainer", None)
    if trainer is None or getattr(trainer, "_results", None) is None:
        return
    pl_module.log(name, value, on_step=True, on_epoch=False, prog_bar=False)


def _plan_differs(model: nn.Module, saved_layers: dict) -> bool:
    """Whether the model's per-layer plan differs from a saved one (``None`` in the saved plan: not recorded)."""
    from ..checkpoint import layer_plan

    ours = layer_plan(model)
    if set(ours) != set(saved_layers):
        return True
    return any(v is not None and ours[n].get(k) != v for n, s in saved_layers.items() for k, v in s.items() if k != "type")


class DetQCallback(Callback):
    """Quantize a LightningModule (fake-quant QAT, PTQ, CR-QAT) from a detq-hooks recipe.

    Args:
        recipe: preset name (``w8a8``, ``w4a8``, ``w4a4``, ``w8a8-ptq``, ...), recipe YAML path or dict.
        target: attribute path of the sub-module to quantize (e.g. ``"model"``); default: the whole module.
        calibrate: calibrate activation ranges on training batches before the first step (skipped when the
            weights came with calibrated quantizer state, e.g. on resume).
        calibration_batches: overrides ``calibration.num_batches`` of the recipe.
        calibration_forward: ``fn(pl_module, batch)`` running one (device-side) batch through the model for
            calibration, in eval mode. Default: ``pl_module.calibration_forward(batch)`` if the module defines
            it, else ``pl_module(batch[0])`` for tuple/list batches and ``pl_module(batch)`` otherwise. A string
            is an import path (``"pkg.mod.fn"``), for YAML configs.
        prediction_layers: names (relative to ``target``) of the final prediction layers; default: the
            detector family's answer (``cls_logits``/``bbox_reg``-style layers), else the last layer.
        first_layers: names of the layers that see the image; default: the first layer.
        log_every_n_steps: how often quantization figures are logged through ``pl_module.log``
            (0: never; default: the Trainer's ``log_every_n_steps``).
        family: a :class:`~detq_hooks.detectors.DetectorFamily` for your own detector (curriculum stages,
            distillation's head terms); default: found from the model (torchvision FCOS/RetinaNet, ...).
        class_names: the data set's class names in label order (the recipe's ``critical.classes`` resolve
            against them); default: ``pl_module.class_names`` or ``datamodule.class_names`` if either exists.

    With ``critical.classes`` in the recipe, validation and test log ``val/critical_mAP50-95`` and
    ``val/critical_mAP50`` (``test/...``): COCO mAP over the critical classes, from the detections that
    ``validation_step`` returns (torchvision's list of ``{"boxes", "scores", "labels"}``, or under a
    ``"detections"`` key) or, when it returns none, from one more forward of the quantized model on the batch.

    Attributes:
        session: the :class:`~detq_hooks.session.QuantSession` doing the work (stages, teacher, terms).
        distillation_inputs: ``fn(pl_module, batch) -> (images, targets)``, the batch in the detector
            family's convention; default: ``pl_module.distillation_inputs(batch)`` if defined, else the first
            two elements of the batch.
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
        family: Optional[DetectorFamily] = None,
        class_names: Optional[list[str]] = None,
    ) -> None:
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
        self.session = QuantSession(recipe, family=family, prediction_layers=prediction_layers,
                                    first_layers=first_layers, calibration_batches=calibration_batches)
        self.recipe: Recipe = self.session.recipe
        self.target = target or ""
        self.calibrate = calibrate
        self.calibration_batches = calibration_batches
        self.calibration_forward = calibration_forward
        self.log_every_n_steps = log_every_n_steps
        if class_names is not None and not (isinstance(class_names, (list, tuple)) and all(isinstance(c, str) for c in class_names)):
            raise TypeError(f"DetQCallback: `class_names` = {class_names!r} must be a list of class names")
        self.class_names = list(class_names) if class_names is not None else None
        self.distillation_inputs: Optional[Callable[[Any, Any], Any]] = None
        self.last_calibration = None
        self._critical: Optional[CriticalMAP] = None  # critical-category mAP of the running evaluation
        self._module: Optional[pl.LightningModule] = None  # the module this callback converted
        self._fresh = False  # converted in this run's setup, no checkpoint loaded yet: its plan may be rebuilt
        self._training = False
        self._trainer: Optional[pl.Trainer] = None
        self._installed: list[str] = []
        self._step: Optional[tuple[Any, Any]] = None  # (pl_module, batch) of the running training_step
        self._step_terms_done = False

    # ================================================================== public helpers
    def quantized_model(self, pl_module: "pl.LightningModule") -> nn.Module:
        """The sub-module this callback quantizes (``target``)."""
        return pl_module.get_submodule(self.target) if self.target else pl_module

    @property
    def last_loss_terms(self) -> dict[str, float]:
        """The loss terms of the last step (floats; distillation parts as ``distill_<part>``)."""
        return self.session.last_terms

    def add_loss_term(self, name: str, fn: UserLossTerm) -> None:
        """Add ``fn(pl_module, batch, step_output) -> {name: tensor}`` to the training loss.

        The terms are computed inside the wrapped ``training_step`` (hence inside the DDP forward) and added
        to its loss (tensor or ``{"loss": ...}`` returns); with manual optimization they are added to the
        first ``manual_backward`` of the step. Each term is logged as ``detq/<name>``.
        """
        self.session.add_loss_term(FunctionTerm(name, lambda ctx: fn(self._step[0], self._step[1], ctx.outputs)))

    # ================================================================== conversion: setup / configure_model
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        # Two DetQCallbacks are refused by Lightning itself (one stateful callback per state key).
        self._trainer = trainer
        self._training = stage == "fit" and not self.session.ptq
        later = is_overridden("configure_model", pl_module, parent=pl.LightningModule) and self._module is not pl_module
        self._install_wrappers(pl_module, wrap_configure_model=later)
        if not later:
            self._convert(trainer, pl_module)
        # else: converted right after `configure_model` returns, still before restore, DDP and optimizers.

    def _convert(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._module is pl_module:
            return  # the same module again (validate/test after fit, a second fit)
        model = self.quantized_model(pl_module)
        self._fresh = not is_quantized(model)
        dm = getattr(trainer, "datamodule", None)
        names = self.class_names or getattr(pl_module, "class_names", None) or getattr(dm, "class_names", None)
        self.session.class_names = list(names) if names else None
        self.session.convert(model, training=self._training)  # adopts a module quantized with this recipe
        self._converted(trainer, pl_module)

    def _converted(self, trainer, pl_module) -> None:
        self._module = pl_module
        averaging.reattach(trainer, pl_module)
        rank_zero_info(f"DetQCallback: {len(quantized_layers(self.quantized_model(pl_module)))} layers quantized "
                       f"with recipe {self.recipe.name!r}")

    # ================================================================== checkpoint: verify before the weights are copied
    def _on_load_checkpoint(self, pl_module: "pl.LightningModule", checkpoint: dict) -> None:
        if self._module is not pl_module:
            return
        model, prefix = self.quantized_model(pl_module), f"{self.target}." if self.target else ""
        source = str(self._trainer.ckpt_path) if self._trainer is not None and self._trainer.ckpt_path else "checkpoint"
        state_dict = checkpoint.get("state_dict", {})
        entry = read_entry(checkpoint, source, self.state_key)
        if entry is None and not has_quantizer_state(state_dict, prefix):
            raise CheckpointMismatchError(
                f"DetQCallback: {source} holds float weights without quantizer state, but this run quantizes the "
                "model; to start QAT from float weights load them into the module before `fit` (e.g. "
                "`Module.load_from_checkpoint(path)`) and pass no `ckpt_path`, or resume from a checkpoint "
                "written by a quantized run"
            )
        if self._fresh and entry is not None and _plan_differs(model, entry["layers"]):
            # The saved plan is the authority (bits changed after conversion): rebuild the float module from it.
            dequantize(model)
            self._fresh = False
            self.session.restore(model, entry, source=source, training=self._training)  # float on error
            averaging.reattach(self._trainer, pl_module, force=True)
        self._fresh = False
        entry = self.session.verify(model, state_dict, entry, source=source, prefix=prefix)
        self.session.load_state(model, entry, source=source, resume=self._training)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self._module is pl_module:
            checkpoint[CHECKPOINT_KEY] = self.session.state(self.quantized_model(pl_module), target=self.target)

    def state_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe.to_dict(), "target": self.target}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # 0.1.0 also kept the curriculum here: it is read with the `detq` entry (see _on_load_checkpoint).
        if load_recipe(state_dict["recipe"]).fingerprint() != self.recipe.fingerprint():
            raise CheckpointMismatchError(
                f"DetQCallback: the checkpoint's callback state was written with recipe "
                f"{state_dict['recipe'].get('name')!r}, this run uses {self.recipe.name!r}"
            )

    # ================================================================== optimizer
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        averaging.guard(trainer)
        if self.session.ptq:
            return
        model = self.quantized_model(pl_module)
        for opt in trainer.optimizers:
            if any(g.get("name") == QUANTIZER_GROUP_NAME for g in opt.param_groups):
                continue
            owned = {id(p) for g in opt.param_groups for p in g["params"]}
            if not any(id(p) in owned for p in quantizer_parameters(model)):
                continue  # this optimizer does not train the quantized model (e.g. a GAN's other net)
            before = len(opt.param_groups)
            if self.session.attach_optimizer(opt, model):
                _extend_schedulers(trainer, opt, before)

    # ================================================================== calibration / PTQ
    def on_sanity_check_start(self, trainer, pl_module) -> None:
        self._calibrate(trainer, pl_module)  # the sanity check would otherwise set the ranges from one val batch

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._calibrate(trainer, pl_module)
        if self.session.ptq:
            trainer.should_stop = True  # PTQ: calibrated, no optimizer step (the weights stay the float ones)
            rank_zero_info(f"DetQCallback: recipe {self.recipe.name!r} is post-training quantization: calibrated, "
                           "no training step is run")
            return
        model = self.quantized_model(pl_module)
        msg = self.session.start_training(model, device=pl_module.device, progress=self._progress(trainer))
        if msg:
            rank_zero_info(f"DetQCallback: {msg}")

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and trainer.state.fn != "fit":
            self._calibrate(trainer, pl_module)

    def on_test_start(self, trainer, pl_module) -> None:
        self._calibrate(trainer, pl_module)

    def on_predict_start(self, trainer, pl_module) -> None:
        self._calibrate(trainer, pl_module)

    def _calibrate(self, trainer, pl_module) -> None:
        """Ranges from a few training batches (the evaluation loader when there is none), before the first
        step of a QAT run, and before evaluating with a PTQ recipe; not when the ranges are already set."""
        model = self.quantized_model(pl_module)
        fitting = trainer.state.fn == "fit"
        if not self.calibrate or (not fitting and not self.session.ptq) or not self.session.needs_calibration(model):
            return
        loader = self._calibration_loader(trainer, pl_module, fitting)
        if loader is None:
            return
        forward = self._calibration_forward(pl_module)

        def batches() -> Iterable[Any]:
            for batch in loader:
                yield trainer.strategy.batch_to_device(batch, dataloader_idx=0)

        def fwd(target_model, batch):
            with trainer.precision_plugin.forward_context():
                if target_model is model:
                    return forward(pl_module, batch)
                if self.target:  # PTQ reconstruction's float copy of the target, in the target's place for this call
                    with self._in_place_of_target(pl_module, target_model):
                        return forward(pl_module, batch)
                return forward(target_model, batch)  # the float copy of the whole module

        was = pl_module.training
        try:
            run = self.session.run_ptq if self.session.ptq else self.session.calibrate
            self.last_calibration = run(model, batches(), fwd, family_batch=lambda b: self._family_batch(pl_module, b))
            plan = self.last_calibration.mixed_precision
            if plan is not None:
                rank_zero_info(f"DetQCallback: Fisher mixed precision: {plan.summary()}")
        finally:
            pl_module.train(was)

    @contextlib.contextmanager
    def _in_place_of_target(self, pl_module, replacement: nn.Module):
        """``replacement`` stands in for the quantized target sub-module of ``pl_module`` for one call."""
        parent_name, _, attr = self.target.rpartition(".")
        parent = pl_module.get_submodule(parent_name) if parent_name else pl_module
        original = getattr(parent, attr)
        parent._modules[attr] = replacement
        try:
            yield
        finally:
            parent._modules[attr] = original

    def _calibration_loader(self, trainer, pl_module, fitting: bool):
        if fitting:
            trainer.fit_loop.setup_data()  # idempotent; the fit loop calls it again right after the sanity check
            return trainer.train_dataloader
        dm = trainer.datamodule
        owner = dm if dm is not None and is_overridden("train_dataloader", dm, parent=pl.LightningDataModule) else (
            pl_module if is_overridden("train_dataloader", pl_module, parent=pl.LightningModule) else None)
        if owner is not None:
            try:
                return owner.train_dataloader()
            except Exception as err:  # e.g. a datamodule that sets up only the evaluation split for this stage
                rank_zero_warn(f"DetQCallback: calibrating on the evaluation batches: {type(owner).__name__}."
                               f"train_dataloader() failed ({type(err).__name__}: {err})")
        fn = getattr(trainer.state.fn, "value", trainer.state.fn)
        loaders = {"validate": trainer.val_dataloaders, "test": trainer.test_dataloaders,
                   "predict": trainer.predict_dataloaders}.get(fn)
        if isinstance(loaders, (list, tuple)):
            loaders = loaders[0] if loaders else None
        return loaders

    def _calibration_forward(self, pl_module):
        if self.calibration_forward is not None:
            return self.calibration_forward
        if callable(getattr(pl_module, "calibration_forward", None)):
            return lambda m, b: m.calibration_forward(b)
        if self.target and type(pl_module).forward is pl.LightningModule.forward:
            # the module defines no forward (training_step calls ``self.<target>`` directly): run the target
            return lambda m, b: _default_calibration_forward(self.quantized_model(m), b)
        return _default_calibration_forward

    # ================================================================== critical-category mAP
    def _critical_start(self, pl_module) -> None:
        self._critical = None
        if self.recipe.critical.classes and self._module is pl_module:
            self._critical = CriticalMAP(self.session.critical_class_ids(self.quantized_model(pl_module)))

    def _critical_update(self, pl_module, outputs, batch) -> None:
        if self._critical is None:
            return
        detections = detections_in(outputs)
        if detections is None:  # the step returned no detections: run the quantized model once more
            images = self._family_batch(pl_module, batch)[0]
            with torch.no_grad():
                detections = detections_in(self.quantized_model(pl_module)(images))
        targets = self._family_batch(pl_module, batch)[1]
        if detections is None or targets is None:
            rank_zero_warn("DetQCallback: no critical-category mAP: neither validation_step nor the model returns "
                           "detections as a list of {'boxes', 'scores', 'labels'} dicts (with targets in the batch)")
            self._critical = None
            return
        self._critical.update(detections, [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])

    def _critical_log(self, pl_module, prefix: str) -> None:
        if self._critical is None:
            return
        for name, value in self._critical.compute().items():
            pl_module.log(f"{prefix}/{name}", value, on_step=False, on_epoch=True, sync_dist=False)
        self._critical = None

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._critical_start(pl_module)

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._critical_start(pl_module)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self._critical_update(pl_module, outputs, batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._critical_update(pl_module, outputs, batch)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._critical_log(pl_module, "val")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._critical_log(pl_module, "test")

    # ================================================================== curriculum and logging
    def _progress(self, trainer) -> float:
        if self.recipe.curriculum.unit == "epoch" and trainer.max_epochs not in (None, -1):
            return trainer.current_epoch / max(1, trainer.max_epochs)
        return trainer.global_step / max(1, trainer.estimated_stepping_batches)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.session.ptq:
            raise RuntimeError(
                f"DetQCallback: recipe {self.recipe.name!r} is post-training quantization but the Trainer keeps "
                "training (min_epochs/min_steps?); run trainer.validate/test, or fit without min_epochs/min_steps"
            )
        msg = self.session.before_step(self.quantized_model(pl_module), self._progress(trainer))
        if msg:
            rank_zero_info(f"DetQCallback: {msg} (step {trainer.global_step})")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        model = self.quantized_model(pl_module)
        self.session.after_optimizer_step(model, averaged=averaging.averaged_models(trainer))
        if self.session.schedule is not None:
            pl_module.log("detq/curriculum_stage", float(self.session.schedule.current + 1), on_step=True, on_epoch=False)
        every = self.log_every_n_steps if self.log_every_n_steps is not None else trainer.log_every_n_steps
        if not every or (trainer.global_step % every and batch_idx % every):
            return
        for k, v in quantization_figures(model).items():
            pl_module.log(f"detq/{k}", v, on_step=True, on_epoch=False, prog_bar=False)

    def on_train_end(self, trainer, pl_module) -> None:
        self.session.end_training(self.quantized_model(pl_module))

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        for name in self._installed:
            pl_module.__dict__.pop(name, None)
        self._installed = []
        self.session.end_training()
        self._step, self._fresh, self._trainer = None, False, None

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "exception")

    # ================================================================== loss terms (inside the DDP forward)
    def _family_batch(self, pl_module, batch):
        fn = self.distillation_inputs
        if fn is None and callable(getattr(pl_module, "distillation_inputs", None)):
            return pl_module.distillation_inputs(batch)
        return (fn or _default_distillation_inputs)(pl_module, batch)

    def _loss_terms(self, pl_module, batch, out, task_loss=None) -> Optional[torch.Tensor]:
        if not self.session.terms or self._module is not pl_module:
            return None
        terms = self.session.loss_terms(self.quantized_model(pl_module), self._family_batch(pl_module, batch), out,
                                        task_loss=task_loss)
        for k, v in self.session.last_terms.items():
            _log(pl_module, f"detq/{k}", float(v))
        return torch.stack([t.float() for t in terms.values()]).sum() if terms else None

    def _add_loss_terms(self, pl_module, batch, out):
        if not self.session.terms or out is None:
            return out  # None: the user skips this step
        if not (isinstance(out, torch.Tensor) or (isinstance(out, dict) and isinstance(out.get("loss"), torch.Tensor))):
            raise TypeError(
                "DetQCallback: training_step must return a loss tensor or a dict with a 'loss' tensor to receive "
                f"the auxiliary loss terms; it returned {type(out).__name__}"
            )
        total = self._loss_terms(pl_module, batch, out, task_loss=out if isinstance(out, torch.Tensor) else out["loss"])
        if total is None:
            return out
        if isinstance(out, torch.Tensor):
            return out + total.to(out.dtype)
        return {**out, "loss": out["loss"] + total.to(out["loss"].dtype)}

    # ================================================================== wrappers on the module
    def _install_wrappers(self, pl_module: "pl.LightningModule", wrap_configure_model: bool) -> None:
        if self._installed:
            return
        callback, cls = self, type(pl_module)

        def configure_model(module_self):
            cls.configure_model(module_self)
            if callback._trainer is not None:
                callback._convert(callback._trainer, module_self)

        def training_step(module_self, *args, **kwargs):
            batch = args[0] if args else kwargs.get("batch")
            callback._step, callback._step_terms_done = (module_self, batch), False
            try:
                out = cls.training_step(module_self, *args, **kwargs)
                if module_self.automatic_optimization:
                    out = callback._add_loss_terms(module_self, batch, out)
            finally:
                callback._step = None
            return out

        def manual_backward(module_self, loss, *args, **kwargs):
            # Manual optimization: the terms join the first backward of the step (after the forward ran).
            if callback.session.terms and not callback._step_terms_done and callback._step is not None:
                callback._step_terms_done = True
                total = callback._loss_terms(module_self, callback._step[1], None, task_loss=loss)
                if total is not None:
                    loss = loss + total.to(loss.dtype)
            return cls.manual_backward(module_self, loss, *args, **kwargs)

        def on_load_checkpoint(module_self, checkpoint):
            cls.on_load_checkpoint(module_self, checkpoint)
            callback._on_load_checkpoint(module_self, checkpoint)

        wrappers = [("configure_model", configure_model)] if wrap_configure_model else []
        for name, fn in wrappers + [("training_step", training_step), ("on_load_checkpoint", on_load_checkpoint),
                                    ("manual_backward", manual_backward)]:
            # A bound method: deepcopy (EMA/SWA copies of the module) rebinds it to the copy.
            object.__setattr__(pl_module, name, types.MethodType(fn, pl_module))
            self._installed.append(name)


def _import_object(path: str, what: str):
    import importlib

    mod, _, name = path.rpartition(".")
    if not mod:
        raise ValueError(f"DetQCallback: `{what}` = {path!r} must be an import path such as 'package.module.function'")
    try:
        return getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"DetQCallback: `{what}` = {path!r} cannot be imported: {e}") from None


__all__ = ["DetQCallback"]
