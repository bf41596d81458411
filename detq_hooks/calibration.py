"""Range calibration: min-max, percentile, MSE (Lp) search and entropy (KL), over the caller's batches.

Activation statistics are gathered by observers attached to every enabled activation quantizer while the
batches run through the model (quantizers pass their input through unchanged meanwhile). Each observer
keeps the exact min/max and a fixed-size random subsample of the values; ranges are computed from those.
Under ``torch.distributed`` the min/max are all-reduced and the subsamples all-gathered, and the final
ranges are broadcast from rank 0, so every rank ends with identical scales.
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from . import distributed as dist_utils
from .quantizers import FakeQuantizer, iter_quantizers
from .ranges import MAX_SEARCH_SAMPLES, calibrate_weight_quantizer, entropy_range, mse_range, percentile_range
from .recipe import CALIBRATORS, CalibrationSection, load_recipe
from .sharing import is_shared, share_inputs
from .surgery import is_quantized, quantized_layers, recipe_of


class CalibrationError(RuntimeError):
    """Calibration could not produce valid ranges (no batches, NaN/inf activations, ...). The model's
    quantizers were restored to their state before the call."""


# ------------------------------------------------------------------------------------------ observers
class RangeObserver:
    """Collects the exact min/max of what a quantizer sees and a random subsample of its values."""

    def __init__(self, name: str, samples_per_batch: int, generator: torch.Generator) -> None:
        self.name = name
        self.samples_per_batch = samples_per_batch
        self.generator = generator
        self.lo = math.inf
        self.hi = -math.inf
        self.samples: list[torch.Tensor] = []
        self.batch_index = 0

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1)
        if x.numel() == 0:
            return
        if not torch.isfinite(x).all():
            bad = "NaN" if torch.isnan(x).any() else "inf"
            raise CalibrationError(f"{bad} in the input of quantizer {self.name!r} during calibration batch {self.batch_index}")
        self.lo = min(self.lo, x.min().item())
        self.hi = max(self.hi, x.max().item())
        if x.numel() > self.samples_per_batch:
            idx = torch.randint(x.numel(), (self.samples_per_batch,), generator=self.generator).to(x.device)
            x = x[idx]
        self.samples.append(x.cpu())

    def gathered(self) -> tuple[float, float, torch.Tensor]:
        lo = torch.tensor([self.lo], dtype=torch.float64)
        hi = torch.tensor([self.hi], dtype=torch.float64)
        dist_utils.all_reduce_(lo, "min")
        dist_utils.all_reduce_(hi, "max")
        values = torch.cat(self.samples) if self.samples else torch.zeros(0)
        values = dist_utils.all_gather_cat(values)
        return lo.item(), hi.item(), values


def _check_every_layer_ran(observers: dict[str, RangeObserver], num_batches: int) -> None:
    """All layers whose input quantizer saw nothing on any rank, named together with the rule that keeps them
    float (a collective: every rank reaches the same verdict)."""
    if not observers:
        return
    ran = torch.tensor([float(math.isfinite(o.lo)) for o in observers.values()])
    dist_utils.all_reduce_(ran, "max")
    idle = [n.removesuffix(".input_quantizer") for n, r in zip(observers, ran.tolist()) if not r]
    if not idle:
        return
    shown = ", ".join(repr(n) for n in idle[:6]) + (f" and {len(idle) - 6} more" if len(idle) > 6 else "")
    rules = ", ".join(f"{{name: '{n}', quantize: false}}" for n in idle)  # module names have no glob characters
    raise CalibrationError(
        f"{len(idle)} quantized layer(s) never ran during calibration ({num_batches} batch(es)): {shown}. Their "
        "forward did not run on these batches: a branch that runs only in training or only for some inputs, or a "
        "parent that reads the layer's weight directly (TOOD's task decomposition does), so their input has no "
        f"range. Keep them float with recipe rules: quantization.rules: [{rules}], or calibrate with a forward that "
        "runs them"
    )


def compute_range(obs: RangeObserver, q: FakeQuantizer, cfg: CalibrationSection) -> tuple[float, float]:
    lo, hi, values = obs.gathered()  # not empty: _check_every_layer_ran refused quantizers that saw nothing
    if values.numel() > MAX_SEARCH_SAMPLES:  # the searches cost O(candidates x samples): bound them
        g = torch.Generator().manual_seed(0)
        values = values[torch.randperm(values.numel(), generator=g)[:MAX_SEARCH_SAMPLES]]
    if cfg.method == "minmax":
        return (-max(abs(lo), abs(hi)), max(abs(lo), abs(hi))) if q.symmetric else (lo, hi)
    if cfg.method == "percentile":
        return percentile_range(values, cfg.percentile, q.symmetric)
    if cfg.method == "mse":
        return mse_range(values, lo, hi, q.bits, q.symmetric, cfg.mse_norm)
    if cfg.method == "entropy":
        return entropy_range(values, lo, hi, q.bits, q.symmetric)
    raise ValueError(f"calibration method {cfg.method!r} is not one of {list(CALIBRATORS)}")


# ------------------------------------------------------------------------------------------ entry point
@dataclass
class CalibrationResult:
    num_batches: int
    method: str
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    # the Fisher-aware bit allocation that followed calibration (detq_hooks.fisher.MixedPrecisionPlan), if any
    mixed_precision: Any = None
    # PTQ block reconstruction that followed (detq_hooks.reconstruction.ReconstructionResult), if any
    reconstruction: Any = None


def default_forward(model: nn.Module, batch: Any) -> Any:
    """``model(*batch)`` for a tuple/list, ``model(**batch)`` for a dict, else ``model(batch)``."""
    if isinstance(batch, (list, tuple)):
        return model(*batch)
    if isinstance(batch, dict):
        return model(**batch)
    return model(batch)


def _snapshot(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    return {n: {k: v.detach().clone() for k, v in q.state_dict().items()} for n, q in iter_quantizers(model)}


def _restore(model: nn.Module, snap) -> None:
    for n, q in iter_quantizers(model):
        q.load_state_dict(snap[n])


def _check_finite_parameters(model: nn.Module) -> None:
    """A NaN/inf weight would surface as a NaN activation far downstream; name the parameter instead. The usual
    cause is a parameter allocated uninitialised (``nn.Parameter(torch.Tensor(n, d))``, e.g. Deformable DETR's
    ``level_embed``) whose ``init_weights()`` or checkpoint never ran, as in ``Runner.test()`` without ``load_from``."""
    bad = [n for n, p in model.named_parameters() if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        shown = ", ".join(repr(n) for n in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise CalibrationError(
            f"the model's parameters {shown} hold NaN/inf before calibration: load the trained checkpoint (or run the "
            "model's init_weights()) before calibrating; nothing was changed")


def untrained_batchnorms(model: nn.Module) -> list[str]:
    """BatchNorm layers whose running statistics are still at their initial values (mean 0, variance 1)."""
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_var is not None
            and bool((m.running_mean == 0).all()) and bool((m.running_var == 1).all())]


def _warn_untrained_batchnorms(model: nn.Module) -> None:
    """Calibration runs in eval mode, where a never-trained BatchNorm does not normalise: the ranges come out far
    wider than the activations training sees, a low-bit input can round to one value, and the BatchNorm after it
    then scales its gradient by 1/sqrt(eps) (a random-init YOLOX at W4A4 and a Faster R-CNN in its first
    curriculum stage went to inf/NaN in one step)."""
    untrained = untrained_batchnorms(model)
    if untrained:
        shown = ", ".join(repr(n) for n in untrained[:3]) + (f" and {len(untrained) - 3} more" if len(untrained) > 3 else "")
        warnings.warn(
            f"calibrating a model whose BatchNorm layers {shown} were never trained (running statistics at their "
            "initial values): eval-mode ranges will not match training's activations, and 4-bit QAT from these "
            "weights can diverge in its first steps; calibrate trained float weights", UserWarning, stacklevel=3)


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    forward_fn: Optional[Callable[[nn.Module, Any], Any]] = None,
    recipe=None,
    method: Optional[str] = None,
    num_batches: Optional[int] = None,
    progress: bool = False,
) -> CalibrationResult:
    """Calibrate the activation ranges of a quantized model (and re-fit its weight ranges).

    Args:
        model: a model converted by :func:`detq_hooks.quantize`.
        batches: any iterable of batches (the user's own dataloader).
        forward_fn: ``forward_fn(model, batch)`` runs one batch (default: ``model(batch)``, unpacking
            tuples/dicts). Adapters pass their trainer's way of running a batch.
        recipe: overrides the recipe the model was converted with.
        method / num_batches: override ``calibration.method`` / ``calibration.num_batches``.
        progress: show a progress bar.

    Raises:
        CalibrationError: no batches, NaN/inf activations, unused quantizers. The quantizers are restored.
    """
    if not is_quantized(model):
        raise CalibrationError("calibrate() needs a model converted by detq_hooks.quantize(); this one has no quantizers")
    _check_finite_parameters(model)
    _warn_untrained_batchnorms(model)
    rec = load_recipe(recipe) if recipe is not None else (recipe_of(model) or load_recipe("w8a8"))
    cfg = rec.calibration
    if method is not None or num_batches is not None:
        cfg = CalibrationSection.from_dict({**cfg.to_dict(), **({"method": method} if method else {}),
                                            **({"num_batches": num_batches} if num_batches else {})})
    forward_fn = forward_fn or default_forward
    ties_before = None
    if rec.quantization.shared_activations and not is_shared(model):
        # one quantizer per tensor: the groups come from the first batch's data flow
        batches = iter(batches)
        first = next(batches, None)
        if first is not None:
            ties_before = {n: m.input_quantizer for n, m in quantized_layers(model)}
            share_inputs(model, lambda m: forward_fn(m, first))
            batches = itertools.chain([first], batches)
    snapshot = _snapshot(model)
    generator = torch.Generator().manual_seed(1234 + dist_utils.rank())
    act_quantizers = [(n, q) for n, q in iter_quantizers(model) if q.role == "activation" and q.enabled]
    observers = {}
    for n, q in act_quantizers:
        q.observer = observers[n] = RangeObserver(n, cfg.samples_per_batch, generator)
    was_training = model.training
    model.eval()
    seen = 0
    result = CalibrationResult(0, cfg.method)
    try:
        it = iter(batches)
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, total=cfg.num_batches, desc=f"calibrate ({cfg.method})", leave=False)
        for batch in it:
            if seen >= cfg.num_batches:
                break
            for obs in observers.values():
                obs.batch_index = seen
            forward_fn(model, batch)
            seen += 1
        # Every rank must agree that calibration had data before collectives start.
        seen_t = torch.tensor([float(seen)])
        dist_utils.all_reduce_(seen_t, "min")
        if seen_t.item() == 0:
            raise CalibrationError("calibration got no batches: the iterable given to calibrate() is empty")
        _check_every_layer_ran(observers, seen)
        for n, q in act_quantizers:
            q.observer = None
            lo, hi = compute_range(observers[n], q, cfg)
            q.set_range(torch.tensor([lo]), torch.tensor([hi]))
            result.ranges[n] = (lo, hi)
        for n, q in iter_quantizers(model):
            if q.role == "weight":
                owner = _owner_of(model, n)
                calibrate_weight_quantizer(q, owner.weight, cfg.weight_method, cfg.mse_norm)
            dist_utils.broadcast_(q.scale.data)
            dist_utils.broadcast_(q.zero_point.data)
    except BaseException:
        for _, q in act_quantizers:
            q.observer = None
        _restore(model, snapshot)
        for n, m in quantized_layers(model) if ties_before is not None else ():
            m.input_quantizer = ties_before[n]
        raise
    finally:
        model.train(was_training)
    result.num_batches = seen
    return result


def _owner_of(model: nn.Module, quantizer_name: str) -> nn.Module:
    parent = quantizer_name.rsplit(".", 1)[0] if "." in quantizer_name else ""
    return model.get_submodule(parent)


__all__ = [
    "calibrate",
    "CalibrationError",
    "CalibrationResult",
    "calibrate_weight_quantizer",
    "mse_range",
    "percentile_range",
    "entropy_range",
]
