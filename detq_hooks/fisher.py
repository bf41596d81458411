"""Fisher-aware quantization, trainer-free core: the critical-category objective (logit-label
transformation), per-layer Fisher / Hessian traces, the exact mixed-precision integer program and the
Fisher-trace regulariser (a :class:`~detq_hooks.loss_terms.LossTerm`).

Nothing here imports a trainer. A trainer adapter (or a user) provides ``loss_fn(model, batch) -> scalar``
for the estimates and ``critical_loss(ctx) -> scalar`` for the regulariser; the detector families turn their
head outputs into the critical objective with :func:`critical_logits` / :func:`critical_targets`.

Example:
    >>> import torch, detq_hooks as dq
    >>> from detq_hooks import fisher
    >>> net = dq.quantize(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8),
    ...                   torch.nn.Tanh(), torch.nn.Linear(8, 2)), "w4a8")
    >>> data = [(torch.randn(8, 4), torch.randn(8, 2)) for _ in range(2)]
    >>> traces = fisher.fisher_traces(net, data, lambda m, b: (m(b[0]) - b[1]).pow(2).mean())
    >>> plan = fisher.plan_mixed_precision(net, traces, budget={"avg_weight_bits": 6.0})
    >>> fisher.apply_bits(net, plan.allocation)  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch
from torch import nn

from .distributed import all_reduce_
from .loss_terms import LossTerm, StepContext
from .modules import uncached_weights
from .quantizers import inside_range_mask, quantizer_mode
from .ranges import calibrate_weight_quantizer
from .recipe import MAX_BITS, MIN_BITS, RecipeError, check_budget
from .surgery import META_ATTR, quantized_layers, recipe_of

PINNED_ROLES = ("first", "prediction")
BITS_PER_MB = 8_000_000  # 1 MB = 10^6 bytes


class FisherError(ValueError):
    """A Fisher-aware step cannot run as asked; the message names the culprit. The model was not changed."""


# ============================================================================ critical-category objective
def resolve_critical_classes(names_or_ids: Sequence, class_names: Optional[Sequence[str]]) -> list[int]:
    """Class indices of the critical classes, sorted.

    Args:
        names_or_ids: class names (resolved against ``class_names``) and/or integer class indices. Empty
            means every class (needs ``class_names``).
        class_names: the data set's class names in index order (Ultralytics ``names``, MMDetection
            ``metainfo["classes"]``, a Lightning module attribute or the recipe); ``None`` if unknown.

    Raises:
        FisherError: an unknown name (the message lists the known names), an index out of range, a name
            without known class names, a class named twice.
    """
    if isinstance(class_names, Mapping):  # Ultralytics `names`: {index: name}
        class_names = [class_names[k] for k in sorted(class_names)]
    names = None if class_names is None else [str(n) for n in class_names]
    if not names_or_ids:
        if names is None:
            raise FisherError("`critical.classes` is empty (every class critical) but the class names are unknown; "
                              "name the critical classes by index")
        return list(range(len(names)))
    ids = []
    for c in names_or_ids:
        if isinstance(c, bool) or not isinstance(c, (str, int)):
            raise FisherError(f"`critical.classes` entry {c!r} must be a class name or an index")
        if isinstance(c, str):
            if names is None:
                raise FisherError(f"`critical.classes` names {c!r} but the trainer gives no class names; "
                                  "use class indices or give the names")
            if c not in names:
                raise FisherError(f"`critical.classes` names {c!r}, which is not a class of the data set; "
                                  f"known classes: {names}")
            i = names.index(c)
        else:
            i = int(c)
            if i < 0 or (names is not None and i >= len(names)):
                raise FisherError(f"`critical.classes` index {i} is out of range for {len(names) if names else '?'} classes")
        if i in ids:
            raise FisherError(f"`critical.classes` names class {i} ({c!r}) twice")
        ids.append(i)
    return sorted(ids)


def _split(num_classes: int, critical_ids: Sequence[int], no_object: Optional[int]) -> tuple[list[int], list[int]]:
    crit = sorted(int(c) for c in critical_ids)
    if not crit:
        raise FisherError("no critical class given")
    bad = [c for c in crit if c < 0 or c >= num_classes or c == no_object]
    if bad:
        raise FisherError(f"critical class ids {bad} are not object classes of a head with {num_classes} logits"
                          + (f" (no-object at {no_object})" if no_object is not None else ""))
    rest = [k for k in range(num_classes) if k not in set(crit) and k != no_object]
    return crit, rest


def critical_logits(
    logits: torch.Tensor,
    critical_ids: Sequence[int],
    kind: str = "sigmoid",
    merge: str = "logsumexp",
    no_object: Optional[int] = None,
) -> torch.Tensor:
    """Logit-label transformation of class logits ``(..., C)``: the critical classes, then one "other".

    * ``softmax`` heads (DETR family): ``z_other = logsumexp_{k∉C} z_k`` (the softmax keeps every critical
      class's probability, "other" gets the non-critical mass) or ``max``; the no-object logit (index
      ``no_object``, e.g. ``-1``) is kept last. Output ``(..., |C| + 1 [+ 1])``.
    * ``sigmoid`` heads (YOLO, RTMDet, Deformable DETR, FCOS, RetinaNet): "other" is the largest
      non-critical logit, so ``sigmoid(z_other) = max_{k∉C} sigmoid(z_k)``. Output ``(..., |C| + 1)``.

    When every class is critical there is no "other" column.
    """
    if kind not in ("sigmoid", "softmax"):
        raise FisherError(f"`kind` = {kind!r} is not one of ['sigmoid', 'softmax']")
    if merge not in ("logsumexp", "max"):
        raise FisherError(f"`merge` = {merge!r} is not one of ['logsumexp', 'max']")
    num = logits.shape[-1]
    if no_object is not None:
        if kind != "softmax":
            raise FisherError("`no_object` is a softmax-head class; sigmoid heads have none")
        no_object = no_object % num
    crit, rest = _split(num, critical_ids, no_object)
    parts = [logits[..., crit]]
    if rest:
        other = logits[..., rest]
        if kind == "softmax" and merge == "logsumexp":
            parts.append(torch.logsumexp(other, -1, keepdim=True))
        else:
            parts.append(other.amax(-1, keepdim=True))
    if no_object is not None:
        parts.append(logits[..., no_object : no_object + 1])
    return torch.cat(parts, -1)


def critical_targets(
    targets: torch.Tensor,
    critical_ids: Sequence[int],
    kind: str = "sigmoid",
    num_classes: Optional[int] = None,
    no_object: Optional[int] = None,
) -> torch.Tensor:
    """The targets that go with :func:`critical_logits`.

    * integer class labels ``(...,)`` (softmax heads; ``num_classes`` logits including a no-object index):
      a critical class becomes its position among the critical classes, a non-critical one "other"
      (``|C|``), no-object stays last.
    * dense targets ``(..., C)`` (scores, one-hot or soft): critical columns kept; "other" is the ``max`` of the
      non-critical targets for sigmoid heads and their sum (the probability mass) for softmax heads.
    """
    if kind not in ("sigmoid", "softmax"):
        raise FisherError(f"`kind` = {kind!r} is not one of ['sigmoid', 'softmax']")
    if not targets.is_floating_point():
        if num_classes is None:
            raise FisherError("integer class labels need `num_classes` (the number of logits)")
        nobj = None if no_object is None else no_object % num_classes
        crit, rest = _split(num_classes, critical_ids, nobj)
        table = torch.full((num_classes,), -1, dtype=torch.long)
        table[crit] = torch.arange(len(crit))
        if rest:
            table[rest] = len(crit)
        if nobj is not None:
            table[nobj] = len(crit) + (1 if rest else 0)
        if kind == "sigmoid" and nobj is not None:
            raise FisherError("`no_object` is a softmax-head class; sigmoid heads have none")
        return table.to(targets.device)[targets.long()]
    num = targets.shape[-1]
    nobj = None if no_object is None else no_object % num
    crit, rest = _split(num, critical_ids, nobj)
    parts = [targets[..., crit]]
    if rest:
        other = targets[..., rest]
        parts.append(other.sum(-1, keepdim=True) if kind == "softmax" else other.amax(-1, keepdim=True))
    if nobj is not None:
        parts.append(targets[..., nobj : nobj + 1])
    return torch.cat(parts, -1)


def critical_box_mask(labels: torch.Tensor, critical_ids: Sequence[int]) -> torch.Tensor:
    """Which ground truths (by class label) take part in the box terms of the critical objective."""
    ids = torch.as_tensor(sorted(int(c) for c in critical_ids), dtype=torch.long, device=labels.device)
    return torch.isin(labels.long(), ids)


def critical_head_outputs(head, critical_ids: Sequence[int], merge: str = "logsumexp", no_object: Optional[int] = None):
    """A :class:`~detq_hooks.distill.HeadOutputs` whose ``cls_logits`` are transformed by :func:`critical_logits`."""
    out = copy.copy(head)
    out.cls_logits = critical_logits(head.cls_logits, critical_ids, head.score_kind, merge, no_object)
    return out


# ============================================================================ Fisher / Hessian traces
def _quantized_weights(model: nn.Module, what: str) -> list[tuple[str, nn.Parameter]]:
    layers = [(n, m.weight) for n, m in quantized_layers(model)]
    if not layers:
        raise FisherError(f"{what} needs a model converted by detq-hooks; {type(model).__name__} has no quantized layer")
    return layers


class _EvalMode:
    """Eval mode (BatchNorm statistics and dropout untouched) for the duration of an estimate."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self):
        self.modes = {m: m.training for m in self.model.modules()}
        self.model.eval()

    def __exit__(self, *exc):
        for m, t in self.modes.items():
            m.training = t


def _reduce(sums: torch.Tensor, count: int) -> torch.Tensor:
    """Mean over every batch of every rank (identical on all ranks)."""
    total = torch.cat([sums.double().reshape(-1), torch.tensor([float(count)], dtype=torch.float64, device=sums.device)])
    all_reduce_(total, "sum")
    if total[-1] <= 0:
        raise FisherError("the Fisher estimate saw no batch")
    return total[:-1] / total[-1]


def fisher_traces(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    *,
    num_batches: Optional[int] = None,
) -> dict[str, float]:
    """Empirical Fisher trace per quantized layer: ``tr Fᵢ ≈ mean over batches of ‖∇_{Wᵢ} ℓ‖²``.

    The gradient is taken on the latent weights through the fake quantizers' straight-through estimator,
    in eval mode, with ``torch.autograd.grad`` (``.grad`` and BatchNorm statistics are left alone). Under
    torch.distributed the sums and batch counts are all-reduced, so every rank gets the mean over all
    ranks' batches.

    Run it after calibration (an activation quantizer without a range would take one from the first batch).
    Pass the unwrapped model, not its DDP wrapper: the reduction is done here.

    Args:
        loss_fn: ``loss_fn(model, batch) -> scalar``: the critical, full or mixed objective.
        num_batches: stop after this many batches (default: all).

    Raises:
        FisherError: the model has no quantized layer, or no batch was seen.
    """
    layers = _quantized_weights(model, "a Fisher estimate")
    weights = [w for _, w in layers]
    sums = torch.zeros(len(layers), dtype=torch.float64, device=weights[0].device)
    count = 0
    with _EvalMode(model):
        for i, batch in enumerate(batches):
            if num_batches is not None and i >= num_batches:
                break
            loss = loss_fn(model, batch)
            grads = torch.autograd.grad(loss, weights, allow_unused=True)
            sums += torch.stack([g.detach().double().pow(2).sum() if g is not None else sums.new_zeros(())
                                 for g in grads])
            count += 1
    means = _reduce(sums, count)
    return {n: float(v) for (n, _), v in zip(layers, means)}


def hutchinson_traces(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    *,
    num_batches: Optional[int] = None,
    samples: int = 1,
    seed: int = 0,
) -> dict[str, float]:
    """Hutchinson's estimate of each quantized layer's Hessian trace, ``E[vᵀ H v]`` with Rademacher ``v``.

    Double backprop through the fake quantizers' plain-autograd formula (``quantizer_mode("reference")``).
    Same reduction across ranks as :func:`fisher_traces`.
    """
    layers = _quantized_weights(model, "a Hutchinson estimate")
    weights = [w for _, w in layers]
    sums = torch.zeros(len(layers), dtype=torch.float64, device=weights[0].device)
    gen = torch.Generator().manual_seed(seed)
    count = 0
    with _EvalMode(model), quantizer_mode("reference"):
        for i, batch in enumerate(batches):
            if num_batches is not None and i >= num_batches:
                break
            loss = loss_fn(model, batch)
            grads = torch.autograd.grad(loss, weights, create_graph=True, allow_unused=True)
            pairs = [(k, g) for k, g in enumerate(grads) if g is not None and g.requires_grad]
            for s in range(samples):
                vs = [(torch.randint(0, 2, weights[k].shape, generator=gen) * 2 - 1).to(g) for k, g in pairs]
                dot = sum((g * v).sum() for (_, g), v in zip(pairs, vs))
                hv = torch.autograd.grad(dot, [weights[k] for k, _ in pairs], retain_graph=s + 1 < samples,
                                         allow_unused=True)
                for (k, _), v, h in zip(pairs, vs, hv):
                    if h is not None:
                        sums[k] += (h.detach() * v).double().sum() / samples
            count += 1
    means = _reduce(sums, count)
    return {n: float(v) for (n, _), v in zip(layers, means)}


# ============================================================================ mixed precision
def quantization_error(layer: nn.Module, bits: int, *, method: str = "mse", p: float = 2.4) -> float:
    """``‖Q_b(W) − W‖²`` of a quantized layer's weight at ``bits``: the layer's own weight-quantizer settings
    (per-channel symmetric by default) with the range re-fitted for ``b`` the way conversion fits it
    (:func:`~detq_hooks.ranges.calibrate_weight_quantizer`). The layer is not changed."""
    _check_bits_value("bits", bits)
    q = copy.deepcopy(layer.weight_quantizer)
    q.enabled = True
    q.bits = int(bits)
    with torch.no_grad():
        calibrate_weight_quantizer(q, layer.weight, method, p)
        w = layer.weight.detach().float()
        return float((q(w) - w).double().pow(2).sum())


def _check_bits_value(where: str, b: Any) -> None:
    if isinstance(b, bool) or not isinstance(b, int) or not MIN_BITS <= b <= MAX_BITS:
        raise FisherError(f"`{where}` = {b!r} is out of range; bits must be an integer in [{MIN_BITS}, {MAX_BITS}]")


def _check_candidates(candidates: Sequence[int]) -> list[int]:
    if not candidates:
        raise FisherError("`mixed_precision.candidates` is empty")
    for b in candidates:
        _check_bits_value("mixed_precision.candidates", b)
    if len(set(candidates)) != len(candidates):
        raise FisherError(f"`mixed_precision.candidates` = {list(candidates)} repeats a bit width")
    return sorted(int(b) for b in candidates)


@dataclass
class Allocation:
    """The solution of :func:`allocate_bits`: bits per layer, its objective and budget figures."""

    bits: dict[str, int]
    objective: float
    used: float  # the budget quantity at this allocation (avg bits, MB or BOPs ratio)
    limit: float  # the budget


def _budget_rows(kind: str, value: float, sizes: Mapping[str, int], macs: Optional[Mapping[str, int]],
                 fixed_bits: int) -> tuple[dict[str, int], int, Callable[[int], float]]:
    """Integer constraint ``Σ coef_i·b_i ≤ cap`` for a budget, and the map from ``Σ coef·b`` back to its unit."""
    if kind == "avg_weight_bits":
        total = sum(sizes.values())
        # Σ nᵢ·bᵢ ≤ B·Σ nᵢ; the small tolerance lets 4.0 mean 4.0 despite the float product.
        return dict(sizes), math.floor(value * total + 1e-9), lambda used: used / total
    if kind == "size_mb":
        return dict(sizes), math.floor(value * BITS_PER_MB + 1e-6) - fixed_bits, lambda used: (used + fixed_bits) / BITS_PER_MB
    if macs is None:
        raise FisherError("a `bops_ratio` budget needs each layer's multiply-accumulates (`macs`)")
    missing = [n for n in sizes if n not in macs]
    if missing:
        raise FisherError(f"`macs` lacks layer {missing[0]!r}")
    ref = 8 * sum(int(macs[n]) for n in sizes)
    return {n: int(macs[n]) for n in sizes}, math.floor(value * ref + 1e-9), lambda used: used / ref


def allocate_bits(
    sensitivities: Mapping[str, Mapping[int, float]],
    sizes: Mapping[str, int],
    candidates: Sequence[int] = (2, 4, 8),
    budget: Mapping[str, float] = None,  # type: ignore[assignment]
    pinned: Optional[Mapping[str, int]] = None,
    *,
    macs: Optional[Mapping[str, int]] = None,
    fixed_bits: int = 0,
) -> Allocation:
    """Per-layer weight bits minimising ``Σ Ωᵢ(bᵢ)`` under a budget, solved exactly (``scipy.optimize.milp``).

    Args:
        sensitivities: ``Ωᵢ(b)`` for every free layer and candidate ``b`` (e.g. ``tr Fᵢ·‖Q_b(Wᵢ) − Wᵢ‖²``).
        sizes: weight elements of every layer, the pinned ones included (the average is over all of them).
        candidates: the bit widths a free layer may get (each in [2, 8]).
        budget: one of ``{"avg_weight_bits": B}``, ``{"size_mb": S}``, ``{"bops_ratio": r}``.
        pinned: layers whose bits are fixed (first and prediction layers); they count in the budget.
        macs: per-layer multiply-accumulates times the layer's input bits (for ``bops_ratio``, relative to
            every weight at 8 bits).
        fixed_bits: bits of everything else in the file (float parameters, biases) for ``size_mb``.

    Raises:
        FisherError: a candidate outside 2-8, a layer without size or sensitivity, or a budget no allocation
            meets (the message gives the smallest feasible budget).
    """
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    try:
        kind, value = check_budget(budget, "mixed_precision.budget")
    except RecipeError as e:
        raise FisherError(str(e)) from None
    cands = _check_candidates(candidates)
    pinned = dict(pinned or {})
    for n, b in pinned.items():
        _check_bits_value(f"pinned[{n!r}]", b)
        if n not in sizes:
            raise FisherError(f"pinned layer {n!r} has no size")
    free = [n for n in sizes if n not in pinned]
    missing = [n for n in free if n not in sensitivities or any(b not in sensitivities[n] for b in cands)]
    if missing:
        raise FisherError(f"layer {missing[0]!r} has no sensitivity for every candidate {cands}")
    coef, cap, to_unit = _budget_rows(kind, value, sizes, macs, int(fixed_bits))
    fixed_use = sum(coef[n] * b for n, b in pinned.items())
    least = fixed_use + sum(coef[n] * cands[0] for n in free)
    if least > cap:
        pins = f" and {len(pinned)} pinned layer(s) at {sorted(set(pinned.values()))} bits" if pinned else ""
        raise FisherError(
            f"`mixed_precision.budget.{kind}` = {value:g} cannot be met: with candidates {cands}{pins} the smallest "
            f"feasible budget is {kind} = {_fmt(_round_up(to_unit(least), 6))}"
        )
    if not free:
        used = fixed_use
        return Allocation({n: int(b) for n, b in pinned.items()}, 0.0, to_unit(used), value)
    nb = len(cands)
    omega = np.array([[float(sensitivities[n][b]) for b in cands] for n in free])
    scale = np.abs(omega).max() or 1.0
    c = (omega / scale).reshape(-1)
    one_hot = np.kron(np.eye(len(free)), np.ones(nb))
    ints = [coef[n] * b for n in free for b in cands]
    # Integer row divided by its gcd: a solver tolerance far below 1 cannot let an over-budget choice through.
    unit = math.gcd(*ints) or 1
    usage = np.array([v // unit for v in ints], dtype=np.float64)
    cons = [LinearConstraint(one_hot, 1, 1), LinearConstraint(usage[None, :], -np.inf, float((cap - fixed_use) // unit))]
    res = milp(c, constraints=cons, integrality=np.ones_like(c), bounds=Bounds(0, 1),
               options={"mip_rel_gap": 0.0})
    if res.x is None:
        raise FisherError(f"the mixed-precision program found no solution ({res.message})")
    choice = np.round(res.x).reshape(len(free), nb).argmax(1)
    bits = {n: cands[int(k)] for n, k in zip(free, choice)}
    used = fixed_use + sum(coef[n] * b for n, b in bits.items())
    if used > cap:  # a solver tolerance let the budget slip: never hand out an over-budget plan
        raise FisherError(f"the solver's allocation uses {to_unit(used):g} > budget {kind} = {value:g}")
    bits.update({n: int(b) for n, b in pinned.items()})
    objective = float(sum(sensitivities[n][bits[n]] for n in free))
    return Allocation({n: bits[n] for n in sizes}, objective, to_unit(used), value)


def _fmt(x: float) -> str:
    return f"{x:.6f}".rstrip("0").rstrip(".")


def _round_up(x: float, digits: int) -> float:
    f = 10**digits
    return math.ceil(x * f - 1e-9) / f


@dataclass
class MixedPrecisionPlan:
    """Everything the mixed-precision decision was made from (for the report and the checkpoint's layer plan)."""

    allocation: dict[str, int]
    traces: dict[str, float]
    errors: dict[str, dict[int, float]]  # ‖Q_b(W) − W‖² per layer and candidate
    sizes: dict[str, int]
    pinned: dict[str, int]
    budget: dict
    used: float
    objective: float
    uniform_objective: dict[int, float] = field(default_factory=dict)  # Σ Ω at each uniform width (free layers)

    def summary(self) -> str:
        """One line for the trainers' logs: ``3.979 average weight bits (budget …), bits [2, 4, 8] over 87 layers``."""
        return (f"{self.used:.3f} average weight bits (budget {self.budget}), bits {sorted(set(self.allocation.values()))} "
                f"over {len(self.allocation)} layers")


def plan_mixed_precision(
    model: nn.Module,
    traces: Mapping[str, float],
    *,
    budget: Mapping[str, float],
    candidates: Sequence[int] = (2, 4, 8),
    pinned: Optional[Mapping[str, int]] = None,
    macs: Optional[Mapping[str, int]] = None,
    method: Optional[str] = None,
    p: Optional[float] = None,
) -> MixedPrecisionPlan:
    """Fisher-aware bits for a converted model (the model is not changed; :func:`apply_bits` applies them).

    ``Ωᵢ(b) = tr Fᵢ·‖Q_b(Wᵢ) − Wᵢ‖²``. Layers the recipe pins (role ``first`` / ``prediction``) keep their
    bits and count in the budget, as do layers a recipe rule gives ``weight_bits``; ``pinned`` adds more.
    ``size_mb`` counts every other parameter at fp32.
    """
    layers = dict(quantized_layers(model))
    if not layers:
        raise FisherError(f"mixed precision needs a model converted by detq-hooks; {type(model).__name__} has no quantized layer")
    cands = _check_candidates(candidates)
    missing = [n for n in layers if n not in traces]
    if missing:
        raise FisherError(f"no Fisher trace for quantized layer {missing[0]!r}")
    calib = (getattr(model, META_ATTR, None) or {}).get("recipe", {}).get("calibration", {})
    method = method or calib.get("weight_method", "mse")
    p = p if p is not None else calib.get("mse_norm", 2.4)
    pins = {n: m.weight_quantizer.bits for n, m in layers.items() if getattr(m, "detq_layer_role", "body") in PINNED_ROLES}
    recipe = recipe_of(model)
    for rule in recipe.quantization.rules if recipe is not None else []:  # a rule that sets bits pins them too
        if rule.weight_bits is not None:
            pins.update({n: m.weight_quantizer.bits for n, m in layers.items() if rule.matches(n, m.float_class.__name__)})
    for n, b in (pinned or {}).items():
        if n not in layers:
            raise FisherError(f"`pinned` names {n!r}, which is not a quantized layer")
        pins[n] = b
    sizes = {n: m.weight.numel() for n, m in layers.items()}
    errors = {n: {b: quantization_error(m, b, method=method, p=p) for b in cands} for n, m in layers.items() if n not in pins}
    # A layer the objective does not reach (trace 0, e.g. the box branch of a batch without critical boxes)
    # would be indifferent to its bits and take the narrowest; a floor of 1e-6 of the largest trace keeps
    # its quantization error in play, so spare budget goes there instead of being left unused.
    largest = max([float(traces[n]) for n in errors] or [0.0])
    floor = 1e-6 * largest
    if errors and not largest > 0:
        # Nothing to rank by: every allocation would tie and the solver could hand out the narrowest bits with the
        # budget unspent. Equal weights make it the allocation of least quantization error within the budget.
        warnings.warn("mixed precision: every free layer's Fisher trace is 0 (the objective reached none of them: "
                      "random weights with BatchNorms never trained, or batches without the critical classes); bits "
                      "are allocated by quantization error alone", stacklevel=2)
        floor = 1.0
    omega = {n: {b: max(float(traces[n]), floor) * e for b, e in errs.items()} for n, errs in errors.items()}
    quantized_weight_ids = {id(m.weight) for m in layers.values()}
    fixed_bits = 32 * sum(t.numel() for t in model.parameters() if id(t) not in quantized_weight_ids)
    alloc = allocate_bits(omega, sizes, cands, budget, pins, macs=macs, fixed_bits=fixed_bits)
    uniform = {b: sum(o[b] for o in omega.values()) for b in cands}
    return MixedPrecisionPlan(alloc.bits, {n: float(traces[n]) for n in layers}, errors, sizes, pins, dict(budget),
                              alloc.used, alloc.objective, uniform)


def apply_bits(model: nn.Module, allocation: Mapping[str, int], *, method: Optional[str] = None,
               p: Optional[float] = None) -> nn.Module:
    """Set each named layer's ``weight_quantizer.bits`` and re-fit its weight range, all or nothing.

    The bits live in the quantizers' buffers, so :func:`detq_hooks.checkpoint.layer_plan` (and the
    checkpoint's saved plan) carries them through save and resume.
    """
    layers = dict(quantized_layers(model))
    if not layers:
        raise FisherError(f"apply_bits needs a model converted by detq-hooks; {type(model).__name__} has no quantized layer")
    for n, b in allocation.items():  # check everything before touching anything
        if n not in layers:
            raise FisherError(f"the allocation names {n!r}, which is not a quantized layer of {type(model).__name__}")
        _check_bits_value(f"allocation[{n!r}]", b)
    calib = (getattr(model, META_ATTR, None) or {}).get("recipe", {}).get("calibration", {})
    method = method or calib.get("weight_method", "mse")
    p = p if p is not None else calib.get("mse_norm", 2.4)
    for n, b in allocation.items():
        q = layers[n].weight_quantizer
        if q.bits != int(b):
            q.bits = int(b)
            calibrate_weight_quantizer(q, layers[n].weight, method, p)
    return model


def sensitivity_loss(objective: str, all_loss: Optional[Callable] = None, critical_loss: Optional[Callable] = None,
                     alpha: float = 1.0) -> Callable:
    """The objective of the Fisher estimate: ``critical`` (L_crit), ``all`` (L_all) or ``mix``
    (``alpha·L_all + L_crit``), from callables with the same signature (``(model, batch)`` or ``(ctx)``)."""
    need = {"critical": ("critical_loss",), "all": ("all_loss",), "mix": ("all_loss", "critical_loss")}
    if objective not in need:
        raise FisherError(f"`mixed_precision.objective` = {objective!r} is not one of {sorted(need)}")
    given = {"all_loss": all_loss, "critical_loss": critical_loss}
    missing = [k for k in need[objective] if given[k] is None]
    if missing:
        raise FisherError(f"`mixed_precision.objective` = {objective!r} needs `{missing[0]}`")
    if objective == "critical":
        return critical_loss  # type: ignore[return-value]
    if objective == "all":
        return all_loss  # type: ignore[return-value]
    return lambda *args: alpha * all_loss(*args) + critical_loss(*args)  # type: ignore[misc]


def layer_macs(model: nn.Module, batch: Any, forward_fn: Optional[Callable[[nn.Module, Any], Any]] = None) -> dict[str, int]:
    """Per quantized layer, multiply-accumulates per sample times the layer's input bits (32 for a float
    input): the coefficients of a ``bops_ratio`` budget, measured with one forward pass in eval mode."""
    layers = quantized_layers(model)
    if not layers:
        raise FisherError(f"layer_macs needs a model converted by detq-hooks; {type(model).__name__} has no quantized layer")
    found: dict[str, int] = {}

    def hook(mod, args, out, name):
        # Conv: every weight once per output position; transposed conv: once per input position;
        # linear: once per token (per sample, so a batch of any size gives the same figure).
        if isinstance(mod, nn.ConvTranspose2d):
            positions = args[0].shape[-2] * args[0].shape[-1]
        elif isinstance(mod, nn.Conv2d):
            positions = out.shape[-2] * out.shape[-1]
        else:
            positions = out.numel() // (out.shape[0] * out.shape[-1]) if out.dim() > 1 else 1
        macs = mod.weight.numel() * positions
        q = mod.input_quantizer
        abits = q.bits if q is not None and q.enabled else 32
        found[name] = found.get(name, 0) + int(macs) * abits

    handles = [m.register_forward_hook(lambda mod, a, o, n=n: hook(mod, a, o, n)) for n, m in layers]
    try:
        with _EvalMode(model), torch.no_grad():
            (forward_fn or (lambda m, b: m(b)))(model, batch)
    finally:
        for h in handles:
            h.remove()
    return {n: found.get(n, 0) for n, _ in layers}


def mixed_precision_from_recipe(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    section,
    *,
    macs: Optional[Mapping[str, int]] = None,
    apply: bool = True,
) -> MixedPrecisionPlan:
    """The recipe's ``mixed_precision`` on a converted model: estimate the traces (``estimator``,
    ``num_batches``), solve for the bits and (``apply``) set them. ``loss_fn`` is the recipe's ``objective``
    (see :func:`sensitivity_loss`). Nothing is applied when any step fails."""
    if section.budget is None:
        raise FisherError("`mixed_precision.budget` is missing")
    _quantized_weights(model, "mixed precision")
    if section.estimator == "hutchinson":
        traces = hutchinson_traces(model, batches, loss_fn, num_batches=section.num_batches,
                                   samples=section.hutchinson_samples)
    else:
        traces = fisher_traces(model, batches, loss_fn, num_batches=section.num_batches)
    if "bops_ratio" in section.budget and macs is None:
        raise FisherError("a `bops_ratio` budget needs `macs` (see layer_macs)")
    plan = plan_mixed_precision(model, traces, budget=section.budget, candidates=section.candidates, macs=macs)
    if apply:
        apply_bits(model, plan.allocation)
    return plan


def average_weight_bits(model: nn.Module) -> float:
    """Mean weight bits over every quantized weight element."""
    layers = quantized_layers(model)
    total = sum(m.weight.numel() for _, m in layers)
    return sum(m.weight.numel() * m.weight_quantizer.bits for _, m in layers) / max(total, 1)


# ============================================================================ Fisher-trace regulariser
def _weights_of(model: nn.Module) -> list[nn.Parameter]:
    return [w for _, w in _quantized_weights(model, "the Fisher regulariser") if w.requires_grad]


class _FiniteDifferencePenalty(torch.autograd.Function):
    """``‖g‖²`` with ``g = ∇_θ L(θ)``, whose backward is ``2·H·g`` by a finite difference of gradients:
    ``H·g ≈ (∇L(θ + ε·ĝ) − ∇L(θ))·‖g‖/ε``. Both gradients are taken in forward (the weights are moved by
    ``ε·ĝ`` through ``.data`` and restored bit for bit), so backward needs no re-entrant autograd."""

    @staticmethod
    def forward(ctx, gradient_at, eps, *weights):
        g = gradient_at()
        norm = torch.sqrt(sum(x.double().pow(2).sum() for x in g))
        value = norm.pow(2).to(weights[0].dtype)
        if float(norm) == 0.0:
            ctx.hv = [torch.zeros_like(w) for w in weights]
            return value
        saved = [w.data.clone() for w in weights]
        step = eps / float(norm)
        for w, gi in zip(weights, g):
            w.data.add_(gi, alpha=step)
        try:
            g2 = gradient_at()
        finally:
            for w, s in zip(weights, saved):
                w.data.copy_(s)
        ctx.hv = [(b - a) * (float(norm) / eps) for a, b in zip(g, g2)]
        return value

    @staticmethod
    def backward(ctx, grad_out):
        return (None, None, *[2.0 * grad_out * hv for hv in ctx.hv])


class FisherRegularizer(LossTerm):
    """``λ·tr F_crit`` with ``tr F ≈ ‖∇_θ L_crit‖²`` over the quantized weights, as a loss term.

    Its gradient is the Hessian-vector product ``2λ·H·g``: by double backprop (``create_graph=True``, the
    critical loss evaluated with the fake quantizers' plain-autograd formula) or by a finite difference of two
    gradients. ``hvp="auto"`` tries double backprop once and falls back to the finite difference when an op
    has no double backward. Gradients reach the latent weights through the straight-through estimator.

    Args:
        critical_loss: ``critical_loss(ctx) -> scalar``. For the finite difference (and to be safe, always)
            it must run the model on ``ctx.batch`` itself, not only read recorded outputs.
        weight: λ.
        every: apply every k-th call (other calls add an exact zero).
        warmup: fraction of training over which λ ramps up linearly; ``progress`` (0..1) is set by the
            session or adapter through :meth:`set_progress`.
        hvp: ``auto``, ``double`` or ``finite_difference``.
        epsilon: the finite-difference step.
        max_share: the penalty of one step is at most this multiple of the step's task loss (the trainer's own
            loss, which the adapters pass as ``ctx.task_loss``; the critical loss of the batch where none is
            given); a larger one is scaled down, its gradient with it (the factor is logged as
            ``fisher_reg_scale``). The trace is not normalised: ``‖∇L‖²`` grows with the loss's scale and the
            number of weights, and on a model whose first trace is thousands of times its loss a fixed λ lets one
            step wreck the weights. ``None``: no cap.

    Example:
        >>> term = FisherRegularizer(lambda ctx: loss_fn(ctx.model, ctx.batch), weight=0.01)  # doctest: +SKIP
        >>> session.add_loss_term(term)  # doctest: +SKIP
    """

    name = "fisher_reg"

    def __init__(self, critical_loss: Callable[[StepContext], torch.Tensor], *, weight: float = 1e-2, every: int = 1,
                 warmup: float = 0.0, hvp: str = "auto", epsilon: float = 1e-3,
                 max_share: Optional[float] = None) -> None:
        if not callable(critical_loss):
            raise FisherError(f"`critical_loss` must be a callable ctx -> scalar, got {type(critical_loss).__name__}")
        if hvp not in ("auto", "double", "finite_difference"):
            raise FisherError(f"`fisher_regularizer.hvp` = {hvp!r} is not one of ['auto', 'double', 'finite_difference']")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise FisherError(f"`fisher_regularizer.every` = {every!r} must be a positive integer")
        if not (isinstance(weight, (int, float)) and weight >= 0):
            raise FisherError(f"`fisher_regularizer.weight` = {weight!r} must be a number >= 0")
        if not (isinstance(warmup, (int, float)) and 0 <= warmup <= 1):
            raise FisherError(f"`fisher_regularizer.warmup` = {warmup!r} must be in [0, 1]")
        if not (isinstance(epsilon, (int, float)) and epsilon > 0):
            raise FisherError(f"`fisher_regularizer.epsilon` = {epsilon!r} must be > 0")
        if max_share is not None and not (isinstance(max_share, (int, float)) and not isinstance(max_share, bool)
                                          and max_share > 0):
            raise FisherError(f"`fisher_regularizer.max_share` = {max_share!r} must be a number > 0 or null")
        self.max_share = None if max_share is None else float(max_share)
        self.critical_loss, self.weight, self.every = critical_loss, float(weight), every
        self.warmup, self.hvp, self.epsilon = float(warmup), hvp, float(epsilon)
        self.progress = 0.0
        self.calls = 0
        self.method: Optional[str] = None if hvp == "auto" else hvp
        self.last_trace: Optional[float] = None
        self.last_loss: Optional[float] = None  # the critical loss the last trace was measured on
        self.last_scale = 1.0
        self.last_task_loss: Optional[float] = None  # what the trainer gave as the step's task loss

    @classmethod
    def from_recipe(cls, section, critical_loss: Callable[[StepContext], torch.Tensor]) -> "FisherRegularizer":
        return cls(critical_loss, weight=section.weight, every=section.every, warmup=section.warmup,
                   hvp=section.hvp, epsilon=section.epsilon, max_share=section.max_share)

    def check(self, model: nn.Module) -> None:
        """Before training: the model has quantized weights to regularise (raises :class:`FisherError`)."""
        _weights_of(model)

    def set_progress(self, progress: float) -> None:
        self.progress = float(progress)

    def current_weight(self) -> float:
        if self.warmup <= 0:
            return self.weight
        return self.weight * min(1.0, max(0.0, self.progress) / self.warmup)

    def __call__(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        weights = _weights_of(ctx.model)
        self.calls += 1
        lam = self.current_weight()
        if (self.calls - 1) % self.every or lam == 0.0:
            return {self.name: weights[0].new_zeros(())}
        trace = self.trace(ctx, weights)
        self.last_trace = float(trace.detach())
        ctx.logs[self.name + "_trace"] = self.last_trace
        self.last_task_loss = None if ctx.task_loss is None else float(ctx.task_loss)
        self.last_scale = self._cap(lam * self.last_trace, self.last_task_loss)
        if self.max_share is not None:
            ctx.logs[self.name + "_scale"] = self.last_scale
        return {self.name: (lam * self.last_scale) * trace}

    def _cap(self, penalty: float, task_loss: Optional[float]) -> float:
        """The factor that keeps ``penalty`` at most ``max_share`` times the task loss (1 when it is)."""
        yardstick = task_loss if task_loss is not None else self.last_loss
        if self.max_share is None or yardstick is None or penalty <= 0:
            return 1.0
        limit = self.max_share * abs(yardstick)
        return 1.0 if penalty <= limit else limit / penalty

    def trace(self, ctx: StepContext, weights: Optional[list[nn.Parameter]] = None) -> torch.Tensor:
        """``‖∇_θ L_crit‖²`` over the quantized weights, differentiable (its gradient is ``2·H·g``)."""
        weights = weights if weights is not None else _weights_of(ctx.model)
        buffers = {k: b.clone() for k, b in ctx.model.named_buffers()}
        try:
            # Eval mode, like the Fisher estimate of mixed precision: BatchNorm uses its running statistics, so
            # the trace is a property of the weights, not of how the few images of a batch normalise each other
            # (train-mode gradients of a small batch are orders of magnitude larger and noisier).
            with _EvalMode(ctx.model):
                return self._trace(ctx, weights)
        finally:  # the regulariser's own forwards must not move BatchNorm statistics
            named = dict(ctx.model.named_buffers())
            for k, b in buffers.items():
                if k in named and not torch.equal(named[k], b):
                    named[k].data.copy_(b)  # .data: a buffer the graph saved keeps its version

    def _trace(self, ctx: StepContext, weights: list[nn.Parameter]) -> torch.Tensor:
        if self.method == "finite_difference":
            return self._finite_difference(ctx, weights)
        try:
            value = self._double(ctx, weights)
        except (RuntimeError, NotImplementedError) as e:
            if self.method == "double":
                raise FisherError(f"`fisher_regularizer.hvp` = 'double' but the critical loss has no double backward ({e})") from e
            self.method = "finite_difference"
            return self._finite_difference(ctx, weights)
        if self.method is None or self.hvp == "double":  # probe once (auto) / check (double)
            blocked = _no_double_backward(value)
            if blocked and self.hvp == "double":
                raise FisherError(f"`fisher_regularizer.hvp` = 'double' but autograd node {blocked!r} of the critical loss "
                                  "has no double backward; use hvp 'auto' or 'finite_difference'")
            if blocked:
                self.method = "finite_difference"
                return self._finite_difference(ctx, weights)
            self.method = "double"
        return value

    def _double(self, ctx: StepContext, weights: list[nn.Parameter]) -> torch.Tensor:
        with quantizer_mode("reference"):
            loss = self.critical_loss(ctx)
        self.last_loss = float(loss.detach())
        grads = torch.autograd.grad(loss, weights, create_graph=True, allow_unused=True)
        return sum(g.pow(2).sum() for g in grads if g is not None)

    def _finite_difference(self, ctx: StepContext, weights: list[nn.Parameter]) -> torch.Tensor:
        replay = _STELinearisation(ctx.model)

        def gradient_at() -> list[torch.Tensor]:
            with torch.enable_grad(), replay:
                loss = self.critical_loss(ctx)
                if replay.passes == 0:  # the first pass is at the current weights
                    self.last_loss = float(loss.detach())
                grads = torch.autograd.grad(loss, weights, allow_unused=True)
            return [torch.zeros_like(w) if g is None else g.detach() for w, g in zip(weights, grads)]

        return _FiniteDifferencePenalty.apply(gradient_at, self.epsilon, *weights)


def _no_double_backward(value: torch.Tensor) -> Optional[str]:
    """The name of an autograd node in ``value``'s graph that fails when differentiated (a ``once_differentiable``
    Function, an op without a double-backward formula), or ``None``. ``backward()`` runs every node of the graph,
    so such a node fails the trainer's backward even where ``autograd.grad`` w.r.t. the weights would not."""
    seen, stack = set(), [value.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        name = type(node).__name__
        if name in ("Error", "NotImplemented", "DelayedError"):
            return name
        stack.extend(f for f, _ in node.next_functions)
    return None


class _STELinearisation:
    """The fake quantizers as their straight-through linearisation for the finite difference.

    Rounding is piecewise constant: moving the latent weights by ``ε·ĝ`` changes almost no integer code,
    so a plain finite difference of gradients is zero. The straight-through estimator treats each quantizer
    as ``x ↦ Q(x₀) + m₀⊙(x − x₀)`` (``m₀``: inside the integer range) around the point it was evaluated at.
    The first pass (entered once) records ``x₀``, ``Q(x₀)`` and ``m₀`` per quantizer call; the second pass
    replays that linearisation, so the difference of the two gradients is the Hessian-vector product of the
    same function whose Hessian double backprop differentiates.
    """

    def __init__(self, model: nn.Module) -> None:
        from .quantizers import iter_quantizers

        self.quantizers = [q for _, q in iter_quantizers(model)]
        self.records: dict[int, list] = {}
        self.passes = 0

    def __enter__(self):
        self.replay = self.passes > 0
        self.calls = {id(q): 0 for q in self.quantizers}
        self.handles = [q.register_forward_hook(self._hook) for q in self.quantizers]
        self.uncached = uncached_weights()  # every weight quantizer call must reach the hook, in both passes
        self.uncached.__enter__()
        return self

    def __exit__(self, *exc):
        self.uncached.__exit__(*exc)
        for h in self.handles:
            h.remove()
        self.passes += 1

    def _hook(self, q, args, out):
        if not q.enabled or q.observer is not None:
            return None
        x = args[0]
        k = self.calls[id(q)]
        self.calls[id(q)] = k + 1
        if not self.replay:
            # clone: a weight's storage is moved in place by the finite difference
            self.records.setdefault(id(q), []).append((x.detach().clone(), out.detach(), _inside_mask(q, x.detach())))
            return None
        x0, y0, m0 = self.records[id(q)][k]
        return y0 + (x.to(y0.dtype) - x0) * m0


def _inside_mask(q, x: torch.Tensor) -> torch.Tensor:
    return inside_range_mask(q, x).to(x.dtype)


__all__ = [
    "FisherError",
    "resolve_critical_classes",
    "critical_logits",
    "critical_targets",
    "critical_box_mask",
    "critical_head_outputs",
    "fisher_traces",
    "hutchinson_traces",
    "quantization_error",
    "allocate_bits",
    "Allocation",
    "plan_mixed_precision",
    "MixedPrecisionPlan",
    "apply_bits",
    "average_weight_bits",
    "sensitivity_loss",
    "layer_macs",
    "mixed_precision_from_recipe",
    "FisherRegularizer",
]
