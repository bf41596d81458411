"""The recipe: one declarative, validated description of how to quantize a detector.

All three trainer adapters read the same recipe. It is built from a preset name (``"w4a8"``),
a YAML path or a plain dict, validated at construction (errors name the field, repeat the value and
list what is allowed) and round-trips through :meth:`Recipe.to_dict` / :meth:`Recipe.from_dict`.

Example:
    >>> from detq_hooks.recipe import load_recipe
    >>> r = load_recipe("w4a8")
    >>> r.quantization.weight.bits, r.quantization.activation.bits
    (4, 8)
    >>> load_recipe({"preset": "w4a8", "quantization": {"activation": {"bits": 6}}}).quantization.activation.bits
    6
"""

from __future__ import annotations

import copy
import fnmatch
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Optional

RECIPE_VERSION = 1

QUANTIZER_KINDS = ("lsq", "lsq_plus", "fixed")
CALIBRATORS = ("minmax", "percentile", "mse", "entropy")
WEIGHT_CALIBRATORS = ("minmax", "mse")
MODES = ("qat", "ptq")
MODULE_TYPES = ("Conv2d", "Linear", "ConvTranspose2d")
MIN_BITS, MAX_BITS = 2, 8


class RecipeError(ValueError):
    """A recipe (or one of its fields) is invalid. The message names the field and the value."""


def _check_choice(where: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise RecipeError(f"`{where}` = {value!r} is not allowed; choose one of {list(allowed)}")


def _check_bits(where: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_BITS <= value <= MAX_BITS:
        raise RecipeError(f"`{where}` = {value!r} is out of range; bits must be an integer in [{MIN_BITS}, {MAX_BITS}]")


def _check_type(where: str, value: Any, types: type | tuple[type, ...]) -> None:
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise RecipeError(f"`{where}` = {value!r} must be of type {types}")
    if not isinstance(value, types):
        raise RecipeError(f"`{where}` = {value!r} must be of type {getattr(types, '__name__', types)}")


class _Section:
    """Shared dict conversion for recipe sections (dataclasses with keyword-only fields)."""

    _path: str = ""

    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if isinstance(v, _Section):
                v = v.to_dict()
            elif isinstance(v, list):
                v = [x.to_dict() if isinstance(x, _Section) else copy.deepcopy(x) for x in v]
            else:
                v = copy.deepcopy(v)
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, path: str | None = None):
        path = path or cls._path
        if data is None:
            return cls()
        if isinstance(data, cls):
            return data
        if not isinstance(data, Mapping):
            raise RecipeError(f"`{path}` must be a mapping, got {type(data).__name__}: {data!r}")
        known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise RecipeError(f"unknown key(s) {unknown} in `{path}`; allowed keys: {sorted(known)}")
        kwargs = {}
        for name, value in data.items():
            kwargs[name] = cls._convert_field(name, value, f"{path}.{name}" if path else name)
        return cls(**kwargs)

    @classmethod
    def _convert_field(cls, name: str, value: Any, path: str) -> Any:
        return value


@dataclass(kw_only=True)
class QuantizerSpec(_Section):
    """How one tensor (weights or activations) is fake-quantized.

    Attributes:
        bits: integer bit width, 2..8.
        symmetric: symmetric range (zero point 0). Weights are symmetric; activations usually not.
        per_channel: one scale per output channel (weights only).
        kind: ``lsq`` (learned step size), ``lsq_plus`` (also learns the offset) or ``fixed``
            (range from calibration, not trained).
    """

    bits: int = 8
    symmetric: bool = True
    per_channel: bool = True
    kind: str = "lsq"

    def __post_init__(self) -> None:
        _check_bits(f"{self._path}.bits", self.bits)
        _check_type(f"{self._path}.symmetric", self.symmetric, bool)
        _check_type(f"{self._path}.per_channel", self.per_channel, bool)
        _check_choice(f"{self._path}.kind", self.kind, QUANTIZER_KINDS)
        if self.kind == "lsq_plus" and self.symmetric:
            raise RecipeError(f"`{self._path}.kind` = 'lsq_plus' learns an offset and needs `symmetric: false`")


@dataclass(kw_only=True)
class LayerRule(_Section):
    """A rule selecting modules by name and/or type.

    ``name`` is a glob (``backbone.*``) or, prefixed with ``re:``, a regular expression matched against
    the full module name. ``types`` restricts to module class names. A rule with ``quantize: false``
    excludes what it matches; otherwise it may override the bits of what it matches. Rules apply in
    order; later rules win. A rule that matches no module is an error (typos must not pass silently).
    """

    name: str | None = None
    types: list[str] | None = None
    quantize: bool = True
    weight_bits: int | None = None
    activation_bits: int | None = None
    quantize_input: bool | None = None  # False keeps this layer's input activation float

    _path = "quantization.rules[]"

    def __post_init__(self) -> None:
        if self.name is None and not self.types:
            raise RecipeError(f"`{self._path}` needs `name` and/or `types`, got {self.to_dict()}")
        if self.name is not None:
            _check_type(f"{self._path}.name", self.name, str)
            if self.name.startswith("re:"):
                try:
                    re.compile(self.name[3:])
                except re.error as e:
                    raise RecipeError(f"`{self._path}.name` = {self.name!r} is not a valid regular expression: {e}")
        if self.types is not None:
            if isinstance(self.types, str):
                self.types = [self.types]
            for t in self.types:
                _check_choice(f"{self._path}.types", t, MODULE_TYPES)
        _check_type(f"{self._path}.quantize", self.quantize, bool)
        for k in ("weight_bits", "activation_bits"):
            if getattr(self, k) is not None:
                _check_bits(f"{self._path}.{k}", getattr(self, k))

    def matches(self, module_name: str, type_name: str) -> bool:
        if self.types and type_name not in self.types:
            return False
        if self.name is None:
            return True
        if self.name.startswith("re:"):
            return re.fullmatch(self.name[3:], module_name) is not None
        return fnmatch.fnmatchcase(module_name, self.name)


@dataclass(kw_only=True)
class QuantizationSection(_Section):
    """What is quantized and how.

    Attributes:
        weight / activation: default quantizer specs.
        module_types: module classes that are swapped for fake-quant versions.
        rules: ordered :class:`LayerRule` list (include/exclude/per-rule bits).
        first_layer_bits: bits (weights and input) of the first layer; ``None`` leaves it to the defaults.
        prediction_layer_bits: bits of the final prediction layers (and their inputs); ``None`` likewise.
        quantizer_lr_scale: learning rate of quantizer parameters as a multiple of the base rate.
        shared_activations: layers that read one tensor (or the parts of one Concat/Split/MaxPool/nearest
            Upsample) share one input quantizer, found with the first calibration batch
            (:mod:`detq_hooks.sharing`): what integer runtimes need to quantize each tensor once, where it is
            produced. Not with a curriculum or block reconstruction (both treat layers one by one).
    """

    weight: QuantizerSpec = field(default_factory=lambda: QuantizerSpec(bits=8, symmetric=True, per_channel=True))
    activation: QuantizerSpec = field(
        default_factory=lambda: QuantizerSpec(bits=8, symmetric=False, per_channel=False)
    )
    module_types: list[str] = field(default_factory=lambda: list(MODULE_TYPES))
    rules: list[LayerRule] = field(default_factory=list)
    first_layer_bits: int | None = 8
    prediction_layer_bits: int | None = 8
    quantizer_lr_scale: float = 0.1
    shared_activations: bool = False

    _path = "quantization"

    @classmethod
    def _convert_field(cls, name, value, path):
        if name in ("weight", "activation"):
            if isinstance(value, QuantizerSpec):
                return value
            defaults = {"bits": 8, "symmetric": name == "weight", "per_channel": name == "weight"}
            if value is not None and not isinstance(value, Mapping):
                raise RecipeError(f"`{path}` must be a mapping, got {value!r}")
            try:
                return QuantizerSpec.from_dict({**defaults, **(value or {})}, path)
            except RecipeError as e:  # spec messages start with "`.field`": give them their full path
                raise RecipeError(str(e).replace("`.", f"`{path}.")) from None
        if name == "rules":
            if not isinstance(value, list):
                raise RecipeError(f"`{path}` must be a list of rules, got {value!r}")
            return [r if isinstance(r, LayerRule) else LayerRule.from_dict(r, f"{path}[{i}]") for i, r in enumerate(value)]
        return value

    def __post_init__(self) -> None:
        if self.activation.per_channel:
            raise RecipeError("`quantization.activation.per_channel` = True is not supported; activations use one range per tensor")
        if not self.weight.symmetric and self.weight.kind != "fixed":
            # Learned asymmetric weight ranges gain little and break exact BN folding.
            pass
        for t in self.module_types:
            _check_choice("quantization.module_types", t, MODULE_TYPES)
        _check_type("quantization.shared_activations", self.shared_activations, bool)
        for k in ("first_layer_bits", "prediction_layer_bits"):
            if getattr(self, k) is not None:
                _check_bits(f"quantization.{k}", getattr(self, k))
        if not isinstance(self.quantizer_lr_scale, (int, float)) or self.quantizer_lr_scale <= 0:
            raise RecipeError(f"`quantization.quantizer_lr_scale` = {self.quantizer_lr_scale!r} must be a positive number")


@dataclass(kw_only=True)
class CalibrationSection(_Section):
    """Range initialisation before QAT, or the whole of PTQ.

    Attributes:
        method: activation calibrator: ``minmax``, ``percentile``, ``mse`` or ``entropy``.
        weight_method: ``minmax`` or ``mse`` (per-channel Lp search).
        num_batches: batches drawn from the user's loader.
        percentile: for ``percentile`` (e.g. 99.99).
        mse_norm: the Lp norm of the MSE search (2.4 as in QDrop/BRECQ).
        samples_per_batch: activation values kept per quantizer per batch (a random subsample).
    """

    method: str = "mse"
    weight_method: str = "mse"
    num_batches: int = 8
    percentile: float = 99.99
    mse_norm: float = 2.4
    samples_per_batch: int = 65536

    _path = "calibration"

    def __post_init__(self) -> None:
        _check_choice("calibration.method", self.method, CALIBRATORS)
        _check_choice("calibration.weight_method", self.weight_method, WEIGHT_CALIBRATORS)
        if isinstance(self.num_batches, bool) or not isinstance(self.num_batches, int) or self.num_batches < 1:
            raise RecipeError(f"`calibration.num_batches` = {self.num_batches!r} must be a positive integer")
        if not (isinstance(self.percentile, (int, float)) and 50.0 < self.percentile <= 100.0):
            raise RecipeError(f"`calibration.percentile` = {self.percentile!r} must be in (50, 100]")
        if not (isinstance(self.mse_norm, (int, float)) and self.mse_norm > 0):
            raise RecipeError(f"`calibration.mse_norm` = {self.mse_norm!r} must be positive")
        if not isinstance(self.samples_per_batch, int) or self.samples_per_batch < 256:
            raise RecipeError(f"`calibration.samples_per_batch` = {self.samples_per_batch!r} must be an integer >= 256")


@dataclass(kw_only=True)
class StageSpec(_Section):
    """One curriculum stage named in the recipe: ``modules`` are module-name globs (or ``re:`` regexes)."""

    name: str
    modules: list[str]
    outputs: list[str] | None = None  # modules whose outputs are the stage's features (for PKD)

    _path = "curriculum.stages[]"

    def __post_init__(self) -> None:
        _check_type(f"{self._path}.name", self.name, str)
        if not isinstance(self.modules, list) or not self.modules or not all(isinstance(m, str) for m in self.modules):
            raise RecipeError(f"`{self._path}.modules` = {self.modules!r} must be a non-empty list of module-name globs")
        if self.outputs is not None and (not isinstance(self.outputs, list) or not all(isinstance(m, str) for m in self.outputs)):
            raise RecipeError(f"`{self._path}.outputs` = {self.outputs!r} must be a list of module names")


@dataclass(kw_only=True)
class CurriculumSection(_Section):
    """Curriculum QAT (CR-QAT's CQAT): stage k is quantized and trained, later stages stay float and frozen.

    Attributes:
        enabled: turn the curriculum on.
        stages: override the adapter's automatic stages (data-flow order).
        boundaries: fractions of the QAT budget at which stage 2, 3, ... start (default 1/3 for two stages,
            the paper's 1/3 : 2/3 split). ``len(boundaries) == number of stages - 1``.
        unit: ``epoch`` or ``iteration``: the granularity at which the stage may change.
    """

    enabled: bool = False
    stages: list[StageSpec] | None = None
    boundaries: list[float] | None = None
    unit: str = "iteration"

    _path = "curriculum"

    @classmethod
    def _convert_field(cls, name, value, path):
        if name == "stages" and value is not None:
            if not isinstance(value, list):
                raise RecipeError(f"`{path}` must be a list of stages, got {value!r}")
            return [v if isinstance(v, StageSpec) else StageSpec.from_dict(v, f"{path}[{i}]") for i, v in enumerate(value)]
        return value

    def __post_init__(self) -> None:
        _check_type("curriculum.enabled", self.enabled, bool)
        _check_choice("curriculum.unit", self.unit, ("epoch", "iteration"))
        if self.boundaries is not None:
            b = self.boundaries
            if not isinstance(b, list) or not all(isinstance(x, (int, float)) and 0 < x < 1 for x in b) or sorted(b) != b:
                raise RecipeError(f"`curriculum.boundaries` = {b!r} must be increasing fractions in (0, 1)")
            if self.stages is not None and len(b) != len(self.stages) - 1:
                raise RecipeError(
                    f"`curriculum.boundaries` has {len(b)} entries but `curriculum.stages` has {len(self.stages)} stages; "
                    "give one boundary fewer than stages"
                )

    def boundaries_for(self, num_stages: int) -> list[float]:
        if self.boundaries is not None:
            if len(self.boundaries) != num_stages - 1:
                raise RecipeError(
                    f"`curriculum.boundaries` = {self.boundaries} does not fit the model's {num_stages} stages"
                )
            return list(self.boundaries)
        if num_stages == 2:
            return [1.0 / 3.0]
        return [i / num_stages for i in range(1, num_stages)]


TEACHER_PRECISIONS = ("float32", "bfloat16", "float16")


@dataclass(kw_only=True)
class DistillationSection(_Section):
    """Distillation from a frozen full-precision teacher (CR-QAT). Weights of 0 turn a term off.

    Attributes:
        enabled: turn distillation on.
        teacher: path of the float teacher checkpoint; default: a frozen copy of the model before conversion.
        feature_weight: PKD (Pearson) feature distillation on each non-final stage's outputs (λ = 6).
        relational_weight: class-anchored relational distillation (TRKD/TPSD) on the head (λ = 6).
        logit_weight: classification-logit distillation on the teacher's positives.
        box_weight: box consistency, 1 − IoU between student and teacher boxes at the same anchor/query.
        temperature: softening of the logit term.
        teacher_precision: ``float32`` (default, the paper's full-precision teacher), or ``bfloat16``/``float16``:
            the teacher's forward under autocast, for hardware with fast half-precision kernels (CPUs with
            AVX512-BF16 or AMX, GPUs); its features and scores are then targets rounded to that precision.
    """

    enabled: bool = False
    teacher: str | None = None
    feature_weight: float = 6.0
    relational_weight: float = 6.0
    logit_weight: float = 1.0
    box_weight: float = 1.0
    temperature: float = 1.0
    teacher_precision: str = "float32"

    _path = "distillation"

    def __post_init__(self) -> None:
        _check_type("distillation.enabled", self.enabled, bool)
        for k in ("feature_weight", "relational_weight", "logit_weight", "box_weight"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise RecipeError(f"`distillation.{k}` = {v!r} must be a number >= 0")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or self.temperature <= 0:
            raise RecipeError(f"`distillation.temperature` = {self.temperature!r} must be > 0")
        if self.teacher is not None:
            _check_type("distillation.teacher", self.teacher, str)
        if self.teacher_precision not in TEACHER_PRECISIONS:
            raise RecipeError(f"`distillation.teacher_precision` = {self.teacher_precision!r} must be one of "
                              f"{', '.join(TEACHER_PRECISIONS)}")


BUDGET_KINDS = ("avg_weight_bits", "size_mb", "bops_ratio")
FISHER_OBJECTIVES = ("critical", "all", "mix")
FISHER_ESTIMATORS = ("empirical", "hutchinson")
HVP_METHODS = ("auto", "double", "finite_difference")
MERGE_METHODS = ("logsumexp", "max")


def _check_number(where: str, value: Any, *, low: float, high: float = float("inf"), low_open: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bound = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high != float("inf") else "")
        raise RecipeError(f"`{where}` = {value!r} must be a number {bound}")


def _check_positive_int(where: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RecipeError(f"`{where}` = {value!r} must be a positive integer")


@dataclass(kw_only=True)
class CriticalSection(_Section):
    """The critical categories of the Fisher-aware methods (``detq_hooks.fisher``).

    Attributes:
        classes: class names (resolved against the trainer's class names) or integer class indices. Empty
            means every class is critical: the critical objective is then the full objective.
        alpha: the sensitivity objective ``alpha·L_all + L_crit`` when ``mixed_precision.objective`` is ``mix``.
        merge: how softmax heads merge the non-critical logits into "other": ``logsumexp`` (keeps the
            probability mass) or ``max``.
    """

    classes: list = field(default_factory=list)
    alpha: float = 1.0
    merge: str = "logsumexp"

    _path = "critical"

    def __post_init__(self) -> None:
        if not isinstance(self.classes, list):
            raise RecipeError(f"`critical.classes` = {self.classes!r} must be a list of class names or indices")
        seen = set()
        for c in self.classes:
            if isinstance(c, bool) or not isinstance(c, (str, int)) or (isinstance(c, int) and c < 0) or c == "":
                raise RecipeError(f"`critical.classes` entry {c!r} must be a class name or a class index >= 0")
            if c in seen:
                raise RecipeError(f"`critical.classes` names {c!r} twice")
            seen.add(c)
        _check_number("critical.alpha", self.alpha, low=0.0)
        _check_choice("critical.merge", self.merge, MERGE_METHODS)


@dataclass(kw_only=True)
class MixedPrecisionSection(_Section):
    """Fisher-aware mixed precision: per-layer weight bits minimising ``Σ tr Fᵢ·‖Q_b(Wᵢ) − Wᵢ‖²`` under a budget.

    Attributes:
        enabled: turn it on (applied to the converted model before QAT or PTQ).
        candidates: the weight bit widths a layer may get (each in [2, 8]).
        budget: exactly one of ``{avg_weight_bits: 4.0}`` (over every quantized weight element, the pinned
            first/prediction layers included), ``{size_mb: 3.5}`` (quantized weights at their widths plus every
            other parameter in fp32, 1 MB = 10⁶ bytes) or ``{bops_ratio: 0.5}`` (bit operations relative to
            the same model with every weight at 8 bits).
        objective: the Fisher of ``critical``, ``all`` or ``mix`` (``critical.alpha·L_all + L_crit``).
        num_batches: calibration batches of the Fisher estimate.
        estimator: ``empirical`` (mean ‖∇_W ℓ‖²) or ``hutchinson`` (E[vᵀHv], Rademacher v).
        hutchinson_samples: probe vectors per batch for ``hutchinson``.
    The layers the recipe pins (``quantization.first_layer_bits`` / ``prediction_layer_bits``) keep their bits.
    """

    enabled: bool = False
    candidates: list = field(default_factory=lambda: [2, 4, 8])
    budget: dict | None = None
    objective: str = "critical"
    num_batches: int = 8
    estimator: str = "empirical"
    hutchinson_samples: int = 1

    _path = "mixed_precision"

    def __post_init__(self) -> None:
        _check_type("mixed_precision.enabled", self.enabled, bool)
        if not isinstance(self.candidates, list) or not self.candidates:
            raise RecipeError(f"`mixed_precision.candidates` = {self.candidates!r} must be a non-empty list of bit widths")
        for b in self.candidates:
            _check_bits("mixed_precision.candidates", b)
        if len(set(self.candidates)) != len(self.candidates):
            raise RecipeError(f"`mixed_precision.candidates` = {self.candidates!r} repeats a bit width")
        if self.budget is not None:
            check_budget(self.budget, "mixed_precision.budget")
        elif self.enabled:
            raise RecipeError(f"`mixed_precision.budget` is missing; give one of {list(BUDGET_KINDS)}, "
                              "e.g. {avg_weight_bits: 4.0}")
        _check_choice("mixed_precision.objective", self.objective, FISHER_OBJECTIVES)
        _check_positive_int("mixed_precision.num_batches", self.num_batches)
        _check_choice("mixed_precision.estimator", self.estimator, FISHER_ESTIMATORS)
        _check_positive_int("mixed_precision.hutchinson_samples", self.hutchinson_samples)


def check_budget(budget: Any, where: str = "mixed_precision.budget") -> tuple[str, float]:
    """Validate a mixed-precision budget mapping; returns ``(kind, value)``."""
    if not isinstance(budget, Mapping) or len(budget) != 1 or next(iter(budget)) not in BUDGET_KINDS:
        raise RecipeError(f"`{where}` = {budget!r} must hold exactly one of {list(BUDGET_KINDS)}, "
                          "e.g. {avg_weight_bits: 4.0}")
    kind, value = next(iter(budget.items()))
    if kind == "avg_weight_bits":
        _check_number(f"{where}.avg_weight_bits", value, low=MIN_BITS, high=MAX_BITS)
    elif kind == "size_mb":
        _check_number(f"{where}.size_mb", value, low=0.0, low_open=True)
    else:
        _check_number(f"{where}.bops_ratio", value, low=0.0, high=1.0, low_open=True)
    return kind, float(value)


@dataclass(kw_only=True)
class FisherRegularizerSection(_Section):
    """Fisher-trace regularisation during QAT: ``λ·tr F_crit`` with ``tr F ≈ ‖∇_θ L_crit‖²`` over the quantized
    weights; its gradient is a Hessian-vector product.

    Attributes:
        enabled: turn it on (``mode: qat`` only).
        weight: λ.
        every: apply it every k steps.
        warmup: fraction of the QAT budget over which λ ramps linearly from 0.
        hvp: ``auto`` (double backprop where the ops allow it, else finite difference), ``double`` or
            ``finite_difference``.
        epsilon: the finite-difference step along the normalised gradient.
        max_share: cap of one step's penalty as a multiple of the step's task loss (the trace is not normalised,
            so a fixed λ can outweigh the task loss many times over): by default the regulariser never weighs more
            than the task loss; ``null``: no cap.
    """

    enabled: bool = False
    weight: float = 1e-2
    every: int = 1
    warmup: float = 0.1
    hvp: str = "auto"
    epsilon: float = 1e-3
    max_share: Optional[float] = 1.0

    _path = "fisher_regularizer"

    def __post_init__(self) -> None:
        _check_type("fisher_regularizer.enabled", self.enabled, bool)
        _check_number("fisher_regularizer.weight", self.weight, low=0.0)
        _check_positive_int("fisher_regularizer.every", self.every)
        _check_number("fisher_regularizer.warmup", self.warmup, low=0.0, high=1.0)
        _check_choice("fisher_regularizer.hvp", self.hvp, HVP_METHODS)
        _check_number("fisher_regularizer.epsilon", self.epsilon, low=0.0, low_open=True)
        if self.max_share is not None:
            _check_number("fisher_regularizer.max_share", self.max_share, low=0.0, low_open=True)


PTQ_METHODS = ("calibration", "adaround", "qdrop", "taskq")


@dataclass(kw_only=True)
class PTQSection(_Section):
    """Post-training quantization beyond calibration (``detq_hooks.reconstruction``), for ``mode: ptq``.

    Attributes:
        method: ``calibration`` (ranges only), ``adaround`` (block reconstruction: learned weight rounding and
            activation step sizes), ``qdrop`` (the same with QDrop's random float/quantized input mixing) or
            ``taskq`` (QDrop plus the three TASKQ parts below, each of which can be turned off).
        iterations: optimisation steps per block.
        batch_size: images per reconstruction step (from the calibration batches).
        num_batches: calibration batches kept for reconstruction (default: ``calibration.num_batches``).
        qdrop_prob: probability of the float input per element (``qdrop``/``taskq``; 0 for ``adaround``).
        lr / scale_lr / round_weight / warmup: AdaRound's rate, the step sizes' relative rate, the rounding
            regulariser's λ and its warm-up fraction.
        headwise: STAHQ: each head path (scale × box/class branch) is its own reconstruction unit.
        dtr: detection-aware task regularisation on the head's blocks: ``dtr_weight·(1 − IoU)`` of boxes decoded
            from the quantized and the float head at the same anchor, weighted by the float confidence, plus
            ``kl_weight`` × KL of the class scores.
        sparse: sparse outlier quantization of activations: the top ``sparse_ratio`` by magnitude kept at high
            precision (simulated: see the README), the dense rest on an MSE-searched range.
        seed: seed of the reconstruction's mini-batch draws and QDrop masks.
    """

    method: str = "calibration"
    # Measured on YOLO11n (benchmarks/bench_ptq.py): W4A8 TASKQ on 256 images in under 5 minutes on 2 cores.
    iterations: int = 150
    batch_size: int = 8
    num_batches: Optional[int] = None
    qdrop_prob: Optional[float] = None
    lr: float = 1e-2
    scale_lr: float = 1e-3
    round_weight: float = 0.01
    warmup: float = 0.2
    headwise: Optional[bool] = None
    dtr: Optional[bool] = None
    dtr_weight: float = 1.0
    kl_weight: float = 0.0
    sparse: Optional[bool] = None
    sparse_ratio: float = 0.005
    seed: int = 0

    _path = "ptq"

    def __post_init__(self) -> None:
        _check_choice("ptq.method", self.method, PTQ_METHODS)
        _check_positive_int("ptq.iterations", self.iterations)
        _check_positive_int("ptq.batch_size", self.batch_size)
        if self.num_batches is not None:
            _check_positive_int("ptq.num_batches", self.num_batches)
        if self.qdrop_prob is not None:
            _check_number("ptq.qdrop_prob", self.qdrop_prob, low=0.0, high=1.0)
        for name in ("lr", "scale_lr"):
            _check_number(f"ptq.{name}", getattr(self, name), low=0.0, low_open=True)
        _check_number("ptq.round_weight", self.round_weight, low=0.0)
        _check_number("ptq.warmup", self.warmup, low=0.0, high=1.0)
        _check_number("ptq.dtr_weight", self.dtr_weight, low=0.0)
        _check_number("ptq.kl_weight", self.kl_weight, low=0.0)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise RecipeError(f"`ptq.seed` = {self.seed!r} must be an integer >= 0")
        for name in ("headwise", "dtr", "sparse"):
            if getattr(self, name) is not None:
                _check_type(f"ptq.{name}", getattr(self, name), bool)
        if not (isinstance(self.sparse_ratio, (int, float)) and not isinstance(self.sparse_ratio, bool)
                and 0.0 < self.sparse_ratio <= 0.2):
            raise RecipeError(f"`ptq.sparse_ratio` = {self.sparse_ratio!r} must be in (0, 0.2] (a fraction of the values)")
        taskq_only = [n for n in ("headwise", "dtr", "sparse") if getattr(self, n) and self.method != "taskq"]
        if taskq_only and self.method == "calibration":
            raise RecipeError(f"`ptq.{taskq_only[0]}` needs block reconstruction: set `ptq.method` to adaround, qdrop or taskq")

    @property
    def reconstructs(self) -> bool:
        return self.method != "calibration"

    def part(self, name: str) -> bool:
        """Whether a TASKQ part (``headwise``, ``dtr``, ``sparse``) is on: on by default for ``taskq``."""
        value = getattr(self, name)
        return (self.method == "taskq") if value is None else bool(value)

    def mixing_probability(self) -> float:
        if self.qdrop_prob is not None:
            return float(self.qdrop_prob)
        return 0.0 if self.method == "adaround" else 0.5


@dataclass(kw_only=True)
class Recipe(_Section):
    """A complete detq-hooks recipe. Build it with :func:`load_recipe`.

    Attributes:
        version: recipe schema version (currently 1).
        name: a label for reports and checkpoints.
        mode: ``qat`` (calibrate, then train quantized) or ``ptq`` (calibrate only).
        quantization / calibration: sections.
    """

    version: int = RECIPE_VERSION
    name: str = "custom"
    mode: str = "qat"
    quantization: QuantizationSection = field(default_factory=QuantizationSection)
    calibration: CalibrationSection = field(default_factory=CalibrationSection)
    curriculum: CurriculumSection = field(default_factory=CurriculumSection)
    distillation: DistillationSection = field(default_factory=DistillationSection)
    critical: CriticalSection = field(default_factory=CriticalSection)
    mixed_precision: MixedPrecisionSection = field(default_factory=MixedPrecisionSection)
    fisher_regularizer: FisherRegularizerSection = field(default_factory=FisherRegularizerSection)
    ptq: PTQSection = field(default_factory=PTQSection)

    _path = ""

    @classmethod
    def _convert_field(cls, name, value, path):
        sections = {
            "quantization": QuantizationSection,
            "calibration": CalibrationSection,
            "curriculum": CurriculumSection,
            "distillation": DistillationSection,
            "critical": CriticalSection,
            "mixed_precision": MixedPrecisionSection,
            "fisher_regularizer": FisherRegularizerSection,
            "ptq": PTQSection,
        }
        if name in sections:
            return sections[name].from_dict(value, name)
        return value

    def __post_init__(self) -> None:
        if self.mode == "ptq" and (self.curriculum.enabled or self.distillation.enabled):
            raise RecipeError("`mode` = 'ptq' calibrates without training; `curriculum`/`distillation` need `mode: qat`")
        if self.mode == "ptq" and self.fisher_regularizer.enabled:
            raise RecipeError("`mode` = 'ptq' calibrates without training; `fisher_regularizer.enabled` needs `mode: qat`")
        if self.mode == "qat" and self.ptq.reconstructs:
            raise RecipeError(f"`ptq.method` = {self.ptq.method!r} is post-training quantization; it needs `mode: ptq`")
        if self.quantization.shared_activations and (self.curriculum.enabled or self.ptq.reconstructs):
            what = "`curriculum.enabled`" if self.curriculum.enabled else f"`ptq.method` = {self.ptq.method!r}"
            raise RecipeError(f"`quantization.shared_activations` ties quantizers across layers; {what} treats layers "
                              "one by one and cannot be combined with it")
        if self.version != RECIPE_VERSION:
            raise RecipeError(f"`version` = {self.version!r} is not supported; this detq-hooks reads version {RECIPE_VERSION}")
        _check_choice("mode", self.mode, MODES)
        _check_type("name", self.name, str)

    def fingerprint(self) -> dict:
        """The part of the recipe that fixes the quantized model's structure (for checkpoint checks)."""
        q = self.quantization
        return {
            "weight": q.weight.to_dict(),
            "activation": q.activation.to_dict(),
            "module_types": list(q.module_types),
            "rules": [r.to_dict() for r in q.rules],
            "first_layer_bits": q.first_layer_bits,
            "prediction_layer_bits": q.prediction_layer_bits,
        }


def _preset(w: int, a: int, mode: str = "qat", **calib) -> dict:
    return {
        "name": f"{'ptq-' if mode == 'ptq' else ''}w{w}a{a}",
        "mode": mode,
        "quantization": {"weight": {"bits": w}, "activation": {"bits": a}},
        "calibration": calib,
    }


def _fisher_preset(w: int, a: int) -> dict:
    return {**_preset(w, a), "name": f"w{w}a{a}-fisher",
            "mixed_precision": {"enabled": True, "budget": {"avg_weight_bits": float(w)}},
            # every 12 steps: one regulariser step costs about 4 plain steps (an extra forward and a double
            # backward; YOLO11n, CPU), so the amortised cost stays near 1.25x plain QAT
            "fisher_regularizer": {"enabled": True, "every": 12}}


PRESETS: dict[str, dict] = {
    "w8a8": _preset(8, 8),
    "w4a8": _preset(4, 8),
    "w4a4": _preset(4, 4),
    "w8a8-ptq": _preset(8, 8, "ptq", num_batches=16),
    # CR-QAT: two-stage curriculum (backbone, then neck + head) with distillation from the float model.
    "w4a4-crqat": {**_preset(4, 4), "name": "w4a4-crqat", "curriculum": {"enabled": True}, "distillation": {"enabled": True}},
    "w4a8-crqat": {**_preset(4, 8), "name": "w4a8-crqat", "curriculum": {"enabled": True}, "distillation": {"enabled": True}},
    "w4a8-ptq": _preset(4, 8, "ptq", num_batches=16),
    "w4a4-ptq": _preset(4, 4, "ptq", num_batches=16),
    # Block reconstruction (QDrop) with TASKQ's sparse outliers, detection-aware task regularisation and head-wise
    # reconstruction units; `ptq.method: adaround | qdrop` for the baselines, `ptq.<part>: false` for ablations.
    "w8a8-taskq": {**_preset(8, 8, "ptq", num_batches=16), "name": "w8a8-taskq", "ptq": {"method": "taskq"}},
    "w4a8-taskq": {**_preset(4, 8, "ptq", num_batches=16), "name": "w4a8-taskq", "ptq": {"method": "taskq"}},
    "w4a4-taskq": {**_preset(4, 4, "ptq", num_batches=16), "name": "w4a4-taskq", "ptq": {"method": "taskq"}},
    # Fisher-aware: mixed precision at the named average weight width (pinned 8-bit layers included) and the
    # Fisher-trace regulariser during QAT. Critical classes default to all; name them in `critical.classes`.
    "w4a8-fisher": _fisher_preset(4, 8),
    "w4a4-fisher": _fisher_preset(4, 4),
}


# Mappings that hold one of several alternatives: an override replaces the preset's instead of adding a key.
_REPLACED_ON_MERGE = {("mixed_precision", "budget")}


def _deep_merge(base: dict, override: Mapping, path: tuple = ()) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict) and path + (k,) not in _REPLACED_ON_MERGE:
            out[k] = _deep_merge(out[k], v, path + (k,))
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_recipe(source: "str | Path | Mapping | Recipe | None") -> Recipe:
    """Build a validated :class:`Recipe` from a preset name, a YAML file, a dict or a Recipe.

    A dict (or YAML) may name ``preset: w4a8`` and override any field of it.

    Raises:
        RecipeError: unknown preset or key, out-of-range bits, bad choices; the message names the culprit.
    """
    if source is None:
        raise RecipeError(f"no recipe given; pass a preset name {sorted(PRESETS)}, a YAML path or a dict")
    if isinstance(source, Recipe):
        return source
    if isinstance(source, (str, Path)):
        text = str(source)
        if text in PRESETS:
            return Recipe.from_dict(PRESETS[text])
        path = Path(text).expanduser()
        if path.suffix in (".yaml", ".yml", ".json") or path.exists():
            if not path.is_file():
                raise RecipeError(f"recipe file {str(path)!r} does not exist")
            import yaml

            data = yaml.safe_load(path.read_text()) or {}
            if not isinstance(data, Mapping):
                raise RecipeError(f"recipe file {str(path)!r} must hold a mapping, got {type(data).__name__}")
            # Recipes shipped for a trainer may nest ours under a `detq` key next to trainer arguments.
            data = data.get("detq", data) if isinstance(data.get("detq"), Mapping) else data
            return load_recipe(data)
        raise RecipeError(f"unknown recipe preset {text!r}; presets are {sorted(PRESETS)}, or give a YAML path or a dict")
    if isinstance(source, Mapping):
        data = dict(source)
        preset = data.pop("preset", None)
        if preset is not None:
            if preset not in PRESETS:
                raise RecipeError(f"unknown recipe preset {preset!r} in `preset`; presets are {sorted(PRESETS)}")
            data = _deep_merge(PRESETS[preset], data)
        return Recipe.from_dict(data)
    raise RecipeError(f"a recipe must be a preset name, a YAML path, a dict or a Recipe, got {type(source).__name__}")


def recipe_to_yaml(recipe: Recipe) -> str:
    import yaml

    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)


__all__ = [
    "Recipe",
    "QuantizationSection",
    "CalibrationSection",
    "QuantizerSpec",
    "LayerRule",
    "CurriculumSection",
    "DistillationSection",
    "CriticalSection",
    "MixedPrecisionSection",
    "FisherRegularizerSection",
    "PTQSection",
    "check_budget",
    "StageSpec",
    "RecipeError",
    "PRESETS",
    "load_recipe",
    "recipe_to_yaml",
    "RECIPE_VERSION",
]
