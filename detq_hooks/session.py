"""The quantization session: a method's whole life cycle, written once for every trainer.

    convert (all or nothing) → calibrate or PTQ → teacher → curriculum schedule → extra loss terms
    → quantizer/EMA sync → saved state → verify on load

Each trainer adapter translates its trainer's events into these calls and answers the small
:class:`TrainerInterface` (where calibration batches come from, the training progress, how float weights are
read). The adapters hold no head decoding, matching, loss maths or checkpoint format: those are the
detector families' (:mod:`detq_hooks.detectors`) and the core's.

Example (a hand-written loop)::

    session = QuantSession("w4a8-crqat")
    session.convert(model)                                  # teacher copied, layers swapped, stages found
    session.attach_optimizer(optimizer, model)
    session.calibrate(model, batches, forward_fn=lambda m, b: m(b[0]))
    session.start_training(model)
    for step, batch in enumerate(loader):
        session.before_step(model, step / total_steps)
        loss = task_loss(model, batch)
        loss = loss + sum(session.loss_terms(model, batch).values())
        loss.backward(); optimizer.step(); optimizer.zero_grad()
        session.after_optimizer_step(model)
    torch.save({"model": model.state_dict(), "detq": session.state(model)}, "ckpt.pt")
"""

from __future__ import annotations

import copy
import itertools
from typing import Any, Callable, Iterable, Mapping, Optional, Protocol, Sequence, Union, runtime_checkable

import torch
from torch import nn
from torch.utils._pytree import tree_map

from . import distributed as dist_utils
from .calibration import CalibrationResult, calibrate
from .checkpoint import (
    CheckpointMismatchError,
    apply_plan,
    check_compatible,
    is_quantizer_key,
    load_quantizer_state,
    quantization_state,
    read_state,
    rebuild,
)
from .curriculum import CurriculumSchedule, Stage, assign_parameters, stages_from_recipe
from .detectors import DetectorFamily, UnsupportedDetectorError, family_for
from .distill import DistillationLoss, Teacher
from .loss_terms import DisabledQuantizerAnchor, DistillationTerm, LossTerm, StepContext
from .optim import add_quantizer_param_group
from .quantizers import iter_quantizers, keep_step_sizes_positive, step_size_floors
from .recipe import Recipe, RecipeError, load_recipe
from .post_training import reconstruct_from_recipe
from .recording import Recorder, Taps
from .sharing import share_inputs
from .surgery import dequantize, is_quantized, quantize, quantized_layers, recipe_of


@runtime_checkable
class TrainerInterface(Protocol):
    """What a trainer adapter answers for the session (each a few lines in the adapter).

    * ``calibration_batches()``: an iterable of batches already on the model's device, drawn so that the
      training random stream is not disturbed (the session also forks the RNG around calibration).
    * ``calibration_forward(model, batch)``: run one batch through the model the trainer's way.
    * ``progress()``: the fraction of the QAT budget done (iterations or epochs, as the recipe says).
    * ``read_weights(path)``: a float checkpoint of this trainer → a state dict (distillation teacher).
    """

    def calibration_batches(self) -> Iterable[Any]: ...

    def calibration_forward(self, model: nn.Module, batch: Any) -> Any: ...

    def progress(self) -> float: ...

    def read_weights(self, path: str) -> Mapping[str, torch.Tensor]: ...


def read_state_dict(path: str) -> Mapping[str, torch.Tensor]:
    """A state dict from a checkpoint file of any trainer (``state_dict``/``model``/``ema`` entries, or a module)."""
    ckpt = torch.load(str(path), map_location="cpu", weights_only=False)
    for key in ("state_dict", "ema", "model"):
        if isinstance(ckpt, dict) and ckpt.get(key) is not None:
            ckpt = ckpt[key]
            break
    if isinstance(ckpt, nn.Module):
        ckpt = ckpt.float().state_dict()
    if not isinstance(ckpt, Mapping):
        raise CheckpointMismatchError(f"{path} holds no state dict ({type(ckpt).__name__})")
    return ckpt


def fit_state_dict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """``state_dict`` keyed like ``module``'s: a prefix that a trainer added (``module.``, a LightningModule's
    attribute path) is stripped when that makes every key of the module present."""
    own = set(module.state_dict())
    if own <= set(state_dict):
        return {k: state_dict[k] for k in own}
    prefixes = {k.split(".", 1)[0] + "." for k in state_dict if "." in k} | {"module."}
    for prefix in sorted(prefixes):
        stripped = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if own <= set(stripped):
            return {k: stripped[k] for k in own}
    missing = sorted(own - set(state_dict))
    raise CheckpointMismatchError(f"the weights from {source} do not fit the model: {len(missing)} keys missing, e.g. {missing[:3]}")


@torch.no_grad()
def sync_integer_buffers(dst: nn.Module, src: nn.Module) -> None:
    """Copy the integer quantizer buffers (bits, enabled, initialised flags) of ``src`` into its averaged copy
    ``dst`` exactly (weight averaging blends buffers with float arithmetic, which would truncate them)."""
    src_q = dict(iter_quantizers(src))
    for name, q in iter_quantizers(dst):
        other = src_q.get(name)
        if other is None:
            continue
        for attr in ("bits_state", "enabled_state", "initialized_state"):
            getattr(q, attr).copy_(getattr(other, attr).to(getattr(q, attr).device))
        q._bits, q._enabled, q._initialized = other._bits, other._enabled, other._initialized


@torch.no_grad()
def quantization_figures(model: nn.Module) -> dict[str, float]:
    """Scalars worth logging: number of quantized layers, mean activation/weight scale, enabled quantizers."""
    acts = [q for _, q in iter_quantizers(model) if q.role == "activation"]
    weights = [q for _, q in iter_quantizers(model) if q.role == "weight"]
    figs = {"quantized_layers": float(len(quantized_layers(model)))}
    if acts:
        figs["act_scale_mean"] = float(torch.stack([q.scale.detach().float().mean() for q in acts]).mean())
    if weights:
        figs["weight_scale_mean"] = float(torch.stack([q.scale.detach().float().mean() for q in weights]).mean())
    figs["enabled_quantizers"] = float(sum(q.enabled for q in acts + weights))
    return figs


class QuantSession:
    """One quantization life cycle for one model.

    Args:
        recipe: preset name, YAML path, dict or :class:`~detq_hooks.recipe.Recipe` (validated now).
        family: the detector family (default: found from the model at :meth:`convert`).
        prediction_layers / first_layers: override the family's answers.
        calibration_batches: overrides ``calibration.num_batches``.
        read_weights: ``fn(path) -> state dict`` for float checkpoints (the distillation teacher); the
            adapters pass their trainer's loader.
        critical_loss: ``fn(model, batch) -> scalar``, your own objective for the Fisher methods (mixed
            precision and the regulariser) instead of the detector family's critical objective
            (:mod:`detq_hooks.critical`), e.g. for a model whose head no family reads.
    """

    def __init__(
        self,
        recipe: Any = "w8a8",
        *,
        family: Optional[DetectorFamily] = None,
        prediction_layers: Optional[Sequence[str]] = None,
        first_layers: Optional[Sequence[str]] = None,
        calibration_batches: Optional[int] = None,
        read_weights: Optional[Callable[[str], Mapping[str, torch.Tensor]]] = None,
        critical_loss: Optional[Callable[[nn.Module, Any], torch.Tensor]] = None,
    ) -> None:
        self.recipe: Recipe = load_recipe(recipe)
        if calibration_batches is not None and (
            isinstance(calibration_batches, bool) or not isinstance(calibration_batches, int) or calibration_batches < 1
        ):
            raise ValueError(f"`calibration_batches` = {calibration_batches!r} must be a positive integer")
        if family is not None and not (isinstance(family, DetectorFamily) or
                                       (isinstance(family, type) and issubclass(family, DetectorFamily))):
            raise TypeError(f"`family` = {family!r} must be a detq_hooks.detectors.DetectorFamily (instance or subclass)")
        self._family_arg = family
        self._step_size_floors = None  # taken at before_step, applied after the optimizer step
        self.family: Optional[DetectorFamily] = None
        self.prediction_layers = list(prediction_layers) if prediction_layers is not None else None
        self.first_layers = list(first_layers) if first_layers is not None else None
        self.calibration_batches = calibration_batches
        self.read_weights = read_weights or read_state_dict
        if critical_loss is not None and not callable(critical_loss):
            raise TypeError(f"`critical_loss` = {critical_loss!r} must be a callable (model, batch) -> scalar")
        self.critical_loss = critical_loss
        self.stages: list[Stage] = []
        self.schedule: Optional[CurriculumSchedule] = None
        self.teacher: Optional[Teacher] = None
        self.teacher_source: Optional[str] = None  # a path the teacher's weights came from (None: kept in state)
        self.teacher_ready = False  # the teacher holds float weights (not only the structure of a rebuilt model)
        self.terms: list[LossTerm] = []
        self.last_terms: dict[str, float] = {}
        self.last_calibration: Optional[CalibrationResult] = None
        self.last_mixed_precision = None  # a detq_hooks.fisher.MixedPrecisionPlan after mixed_precision()
        # Class names of the data (adapters set them from the trainer: Ultralytics `names`, MMDetection
        # `metainfo.classes`); the recipe's critical class names resolve against them, else the family's answer.
        self.class_names: Optional[list[str]] = None
        self.objective = None  # a detq_hooks.critical.CriticalObjective when a Fisher method is on
        self.float_copy: Optional[nn.Module] = None  # PTQ block reconstruction's reference, from convert to run_ptq
        self._recorder: Optional[Recorder] = None
        self._model_id: Optional[int] = None

    # ================================================================== properties
    @property
    def ptq(self) -> bool:
        """Whether the recipe is post-training quantization (calibrate, evaluate, save; no optimizer step)."""
        return self.recipe.mode == "ptq"

    @property
    def stage(self) -> Optional[int]:
        return self.schedule.current if self.schedule is not None and self.schedule.current >= 0 else None

    def owns(self, model: nn.Module) -> bool:
        return self._model_id == id(model)

    # ================================================================== 1. convert
    def convert(self, model: nn.Module, *, training: bool = True) -> nn.Module:
        """Quantize the float ``model`` in place with the recipe (all or nothing) and prepare CR-QAT.

        Everything that can fail is checked before the model is touched: stages that do not cover the model,
        a distillation recipe on a detector whose head the family cannot read, unmatched recipe rules.
        ``training=False`` (evaluation/PTQ runs) skips the teacher and the curriculum.
        """
        if is_quantized(model):
            return self.adopt(model)
        family = family_for(model, self._family_arg)
        stages = self._plan_crqat(model, family) if training else []
        objective = self._plan_fisher(model, family, training)
        teacher = self._new_teacher(model) if training else None
        float_copy = copy.deepcopy(model) if self.ptq and self.recipe.ptq.reconstructs else None
        preds = self.prediction_layers if self.prediction_layers is not None else family.prediction_layers(model)
        firsts = self.first_layers if self.first_layers is not None else family.first_layers(model)
        run = family.example_forward(model) if self.recipe.quantization.shared_activations else None
        if self.recipe.quantization.shared_activations and run is None and dist_utils.world_size() > 1:
            raise RecipeError(f"`quantization.shared_activations` under DDP: the {family.name!r} detector family cannot "
                              "run a blank image through this model, so the shared quantizers would only be found at "
                              "calibration, after DDP registered the per-layer ones; calibrate and save on one "
                              "process first, or give the family an `example_forward`")
        quantize(model, self.recipe, prediction_layers=preds, first_layers=firsts, float_layers=family.float_layers(model))
        if run is not None:
            self._share_inputs(model, family, run)
        self.family, self.stages, self.teacher, self.objective = family, stages, teacher, objective
        self.float_copy = float_copy
        self.teacher_ready = teacher is not None
        self._build_crqat(training)
        self._model_id = id(model)
        return model

    @staticmethod
    def _share_inputs(model: nn.Module, family: DetectorFamily, run) -> None:
        """Tie the input quantizers of layers that read one tensor, now: before DDP and the optimizer register
        parameters. A model the blank image does not run through is traced on its first calibration batch
        instead (one process only: the model is left float and the error raised under DDP)."""
        try:
            share_inputs(model, run)
        except Exception as err:
            if dist_utils.world_size() > 1:
                dequantize(model)
                raise RecipeError(f"`quantization.shared_activations`: a blank image does not run through this "
                                  f"{family.name!r} model ({type(err).__name__}: {err}), so its shared quantizers "
                                  "cannot be found before DDP; calibrate and save on one process first") from err

    def adopt(self, model: nn.Module) -> nn.Module:
        """Take over a model that is already quantized (a loaded checkpoint, a second Trainer on the same
        module): its recipe must be this session's; its per-layer plan is kept as it is."""
        theirs = recipe_of(model)
        if theirs is None or theirs.fingerprint() != self.recipe.fingerprint():
            raise CheckpointMismatchError(
                f"the model is already quantized with recipe {theirs.name if theirs else 'unknown'!r}, this session "
                f"uses {self.recipe.name!r}; is it quantized twice, or loaded from another recipe's checkpoint?"
            )
        self.family = family_for(model, self._family_arg)
        if self.objective is None:
            self.objective = self._plan_fisher(model, self.family, True)
        self._model_id = id(model)
        return model

    def restore(self, model: nn.Module, entry: Mapping[str, Any], *, source: str = "checkpoint",
                training: bool = False) -> nn.Module:
        """Rebuild the float ``model`` from a saved ``detq`` entry: the saved per-layer plan is the authority
        (bits changed after conversion survive). The saved recipe must be this session's (else
        :class:`CheckpointMismatchError`); on any error the model stays float."""
        entry = read_state(entry, source=source)
        theirs = load_recipe(entry["recipe"])
        if theirs.fingerprint() != self.recipe.fingerprint():
            a, b = self.recipe.fingerprint(), theirs.fingerprint()
            raise CheckpointMismatchError(
                f"{source} was quantized with detq recipe {theirs.name!r}, this run asks for {self.recipe.name!r} "
                f"(differs in {sorted(k for k in a if a[k] != b.get(k))}); use the checkpoint's recipe"
            )
        family = family_for(model, self._family_arg)
        stages = self._plan_crqat(model, family) if training else []
        objective = self._plan_fisher(model, family, training)
        teacher = self._new_teacher(model) if training else None
        rebuild(model, entry, source=source)
        self.family, self.stages, self.teacher, self.objective = family, stages, teacher, objective
        # a structural copy unless the recipe names the teacher: its float weights come from load_state/set_teacher_weights
        self.teacher_ready = teacher is not None and bool(self.recipe.distillation.teacher)
        self._build_crqat(training)
        self._model_id = id(model)
        return model

    def _new_teacher(self, model: nn.Module) -> Optional[Teacher]:
        """The distillation teacher: a frozen copy of the float ``model``, with ``distillation.teacher``'s
        weights when the recipe names a checkpoint (in :meth:`convert` and :meth:`restore` alike)."""
        if not self.recipe.distillation.enabled:
            return None
        teacher = Teacher.from_model(model, self.recipe.distillation.teacher_precision)
        path = self.recipe.distillation.teacher
        if path:
            state = self.read_weights(path)
            if any(is_quantizer_key(k) for k in state):
                raise CheckpointMismatchError(f"the distillation teacher must be a float model, {path} is quantized")
            teacher.load_state_dict(fit_state_dict(teacher.module, state, path))
            self.teacher_source = str(path)
        return teacher

    def _plan_crqat(self, model: nn.Module, family: DetectorFamily) -> list[Stage]:
        cur, dis = self.recipe.curriculum, self.recipe.distillation
        if not (cur.enabled or dis.enabled):
            return []
        stages = stages_from_recipe(cur) or family.stages(model)
        if cur.enabled and not stages:
            raise RecipeError(
                f"curriculum: the stages of {type(model).__name__} cannot be found automatically; name them in "
                "`curriculum.stages` (module-name prefixes/globs in data-flow order, e.g. "
                "[{name: backbone, modules: [backbone]}, {name: head, modules: [neck, head]}]) or give a detector "
                "family whose `stages` answers"
            )
        if stages:
            assign_parameters(model, stages)  # every parameter in exactly one stage, or a RecipeError now
        if dis.enabled and any(w > 0 for w in (dis.relational_weight, dis.logit_weight, dis.box_weight)):
            try:
                family.head_taps(model)
            except UnsupportedDetectorError as err:
                raise UnsupportedDetectorError(str(err)) from None
        return list(stages or [])

    def _plan_fisher(self, model: nn.Module, family: DetectorFamily, training: bool):
        """The critical objective of the Fisher methods the recipe turns on (``None`` if none is), checked before
        the model is touched: the critical class names exist, the family reads the head."""
        mp, reg = self.recipe.mixed_precision.enabled, self.recipe.fisher_regularizer.enabled and training
        if not (mp or reg):
            return None
        if self.critical_loss is not None:
            user = self.critical_loss
            return lambda m, b, which="critical": user(m, b)
        from .critical import CriticalObjective

        ids = self.critical_class_ids(model, family=family) if self.recipe.critical.classes else None
        objective = CriticalObjective(family, ids, merge=self.recipe.critical.merge, alpha=self.recipe.critical.alpha)
        try:
            objective.check(model)
        except UnsupportedDetectorError as err:
            what = "fisher_regularizer" if reg else "mixed_precision"
            raise UnsupportedDetectorError(
                f"`{what}` needs the critical-category objective, read from the detection head: {err}") from None
        return objective

    def _build_crqat(self, training: bool) -> None:
        self.terms = [t for t in self.terms if not isinstance(t, (DistillationTerm, DisabledQuantizerAnchor))]
        self.schedule = None
        if not training:
            return
        cur, dis = self.recipe.curriculum, self.recipe.distillation
        if cur.enabled:
            self.schedule = CurriculumSchedule(self.stages, cur.boundaries_for(len(self.stages)))
            self.terms.append(DisabledQuantizerAnchor())
        if dis.enabled and self.teacher is not None:
            loss = DistillationLoss(dis, num_stages=max(2, len(self.stages)))
            self.terms.insert(0, DistillationTerm(self.family, self.teacher, loss, self.stages))

    def log_names(self) -> list[str]:
        """Every name :attr:`last_terms` can hold (for trainers that log a fixed set of loss items)."""
        return [n for t in self.terms for n in t.log_names()]

    def add_loss_term(self, term: LossTerm) -> None:
        """Add a term (e.g. a user's own regulariser) to every training step's loss."""
        if any(t.name == term.name for t in self.terms):
            raise ValueError(f"a loss term named {term.name!r} is already registered")
        self.terms.append(term)

    # ================================================================== Fisher-aware quantization
    def critical_class_ids(self, model: nn.Module, class_names: Optional[Sequence[str]] = None, *,
                           family: Optional[DetectorFamily] = None) -> list[int]:
        """The recipe's ``critical.classes`` as class indices, names resolved against ``class_names`` (default:
        :attr:`class_names` set by the trainer adapter, else the detector family's answer). An unknown name
        fails, listing the known ones."""
        from .fisher import resolve_critical_classes

        names = class_names if class_names is not None else self.class_names
        if names is None:
            names = (family or family_for(model, self._family_arg)).class_names(model)
        return resolve_critical_classes(self.recipe.critical.classes, names)

    def critical_category_names(self, model: nn.Module) -> list[str]:
        """Names of the critical classes (for the critical-category metrics); empty when none are named."""
        if not self.recipe.critical.classes:
            return []
        ids = self.critical_class_ids(model)
        names = self.class_names or (self.family or family_for(model, self._family_arg)).class_names(model)
        return [names[i] if names is not None and i < len(names) else str(i) for i in ids]

    def mixed_precision(self, model: nn.Module, batches: Iterable[Any],
                        loss_fn: Optional[Callable[[nn.Module, Any], torch.Tensor]] = None,
                        *, macs: Optional[Mapping[str, int]] = None):
        """The recipe's Fisher-aware mixed precision on the converted ``model`` (before QAT or PTQ): per-layer
        weight bits, applied all or nothing; they travel in :meth:`state`'s per-layer plan. ``loss_fn(model,
        batch)`` is the recipe's objective (default: the detector family's critical objective, ``batches`` in the
        family's convention). Returns the plan (for
        :mod:`detq_hooks.fisher_report`), or ``None`` when the recipe does not enable it. The random streams of
        training are left as they were."""
        from .fisher import mixed_precision_from_recipe

        if not self.recipe.mixed_precision.enabled:
            return None
        if self.objective is None and loss_fn is None:
            raise RuntimeError("QuantSession.mixed_precision: convert the model with this session first (or give loss_fn)")
        if loss_fn is None:
            which, objective = self.recipe.mixed_precision.objective, self.objective
            loss_fn = lambda m, b: objective(m, b, which)  # noqa: E731
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        # PTQ from Lightning's validate/test runs under inference mode: the Fisher traces need autograd, and the
        # batches loaded there are inference tensors, which autograd cannot save
        with torch.random.fork_rng(devices=devices), torch.inference_mode(False), torch.enable_grad():
            batches = (tree_map(_ordinary_tensor, b) for b in batches)  # lazily: a loader is read only as far as needed
            self.last_mixed_precision = mixed_precision_from_recipe(model, batches, loss_fn, self.recipe.mixed_precision,
                                                                    macs=macs)
        return self.last_mixed_precision

    def add_fisher_regularizer(self, model: nn.Module,
                               critical_loss: Optional[Callable[[StepContext], torch.Tensor]] = None):
        """Register the recipe's Fisher-trace regulariser as a loss term (checked against ``model`` first; its
        warm-up follows the progress given to :meth:`before_step`). ``critical_loss(ctx)`` defaults to the
        detector family's critical objective on the step's batch; :meth:`start_training` registers it so.
        ``None`` when the recipe does not enable it."""
        from .fisher import FisherRegularizer

        if not self.recipe.fisher_regularizer.enabled:
            return None
        if critical_loss is None:
            objective = self.objective or self._plan_fisher(model, self.family or family_for(model, self._family_arg), True)
            critical_loss = lambda ctx: objective(ctx.model, ctx.batch, "critical")  # noqa: E731
        term = FisherRegularizer.from_recipe(self.recipe.fisher_regularizer, critical_loss)
        term.check(model)
        self.add_loss_term(term)
        return term

    # ================================================================== 2. optimizer
    def attach_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> int:
        """Quantizer parameters into their own group (no weight decay, ``quantizer_lr_scale`` × base lr)."""
        return add_quantizer_param_group(optimizer, model, self.recipe.quantization.quantizer_lr_scale)

    # ================================================================== 3. calibration / PTQ
    def needs_calibration(self, model: nn.Module) -> bool:
        """Whether an enabled activation quantizer has no range yet (not after a resume or a PTQ checkpoint)."""
        return any(q.role == "activation" and q.enabled and not q.initialized for _, q in iter_quantizers(model))

    def calibrate(self, model: nn.Module, batches: Iterable[Any], forward_fn: Optional[Callable[[nn.Module, Any], Any]] = None,
                  *, progress: bool = False, family_batch: Optional[Callable[[Any], Any]] = None) -> CalibrationResult:
        """Activation ranges from the trainer's batches; the random streams of training are left as they were
        (drawing batches and data augmentation do not shift the run), and statistics are reduced across ranks.

        With the recipe's ``mixed_precision`` on, the Fisher-aware bit allocation follows on the same batches
        (``family_batch(batch)`` turns one into the detector family's convention for the critical objective).
        Calibration runs only on a fresh conversion, so a resumed run keeps its saved bits."""
        num = self.calibration_batches or self.recipe.calibration.num_batches
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        mp = self.recipe.mixed_precision
        if mp.enabled:  # the same batches serve both estimates
            batches = list(itertools.islice(iter(batches), max(num, mp.num_batches)))
        was = model.training
        with torch.random.fork_rng(devices=devices):
            try:
                self.last_calibration = calibrate(model, batches, forward_fn=forward_fn, num_batches=num,
                                                  progress=progress and dist_utils.rank() == 0)
                if mp.enabled:
                    self._mixed_precision_after_calibration(model, batches, forward_fn, family_batch)
            finally:
                model.train(was)
        return self.last_calibration

    def _mixed_precision_after_calibration(self, model, batches: list, forward_fn, family_batch) -> None:
        convert = family_batch or (lambda b: b)
        macs = None
        if "bops_ratio" in (self.recipe.mixed_precision.budget or {}):
            from .fisher import layer_macs

            macs = layer_macs(model, batches[0], forward_fn)
        plan = self.mixed_precision(model, [convert(b) for b in batches[: self.recipe.mixed_precision.num_batches]],
                                    macs=macs)
        self.last_calibration.mixed_precision = plan

    def run_ptq(self, model: nn.Module, batches: Iterable[Any], forward_fn=None, *, progress: bool = False,
                family_batch: Optional[Callable[[Any], Any]] = None) -> CalibrationResult:
        """Post-training quantization of a converted model (the recipe's ``mode: ptq``): calibration (and the
        recipe's mixed precision), then, with ``ptq.method`` other than ``calibration``, block reconstruction
        against the float copy :meth:`convert` kept (:mod:`detq_hooks.reconstruction`; TASKQ's parts as the
        recipe says). The result's ``reconstruction`` holds each block's error before and after."""
        ptq = self.recipe.ptq
        if not ptq.reconstructs:
            return self.calibrate(model, batches, forward_fn, progress=progress, family_batch=family_batch)
        if self.float_copy is None:
            raise RuntimeError("QuantSession.run_ptq: block reconstruction needs the float model; convert it with "
                               "this session (convert keeps a float copy for PTQ recipes)")
        calib = self.calibration_batches or self.recipe.calibration.num_batches
        kept = list(itertools.islice(iter(batches), max(calib, ptq.num_batches or calib)))
        if ptq.part("sparse"):  # before calibration: the dense ranges are searched without the outliers
            from .sparse import add_outlier_quantizers

            # outside inference mode (Lightning's validate): buffers made in it could never be restored in place
            # when reconstruction puts a block back
            with torch.inference_mode(False):
                add_outlier_quantizers(model, ptq.sparse_ratio)
        result = self.calibrate(model, kept, forward_fn, progress=progress, family_batch=family_batch)
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        # Trainers evaluate under inference mode (Lightning's validate/test): reconstruction needs autograd.
        with torch.random.fork_rng(devices=devices), torch.inference_mode(False), torch.enable_grad():
            result.reconstruction = reconstruct_from_recipe(
                model, self.float_copy, kept[: ptq.num_batches or calib], forward_fn, ptq, self.family,
                progress=progress and dist_utils.rank() == 0)
        self.float_copy = None  # the reconstructed model is the result; the copy is not needed any more
        return result

    # ================================================================== 4. training
    def start_training(self, model: nn.Module, *, device: Any = None, progress: Optional[float] = None) -> Optional[str]:
        """Before the first step: teacher on the model's device, taps recorded, curriculum stage applied.
        Returns a message to log when a curriculum stage was applied."""
        if self.teacher is not None:
            if not self.teacher_ready:
                raise CheckpointMismatchError(
                    "distillation needs the float teacher's weights: this model was rebuilt from a quantized "
                    "checkpoint, which does not carry them; set `distillation.teacher` to the float checkpoint QAT "
                    "started from (or resume from a checkpoint of the distillation run)"
                )
            self.teacher.to(device if device is not None else next(model.parameters()).device)
        if self.recipe.fisher_regularizer.enabled and not any(t.name == "fisher_reg" for t in self.terms):
            self.add_fisher_regularizer(model)
        self._remove_recorder()
        taps = Taps()
        for term in self.terms:
            taps = taps | term.taps(model)
        if taps:
            self._recorder = Recorder(model, taps)
        if self.schedule is not None and progress is not None:
            return self.before_step(model, progress)
        return None

    def before_step(self, model: nn.Module, progress: float) -> Optional[str]:
        """Apply the curriculum stage for ``progress`` (idempotent). Returns a message when the stage changed.
        Terms with a schedule of their own (the Fisher regulariser's warm-up) get ``progress`` too."""
        for term in self.terms:
            if hasattr(term, "set_progress"):
                term.set_progress(progress)
        self.before_optimizer_step(model)  # nothing changes the step sizes between here and the optimizer step
        if self.schedule is None or not self.schedule.update(model, progress):
            return None
        s = self.schedule
        return f"curriculum stage {s.current + 1}/{len(s.stages)} ({s.stage_name()}) at {progress:.3f} of the budget"

    def batch_ready(self, batch: Any) -> None:
        """The trainer holds the step's batch, before the student's forward: terms may start work that does not
        depend on the student (the distillation teacher's forward, in a worker thread on a core the trainer leaves
        idle). Only while training; :meth:`loss_terms` on the same batch takes the result."""
        if self._recorder is None:
            return
        for term in self.terms:
            term.prefetch(batch, self.stage)

    def loss_terms(self, model: nn.Module, batch: Any, outputs: Any = None,
                   task_loss: Optional[Union[torch.Tensor, float]] = None) -> dict[str, torch.Tensor]:
        """The extra loss terms of this step (call inside the trainer's forward/loss, after the model ran on
        ``batch``); their sum goes into the loss. Names starting with ``_`` are not for logging. ``task_loss``: the
        trainer's own loss of the step, in the units the terms' sum is added in (the Fisher regulariser's
        ``max_share`` caps against it)."""
        if not self.terms:
            return {}
        recorded = self._recorder.recorded if self._recorder is not None else _EMPTY
        if isinstance(task_loss, torch.Tensor):  # a detached scalar; the term that needs it reads it
            task_loss = task_loss.detach().float().sum()
        ctx = StepContext(model, batch, recorded, self.stage, outputs, task_loss=task_loss)
        out: dict[str, torch.Tensor] = {}
        try:
            for term in self.terms:
                out.update(term(ctx))
        finally:
            if self._recorder is not None:
                self._recorder.clear()
        self.last_terms = {k: float(v.detach()) for k, v in out.items() if not k.startswith("_")}
        self.last_terms.update(ctx.logs)
        return out

    def before_optimizer_step(self, model: nn.Module) -> None:
        """Right before the optimizer step (called by :meth:`before_step` too, for trainers that step once per
        batch): remember the step sizes, so that :meth:`after_optimizer_step` keeps each at no less than half."""
        self._step_size_floors = step_size_floors(model)

    def after_optimizer_step(self, model: nn.Module, averaged: Sequence[nn.Module] = ()) -> None:
        """Learned step sizes stay positive, and no lower than half their value at :meth:`before_optimizer_step`;
        frozen curriculum stages undo what the optimizer did to them; averaged copies (EMA) get the live model's
        integer quantizer flags exactly."""
        keep_step_sizes_positive(model, floors=self._step_size_floors)
        if self.schedule is not None:
            self.schedule.after_optimizer_step(model)
        for avg in averaged:
            sync_integer_buffers(avg, model)

    def end_training(self, model: Optional[nn.Module] = None) -> None:
        """After training: nothing frozen, no recording (evaluation and export see the whole quantized model)."""
        if self.schedule is not None:
            self.schedule.remove_hooks()
        for term in self.terms:
            term.close()
        self._remove_recorder()

    def _remove_recorder(self) -> None:
        if self._recorder is not None:
            self._recorder.remove()
            self._recorder = None

    # ================================================================== 5. state
    def state(self, model: nn.Module, *, target: str = "", quantizer_state: bool = False,
              include_teacher: bool = True) -> dict:
        """The ``detq`` checkpoint entry (see :mod:`detq_hooks.checkpoint`)."""
        teacher = None
        if self.teacher is not None and include_teacher:
            teacher = ({"source": self.teacher_source} if self.teacher_source else
                       {"state": {k: v.detach().cpu() for k, v in self.teacher.state_dict().items()}})
        return quantization_state(model, target=target,
                                  curriculum=self.schedule.state_dict() if self.schedule is not None else None,
                                  teacher=teacher, quantizer_state=quantizer_state)

    def verify(self, model: nn.Module, state_dict: Mapping[str, Any], entry: Optional[Mapping[str, Any]], *,
               source: str = "checkpoint", prefix: str = "") -> Optional[dict]:
        """Check a checkpoint against the model before its weights are copied (nothing half-loaded; a float
        checkpoint for a quantized model is refused there too); returns the entry in the current format."""
        entry = read_state(entry, source=source)
        check_compatible(model, state_dict, entry, source=source, prefix=prefix)
        return entry

    def apply_plan(self, model: nn.Module, entry: Optional[Mapping[str, Any]], *, source: str = "checkpoint") -> int:
        """For trainers that convert before the checkpoint is read (MMEngine): set the converted model's bits and
        enabled flags to the saved plan (the authority) before :meth:`verify` and the weight copy. Nothing is
        changed when the layer sets differ (:class:`CheckpointMismatchError` naming the layer)."""
        return apply_plan(model, entry, source=source)

    def load_state(self, model: nn.Module, entry: Optional[Mapping[str, Any]], *, source: str = "checkpoint",
                   resume: bool = True) -> None:
        """Restore what the session keeps besides the weights: the fp32 quantizer state (trainers that store
        fp16 modules), the curriculum stage (resume) and the distillation teacher (resume, or a non-resume load
        of a checkpoint that carries one)."""
        entry = read_state(entry, source=source)
        if entry is None:
            return
        resume_curriculum = resume and self.schedule is not None
        if resume_curriculum:  # checked before anything is loaded
            if entry.get("curriculum") is None:
                raise CheckpointMismatchError(f"{source} has no curriculum state but this run's recipe has a curriculum")
            self.schedule.check_state(entry["curriculum"], model)
        if entry.get("quantizer_state"):
            load_quantizer_state(model, entry["quantizer_state"])
        if resume_curriculum:
            self.schedule.load_state_dict(entry["curriculum"], model, check=False)
        if self.teacher is not None and not self.recipe.distillation.teacher and (resume or entry.get("teacher")):
            saved = entry.get("teacher")
            if saved is None:
                raise CheckpointMismatchError(
                    f"{source} has no distillation teacher (it was not written by a distillation run); give "
                    "`distillation.teacher` (the float checkpoint QAT started from) to resume from it"
                )
            if "state" in saved:
                self.teacher.load_state_dict(fit_state_dict(self.teacher.module, saved["state"], source))
                self.teacher_ready = True
            else:
                self.set_teacher_weights(self.read_weights(saved["source"]), saved["source"])

    def set_float_weights(self, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
        """Float weights that arrive after conversion (MMEngine's ``load_from``): into the distillation teacher
        (unless the recipe names its own) and PTQ reconstruction's float copy."""
        if self.teacher is not None and not self.recipe.distillation.teacher:
            self.set_teacher_weights(state_dict, source)
        if self.float_copy is not None:
            self.float_copy.load_state_dict(fit_state_dict(self.float_copy, state_dict, source))

    def set_teacher_weights(self, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
        """Fill the teacher with float weights that arrive after conversion (MMEngine's ``load_from``)."""
        if self.teacher is None:
            return
        if any(is_quantizer_key(k) for k in state_dict):
            raise CheckpointMismatchError(f"the distillation teacher must be a float model, {source} is quantized")
        self.teacher.load_state_dict(fit_state_dict(self.teacher.module, state_dict, source))
        self.teacher_source = str(source)
        self.teacher_ready = True

    # ================================================================== figures
    @staticmethod
    def figures(model: nn.Module) -> dict[str, float]:
        return quantization_figures(model)


class _Empty:
    outputs: dict = {}
    inputs: dict = {}

    def output(self, name, call=-1):
        raise KeyError(f"{name!r} was not recorded: no taps were installed (call start_training first)")

    input = output


_EMPTY = _Empty()


def _ordinary_tensor(x: Any) -> Any:
    """A tensor made under inference mode as an ordinary one (autograd may save it); anything else as it is."""
    return x.clone() if isinstance(x, torch.Tensor) and x.is_inference() else x


__all__ = ["QuantSession", "TrainerInterface", "StepContext", "LossTerm", "quantization_figures",
           "sync_integer_buffers", "read_state_dict", "fit_state_dict"]
