"""Ultralytics adapter: quantized training (QAT) or calibration only (PTQ) through ``model.train(...)``.

    from ultralytics import YOLO
    from detq_hooks.ultralytics import DetQTrainer

    YOLO("yolo11n.pt").train(data="data.yaml", trainer=DetQTrainer, detq="w4a8", epochs=50)

Ultralytics events → session calls (every point goes through the trainer's own model set-up path, so the
optimizer, EMA, freezing, AMP and DDP see the quantized model):

* ``__init__``: ``detq=`` (and ``detq_teacher=``, ``detq_calibration_batches=``) validated into a recipe kept in
  ``args.detq`` as plain data (DDP workers, ``train_args``, resume); ``quantize=8`` with ``detq`` is refused.
* ``get_model`` → ``session.convert`` (float weights; the teacher is copied first) or ``session.restore`` (a
  detq ``.pt``: rebuilt from the module's own per-layer plan, verified, loaded strictly).
* ``build_optimizer`` → ``session.attach_optimizer``.
* ``_build_train_pipeline`` → ``session.calibrate`` / ``session.run_ptq`` on the first training batches, before
  EMA exists, unless the weights carry ranges.
* ``_setup_train`` → ``session.load_state`` (resume: curriculum stage, teacher) and ``session.start_training``;
  the model's criterion is wrapped (:class:`~detq_hooks.ultralytics.criterion.DetQCriterion`) so the session's
  loss terms join the loss inside the DDP forward.
* ``on_train_batch_start`` → ``session.before_step``; ``optimizer_step`` → ``session.after_optimizer_step``,
  EMA update, integer quantizer flags copied into the EMA.
* ``save_model`` → ``session.state`` (``ckpt["detq"]``, fp32 quantizer state; the teacher in ``last.pt`` only);
  ``resume_training`` → fp32 quantizer state into model and EMA.
* PTQ recipes (``mode: ptq``): quantize, calibrate, validate, save ``best.pt``/``last.pt``, no epochs.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ultralytics.models.rtdetr.train import RTDETRTrainer
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.models.yolo.obb import OBBTrainer
from ultralytics.models.yolo.pose import PoseTrainer
from ultralytics.models.yolo.segment import SegmentationTrainer
from ultralytics.utils import LOGGER, RANK
from ultralytics.utils.torch_utils import unwrap_model

from ..optim import QUANTIZER_GROUP_NAME
from ..checkpoint import (CHECKPOINT_KEY, CheckpointMismatchError, load_quantizer_state, module_state,
                          normalize_legacy_recipe, read_state)
from ..quantizers import iter_quantizers
from ..recipe import Recipe, RecipeError, load_recipe
from ..session import QuantSession, sync_integer_buffers
from ..surgery import is_quantized
from ..detectors.ultralytics import UltralyticsFamily, is_rtdetr_head
from .compat import DetQModelInfo
from .criterion import DetQCriterion
from .metrics import with_critical_metrics

DETQ_KEY = CHECKPOINT_KEY
TEACHER_KEY = "detq_teacher"
CALIBRATION_KEY = "detq_calibration_batches"
_FAMILY = UltralyticsFamily()


class DetQConfigError(RecipeError):
    """``detq`` conflicts with other Ultralytics arguments or is missing."""


def prediction_layers(model: nn.Module) -> list[str]:
    """Names of the final class/box layers of an Ultralytics detection head (the family's answer)."""
    return _FAMILY.prediction_layers(model)


def excluded_layers(model: nn.Module) -> list[str]:
    """Layers that stay float: DFL's fixed integral conv (the family's answer)."""
    return _FAMILY.float_layers(model)


def resolve_recipe(value: Any) -> Recipe:
    """``detq=`` value (preset, YAML path, dict, Recipe, or a recipe dict kept in args) -> Recipe."""
    if isinstance(value, str) and value.strip().startswith("{"):
        import yaml

        value = yaml.safe_load(value)
    if isinstance(value, dict) and "quantization" in value:  # a recipe kept in args (0.1.0 added DFL as a rule)
        value = normalize_legacy_recipe(value)
    return load_recipe(value)


def quantize_ultralytics(model: nn.Module, recipe: Recipe) -> nn.Module:
    """Convert an Ultralytics detection model in place (head prediction layers at 8 bits, DFL float)."""
    QuantSession(recipe).convert(model, training=False)
    _tag(model, recipe)
    return model


def _tag(model: nn.Module, recipe: Recipe) -> None:
    model.detq_info = DetQModelInfo(
        recipe_name=recipe.name, prediction_layers=prediction_layers(model), excluded_layers=excluded_layers(model),
        head_type=type(model.model[-1]).__name__,
    )


def _float_state_dict(path: str):
    """A float Ultralytics checkpoint → state dict (the distillation teacher)."""
    from ultralytics.nn.tasks import load_checkpoint

    weights, _ = load_checkpoint(path)
    if is_quantized(weights):
        raise CheckpointMismatchError(f"the distillation teacher {path} is a quantized checkpoint; give a float model")
    return weights.float().state_dict()


def calibration_forward(model: nn.Module, img: torch.Tensor):
    """One calibration forward. RT-DETR's decoder runs only its last layer's heads in eval mode; its other
    per-layer heads (trained through auxiliary losses) are reached in training mode, so the decoder runs in
    training mode (BatchNorm kept in eval mode, no denoising queries without labels)."""
    if not is_rtdetr_head(model):
        return model(img)
    head = model.model[-1]
    was = head.training
    head.train()
    for m in head.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    try:
        return model(img)
    finally:
        head.train(was)


def _is_rtdetr(spec: Any) -> bool:
    """Whether the model named in the overrides is an RT-DETR (its trainer differs)."""
    if isinstance(spec, nn.Module):
        return type(spec).__name__ == "RTDETRDetectionModel"
    if not isinstance(spec, (str, Path)) or not str(spec):
        return False
    s = str(spec)
    if s.endswith((".yaml", ".yml")):
        try:
            from ultralytics.nn.tasks import yaml_model_load

            return "RTDETRDecoder" in str(yaml_model_load(s).get("head", ""))
        except Exception:
            return "rtdetr" in Path(s).name.lower()
    return "rtdetr" in Path(s).name.lower()


def _spec_model(spec: Any) -> Any:
    """The model an existing ``.pt`` holds (loaded once for :func:`_is_rtdetr` and :func:`_task_of`); any other
    spec, or a ``.pt`` that does not load, as given."""
    if isinstance(spec, (str, Path)) and str(spec).endswith(".pt") and Path(spec).exists():
        try:
            ckpt = torch.load(spec, map_location="cpu", weights_only=False)
            return ckpt.get("ema") or ckpt.get("model")
        except Exception:
            return spec
    return spec


class _DetQMixin:
    """Ultralytics trainer events → :class:`~detq_hooks.session.QuantSession` calls (see module docstring)."""

    detq_recipe: Recipe
    detq_session: QuantSession

    # ------------------------------------------------------------------ arguments
    def _detq_init(self, cfg, overrides, _callbacks, base_init) -> None:
        overrides = dict(overrides or {})
        user_value = overrides.pop(DETQ_KEY, None)
        teacher_path = overrides.pop(TEACHER_KEY, None)
        calibration_batches = overrides.pop(CALIBRATION_KEY, None)
        if user_value is None and isinstance(cfg, dict) and DETQ_KEY in cfg:
            cfg = {k: v for k, v in cfg.items() if k != DETQ_KEY}
        q = overrides.get("quantize")
        if user_value is not None and q not in (None, False, 0, "", "none", "None"):
            raise DetQConfigError(
                f"`quantize={q}` (Ultralytics' ModelOpt INT8 QAT) and `detq={user_value!r}` both ask to quantize the "
                "model; use one of them (detq covers INT8 with the `w8a8` preset)"
            )
        user_recipe = resolve_recipe(user_value) if user_value is not None else None  # bad recipe: fails now
        if teacher_path is not None or calibration_batches is not None:
            if user_recipe is None:
                raise DetQConfigError(f"`{TEACHER_KEY}=`/`{CALIBRATION_KEY}=` need a recipe: pass `detq=` as well")
            data = user_recipe.to_dict()
            if teacher_path is not None:
                if not user_recipe.distillation.enabled:
                    raise DetQConfigError(f"`{TEACHER_KEY}=` needs a recipe with `distillation.enabled: true` (e.g. detq='w4a4-crqat')")
                data["distillation"]["teacher"] = str(teacher_path)
            if calibration_batches is not None:
                data["calibration"]["num_batches"] = calibration_batches  # validated by the recipe
            user_recipe = load_recipe(data)
        base_init(self, cfg, overrides, _callbacks)
        saved = getattr(self.args, DETQ_KEY, None) if self.resume else None
        if self.resume and saved is None:
            raise CheckpointMismatchError(
                f"{self.args.resume}: this checkpoint was not written by DetQTrainer (no `detq` in its train_args); "
                "to start QAT from float weights, train from it without `resume`"
            )
        if user_recipe is not None and saved is not None:
            a, b = user_recipe.fingerprint(), resolve_recipe(saved).fingerprint()
            if a != b:
                diff = sorted(k for k in a if a[k] != b.get(k))
                raise CheckpointMismatchError(
                    f"resume: {self.args.resume} was trained with detq recipe {resolve_recipe(saved).name!r}, "
                    f"this run asks for {user_recipe.name!r} (differs in {diff}); resume without `detq` or with the same recipe"
                )
        recipe = user_recipe or (resolve_recipe(saved) if saved is not None else None)
        if recipe is None:
            raise DetQConfigError(
                "DetQTrainer needs a recipe: pass `detq=` a preset name (e.g. 'w4a8'), a recipe YAML path or a dict"
            )
        if getattr(self.args, "quantize", None) not in (None, False, 0):
            raise DetQConfigError(f"`quantize={self.args.quantize}` cannot be combined with detq; remove `quantize`")
        self.detq_recipe = recipe
        self.detq_session = QuantSession(recipe, family=_FAMILY, read_weights=_float_state_dict)
        setattr(self.args, DETQ_KEY, recipe.to_dict())  # plain data: DDP workers, checkpoints, resume
        self._detq_entry: Optional[dict] = None
        self._detq_iter = 0
        # The curriculum and terms with a schedule (the Fisher regulariser's warm-up) follow the progress of the
        # budget; registered once (DDP workers receive the launcher's callbacks, ours included).
        if recipe.curriculum.enabled or recipe.fisher_regularizer.enabled:
            for event, fn in (("on_train_epoch_start", _reset_iteration), ("on_train_batch_start", _before_step)):
                if not any(getattr(f, "__name__", "") == fn.__name__ for f in self.callbacks.get(event, [])):
                    self.add_callback(event, fn)
        if recipe.mode == "ptq" and RANK in {-1, 0}:
            LOGGER.info(f"detq: PTQ recipe {recipe.name!r}: quantize, calibrate, validate and save; no training epochs")

    @property
    def detq_schedule(self):
        """The curriculum schedule (``None`` without a curriculum)."""
        return self.detq_session.schedule

    @property
    def detq_teacher(self):
        """The frozen float teacher (``None`` without distillation)."""
        return self.detq_session.teacher

    # ------------------------------------------------------------------ model
    def get_model(self, cfg=None, weights=None, verbose=True):
        quantized_weights = isinstance(weights, nn.Module) and is_quantized(weights)
        model = super().get_model(cfg=cfg, weights=None if quantized_weights else weights, verbose=verbose)
        if is_quantized(model):  # a subclass already converted it
            return model
        session, training = self.detq_session, self.detq_recipe.mode != "ptq"
        names = (getattr(self, "data", None) or {}).get("names")
        if names:  # the data set's names: the recipe's critical classes resolve against them
            session.class_names = list(names.values()) if isinstance(names, dict) else list(names)
        if quantized_weights:  # a detq .pt: rebuilt from its own per-layer plan, then loaded strictly
            source = str(getattr(weights, "pt_path", "checkpoint"))
            entry = module_state(weights)
            session.restore(model, entry, source=source, training=training)
            state = weights.float().state_dict()
            session.verify(model, state, entry, source=source)
            model.load_state_dict(state, strict=True)
        else:
            session.convert(model, training=training)
        _tag(model, self.detq_recipe)
        if RANK in {-1, 0}:
            LOGGER.info(
                f"detq: model converted with recipe {self.detq_recipe.name!r} ({sum(1 for _ in iter_quantizers(model))} "
                f"quantizers); prediction layers at {self.detq_recipe.quantization.prediction_layer_bits} bits: "
                f"{model.detq_info.prediction_layers}"
            )
        return model

    def setup_model(self):
        if isinstance(self.model, nn.Module):
            if not is_quantized(self.model):  # e.g. a float model handed over by the DDP launcher
                self.model = self.get_model(cfg=self.model.yaml, weights=self.model, verbose=False)
            return None
        ckpt = super().setup_model()
        entry = (ckpt or {}).get(DETQ_KEY) if isinstance(ckpt, dict) else None
        if entry:
            self._detq_entry = read_state(entry, source=str(self.args.model))
            # fp32 ranges (the module is stored in fp16); the curriculum and teacher follow in _setup_train
            self.detq_session.load_state(self.model, self._detq_entry, source=str(self.args.model), resume=False)
        return ckpt

    # ------------------------------------------------------------------ training
    def preprocess_batch(self, batch):
        batch = super().preprocess_batch(batch)
        criterion = getattr(unwrap_model(self.model), "criterion", None) if getattr(self, "model", None) is not None else None
        if isinstance(criterion, DetQCriterion):  # RT-DETR hands its criterion the targets without the images
            criterion.images = batch["img"]
            # the teacher may start on this batch now, on the core Ultralytics leaves idle (it runs cores - 1 threads)
            criterion.session.batch_ready(batch)
        return batch

    def _setup_train(self):
        super()._setup_train()  # model, DDP, loaders + calibration, optimizer, EMA, resume
        model = unwrap_model(self.model)
        session = self.detq_session
        if self.resume and self._detq_entry is not None:
            session.load_state(model, self._detq_entry, source=str(self.args.resume), resume=True)
        self._detq_iter = 0
        message = session.start_training(model, device=self.device, progress=self._detq_progress(self.start_epoch, 0)
                                         if session.schedule is not None else None)
        self._detq_log_stage(message)
        if session.terms:
            base = getattr(model, "criterion", None) or model.init_criterion()
            model.criterion = DetQCriterion(base.base if isinstance(base, DetQCriterion) else base, model, session)

    def _detq_progress(self, epoch: int, i: int) -> float:
        if self.detq_recipe.curriculum.enabled and self.detq_recipe.curriculum.unit == "epoch":
            return epoch / max(self.epochs, 1)
        nb = max(len(self.train_loader), 1)
        return (epoch * nb + i) / max(self.epochs * nb, 1)

    def _detq_log_stage(self, message: Optional[str]) -> None:
        if message and self.ema:  # validation runs the EMA: same quantizers on/off as the student
            self.detq_session.after_optimizer_step(unwrap_model(self.model), averaged=[self.ema.ema])
        if message and RANK in {-1, 0}:
            LOGGER.info(f"detq: {message}")

    def optimizer_step(self):
        self.detq_session.before_optimizer_step(unwrap_model(self.model))
        ema, self.ema = self.ema, None
        try:
            super().optimizer_step()  # unscale, clip, step, zero_grad (EMA below, after the frozen stages are restored)
        finally:
            self.ema = ema
        model = unwrap_model(self.model)
        self.detq_session.after_optimizer_step(model)
        if self.ema:
            self.ema.update(self.model)  # blends float tensors only: the integer quantizer flags follow exactly
            sync_integer_buffers(self.ema.ema, model)

    def get_validator(self):
        # The validator re-checks the trainer's args against Ultralytics' keys: hide ours while it copies them.
        value = self.args.__dict__.pop(DETQ_KEY, None)
        try:
            validator = super().get_validator()
            if self.detq_recipe.critical.classes:  # critical-category mAP beside the overall figures
                validator.__class__ = with_critical_metrics(type(validator))
                validator.detq_critical_ids = self.detq_session.critical_class_ids(unwrap_model(self.model))
            return validator
        finally:
            if value is not None:
                setattr(self.args, DETQ_KEY, value)

    def final_eval(self):
        self.detq_session.end_training(unwrap_model(self.model))
        return super().final_eval()

    # ------------------------------------------------------------------ optimizer
    def build_optimizer(self, model, name="auto", lr=0.001, momentum=0.9, decay=1e-5, iterations=1e5):
        optimizer = super().build_optimizer(model, name=name, lr=lr, momentum=momentum, decay=decay, iterations=iterations)
        n = self.detq_session.attach_optimizer(optimizer, unwrap_model(model))
        group = optimizer.param_groups[-1]
        if group.get("name") == QUANTIZER_GROUP_NAME:
            group["param_group"] = QUANTIZER_GROUP_NAME
            if any("use_muon" in g for g in optimizer.param_groups[:-1]):
                group["use_muon"] = False
        if RANK in {-1, 0}:
            LOGGER.info(f"detq: {n} quantizer parameters in their own optimizer group (weight_decay=0, lr x {self.detq_recipe.quantization.quantizer_lr_scale})")
        return optimizer

    # ------------------------------------------------------------------ calibration
    def _build_train_pipeline(self):
        super()._build_train_pipeline()
        model = unwrap_model(self.model)
        if self.detq_session.needs_calibration(model):
            self.detq_calibrate(model)

    def detq_calibrate(self, model: nn.Module):
        device = next(model.parameters()).device

        def forward(m, batch):
            return calibration_forward(m, self.preprocess_batch(dict(batch))["img"].to(device))

        session = self.detq_session
        # family_batch: the preprocessed batch (images and labels) the Fisher methods' critical objective reads
        res = (session.run_ptq if session.ptq else session.calibrate)(
            model, self.train_loader, forward, progress=True, family_batch=lambda b: self.preprocess_batch(dict(b)))
        plan = res.mixed_precision
        if plan is not None and RANK in {-1, 0}:
            LOGGER.info(f"detq: Fisher mixed precision: {plan.summary()}")
        if RANK in {-1, 0}:
            LOGGER.info(f"detq: calibrated {len(res.ranges)} activation ranges on {res.num_batches} training batches ({res.method})")
        return res

    # ------------------------------------------------------------------ checkpoints
    def detq_entry(self) -> dict:
        ema = self.ema.ema if self.ema else unwrap_model(self.model)
        return self.detq_session.state(ema, quantizer_state=True)

    def save_model(self):
        entry = self.detq_entry()  # before Ultralytics rounds the EMA copy to fp16
        saved = super().save_model()
        if not self.last.exists():
            return saved
        ckpt = torch.load(self.last, map_location="cpu", weights_only=False)
        ckpt[DETQ_KEY] = {**entry, "teacher": None}  # best.pt and epoch files: no teacher
        buffer = io.BytesIO()
        torch.save(ckpt, buffer)
        data = buffer.getvalue()
        if entry.get("teacher") is not None:  # resume needs the teacher: last.pt only carries it
            ckpt[DETQ_KEY] = entry
            buffer = io.BytesIO()
            torch.save(ckpt, buffer)
            self.last.write_bytes(buffer.getvalue())
        else:
            self.last.write_bytes(data)
        if self.best_fitness == self.fitness:
            self.best.write_bytes(data)
        if (self.save_period > 0) and (self.epoch % self.save_period == 0):
            (self.wdir / f"epoch{self.epoch}.pt").write_bytes(data)
        return saved

    def resume_training(self, ckpt):
        super().resume_training(ckpt)
        if ckpt is None or not self.resume or not (self._detq_entry or {}).get("quantizer_state"):
            return
        state = self._detq_entry["quantizer_state"]
        for m in ([self.ema.ema] if self.ema else []) + [unwrap_model(self.model)]:
            load_quantizer_state(m, state)
        if RANK in {-1, 0}:
            LOGGER.info(f"detq: resumed {len(state)} quantizer tensors in full precision from {self.args.resume}")

    # ------------------------------------------------------------------ PTQ
    def _do_train(self):
        if not self.detq_session.ptq:
            return super()._do_train()
        import time

        if self.world_size > 1:
            self._setup_ddp()
        self._setup_train()  # builds, converts and calibrates (no optimizer steps follow)
        self.epoch, self.epochs = 0, 1
        self.train_time_start = time.time()
        self._detq_loss_names()
        self.lr, self.loss = {}, torch.zeros(())
        self.run_callbacks("on_train_start")
        if RANK in {-1, 0}:
            self.metrics, self.fitness = self.validate()
            self.best_fitness = self.fitness
            self.save_metrics(metrics={**self.metrics})
            self.save_model()
            self.run_callbacks("on_model_save")
        self.final_eval()
        if RANK in {-1, 0}:
            self.run_callbacks("on_train_end")
        self._clear_memory()

    def _detq_loss_names(self) -> None:
        """The loss names the validator reports (training derives them from its first batch); no BN update."""
        model = unwrap_model(self.model)
        batch = self.preprocess_batch(next(iter(self.train_loader)))
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        was = model.training
        try:
            with torch.no_grad():
                model.train()
                for m in bns:
                    m.eval()
                _, items = model.loss(batch)
        finally:
            model.train(was)
        self.loss_items = {k: torch.zeros_like(v) for k, v in items.items()}
        self.loss_names = tuple(items)
        self.tloss = {k: 0.0 for k in items}


def _reset_iteration(trainer) -> None:
    trainer._detq_iter = 0


def _before_step(trainer) -> None:
    trainer._detq_log_stage(trainer.detq_session.before_step(unwrap_model(trainer.model),
                                                             trainer._detq_progress(trainer.epoch, trainer._detq_iter)))
    trainer._detq_iter += 1


class DetQTrainer(_DetQMixin, DetectionTrainer):
    """Ultralytics detection trainer that quantizes the model with a detq-hooks recipe.

    ``YOLO(...).train(trainer=DetQTrainer, detq=...)`` works for YOLOv8/YOLO11/YOLO26 and RT-DETR models and
    for the detection tasks built on the Detect head: an RT-DETR model gets :class:`DetQRTDETRTrainer` (on
    Ultralytics' ``RTDETRTrainer``), a ``segment``/``pose``/``obb`` model the matching trainer below (on
    Ultralytics' own trainer of that task: its data pipeline, loss and validator).

    Args (through ``train(...)``):
        detq: preset name (``w8a8``, ``w4a8``, ``w4a4``, ``w8a8-ptq``, ...), recipe YAML path or dict.
    """

    def __new__(cls, cfg=None, overrides=None, _callbacks=None):
        if cls is DetQTrainer:
            ov = overrides or {}
            spec = ov.get("resume") if isinstance(ov.get("resume"), (str, Path)) else ov.get("model")
            spec = _spec_model(spec)
            cls = DetQRTDETRTrainer if _is_rtdetr(spec) else _task_trainer(ov.get("task") or _task_of(spec))
        return super().__new__(cls)

    _detq_base: type = DetectionTrainer  # the Ultralytics trainer this class extends (its __init__ runs ours)

    def __init__(self, cfg=None, overrides=None, _callbacks=None):
        from ultralytics.utils import DEFAULT_CFG

        self._detq_init(cfg if cfg is not None else DEFAULT_CFG, overrides, _callbacks, self._detq_base.__init__)


class DetQRTDETRTrainer(DetQTrainer, RTDETRTrainer):
    """:class:`DetQTrainer` for RT-DETR (Ultralytics' ``RTDETRTrainer`` data pipeline and validator)."""

    _detq_base = RTDETRTrainer


class DetQSegmentationTrainer(DetQTrainer, SegmentationTrainer):
    """:class:`DetQTrainer` for instance segmentation (``task="segment"``, e.g. ``yolo11n-seg.pt``)."""

    _detq_base = SegmentationTrainer


class DetQPoseTrainer(DetQTrainer, PoseTrainer):
    """:class:`DetQTrainer` for keypoint detection (``task="pose"``, e.g. ``yolo11n-pose.pt``)."""

    _detq_base = PoseTrainer


class DetQOBBTrainer(DetQTrainer, OBBTrainer):
    """:class:`DetQTrainer` for oriented boxes (``task="obb"``, e.g. ``yolo11n-obb.pt``)."""

    _detq_base = OBBTrainer


_TASK_TRAINERS = {"detect": DetQTrainer, "segment": DetQSegmentationTrainer, "pose": DetQPoseTrainer,
                  "obb": DetQOBBTrainer}


def _task_of(spec: Any) -> Optional[str]:
    """The task of the model named by ``model=`` / ``resume=`` (Ultralytics' own guess from its yaml or module);
    ``Model.train`` passes ``task`` itself, so this serves trainers built directly."""
    from ultralytics.nn.tasks import guess_model_task

    if not isinstance(spec, nn.Module) and not (isinstance(spec, (str, Path)) and str(spec).endswith((".yaml", ".yml"))):
        return None
    try:
        return guess_model_task(spec)
    except Exception:  # an unreadable spec fails later in Ultralytics' own loading, with its message
        return None


def _task_trainer(task: Optional[str]) -> type:
    if task in (None, ""):
        return DetQTrainer
    if task not in _TASK_TRAINERS:
        raise DetQConfigError(f"DetQTrainer quantizes detection models (tasks {sorted(_TASK_TRAINERS)}); this model's "
                              f"task is {task!r}. Quantize it with the core API (detq_hooks.quantize) instead")
    return _TASK_TRAINERS[task]


__all__ = [
    "DetQTrainer",
    "DetQRTDETRTrainer",
    "DetQSegmentationTrainer",
    "DetQPoseTrainer",
    "DetQOBBTrainer",
    "DetQConfigError",
    "prediction_layers",
    "excluded_layers",
    "quantize_ultralytics",
    "resolve_recipe",
]
