"""Block reconstruction for post-training quantization (BRECQ / QDrop style), trainer-free.

After calibration, each block of the quantized model (a sub-module such as ``model.4`` of a YOLO, by default
:meth:`DetectorFamily.reconstruction_blocks`) is optimised in turn to reproduce the float block's output from
the input the *quantized* model feeds it, so later blocks learn to absorb the error of earlier ones:

* **AdaRound** weight rounding: each quantized layer of the block gets a learnable ``V`` (same shape as the
  weight) and uses ``W̃ = s·(clamp(floor(W/s) + h(V) + z, qmin, qmax) − z)`` with the rectified sigmoid
  ``h(V) = clamp(σ(V)·(ζ − γ) + γ, 0, 1)`` (ζ = 1.1, γ = −0.1). A regulariser ``λ·Σ(1 − |2h − 1|^β)``, off for
  the first ``warmup`` fraction of the iterations and then with β annealed from 20 to 2, pushes ``h`` to 0 or 1.
  At the end the rounding is made hard (``h = [V ≥ 0]``) and *folded into the stored weight*:
  ``W := s·(clamp(floor(W/s) + h + z, qmin, qmax) − z)`` lies on the quantization grid, so the layer's ordinary
  nearest-rounding weight quantizer reproduces it exactly and the model saves, reloads and exports like any
  other quantized model (nothing new in its ``state_dict``).
* **LSQ** step sizes of the block's activation quantizers (the ``input_quantizer`` of its layers) are learned
  by the same loss, at a learning rate relative to each step size.
* **QDrop**: each element of the block's quantized-model input is replaced by the float model's input with
  probability ``qdrop_prob`` at every iteration, which flattens the loss landscape the rounding is fit on.

A block whose loss ends higher than it started (measured on all cached images with the quantized model's own
input) is put back as it was.

Memory: only one block's inputs (from both models) and float outputs are cached at a time, on the CPU by
default; :attr:`ReconstructionResult.cached_bytes_per_image` reports the largest such cache per image. The
inputs are captured by forward hooks while ``forward_fn`` runs the whole model, which stop the forward (a
private exception) as soon as the block has been seen. Blocks are reconstructed in the order the forward first
calls them (one probe forward of the quantized model on the first batch finds it), whatever order they are named
in, so that each block is fit to inputs from already reconstructed blocks; an enclosing block named after blocks
inside it stays after them. A block called several times per forward (a DETR's query-position MLP on every decoder
layer, DINO's box branches both inside the decoder and in the head, a tower shared across pyramid levels) is fit
to all its calls at once: every call's input and output are cached and the loss is their mean. Blocks that share
a quantized layer without one holding the other (RTMDet's towers: per level a module with its own BatchNorm around
one shared convolution) are fit together the same way, as one unit. Every tensor a block reads or returns must
have the batch as leading dimension.

Example:
    >>> import copy, torch, detq_hooks as dq
    >>> from detq_hooks.reconstruction import ReconstructionConfig, reconstruct
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.SiLU(), torch.nn.Conv2d(8, 8, 3))
    >>> float_net = copy.deepcopy(net)  # before conversion
    >>> batches = [torch.randn(8, 3, 16, 16) for _ in range(4)]
    >>> dq.quantize(net, "w4a8"); dq.calibrate(net, batches)  # doctest: +SKIP
    >>> result = reconstruct(net, float_net, batches, blocks=["0", "2"],
    ...                      config=ReconstructionConfig(iterations=200, batch_size=16))  # doctest: +SKIP
    >>> result.losses()  # {'0': (before, after), '2': (before, after)}  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from scipy.cluster.hierarchy import DisjointSet
from torch import nn

from . import distributed as dist_utils
from .calibration import default_forward
from .modules import QuantModuleMixin, is_quantized_module, quantized_layers
from .quantizers import FakeQuantizer

# Rectified sigmoid stretch of AdaRound: h can reach exactly 0 and 1 with a non-vanishing gradient nearby.
ZETA, GAMMA = 1.1, -0.1


class ReconstructionError(ValueError):
    """Block reconstruction cannot run as asked (no data, unknown block, NaN/inf, ...); the message names the
    culprit. The quantized model was restored to exactly its state before the call."""


class _StopForward(BaseException):
    # A BaseException so that a trainer's `except Exception` in its forward does not swallow it.
    pass


# ============================================================================================== configuration
@dataclass(kw_only=True)
class ReconstructionConfig:
    """Settings of :func:`reconstruct`.

    Attributes:
        iterations: optimisation steps per block (the papers use 20 000 on a GPU; a few hundred already help).
        batch_size: images per step, drawn from the cached calibration images.
        lr: Adam learning rate of AdaRound's ``V``.
        scale_lr: Adam learning rate of the activation step sizes, relative to each step size's value at the start
            (Adam moves a parameter by about its learning rate whatever the gradient's size: an absolute rate fit
            for one layer's step size would be far too large for a layer with small activations).
        round_weight: λ of the rounding regulariser.
        beta: (start, end) of the regulariser's exponent β, annealed linearly after the warm-up.
        warmup: fraction of the iterations without the rounding regulariser.
        qdrop_prob: probability that an element of the block's quantized input is replaced by the float input.
        adaround: learn the weight rounding (else nearest rounding stays).
        learn_activation_scales: learn the step sizes of the block's activation quantizers.
        num_batches: use at most this many calibration batches (``None``: all).
        cache_on_cpu: keep the cached block inputs/outputs in CPU memory (else on the model's device).
        seed: seed of the mini-batch draws and QDrop masks.

    A block whose loss (measured with the quantized model's own input) ends higher than it started is put back
    as it was (:attr:`BlockResult.reverted`), so no block ends worse than calibration left it.
    """

    iterations: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    scale_lr: float = 1e-3
    round_weight: float = 0.01
    beta: tuple[float, float] = (20.0, 2.0)
    warmup: float = 0.2
    qdrop_prob: float = 0.5
    adaround: bool = True
    learn_activation_scales: bool = True
    num_batches: Optional[int] = None
    cache_on_cpu: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("iterations", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ReconstructionError(f"`{name}` = {value!r} must be a positive integer")
        if self.num_batches is not None and (isinstance(self.num_batches, bool) or not isinstance(self.num_batches, int)
                                             or self.num_batches < 1):
            raise ReconstructionError(f"`num_batches` = {self.num_batches!r} must be a positive integer or None")
        for name in ("lr", "scale_lr"):
            value = getattr(self, name)
            if not _is_number(value) or not value > 0:
                raise ReconstructionError(f"`{name}` = {value!r} must be a positive number")
        if not _is_number(self.round_weight) or self.round_weight < 0:
            raise ReconstructionError(f"`round_weight` = {self.round_weight!r} must be a number >= 0")
        beta = tuple(self.beta) if isinstance(self.beta, (list, tuple)) else None
        if beta is None or len(beta) != 2 or not all(_is_number(b) and b > 0 for b in beta) or beta[0] < beta[1]:
            raise ReconstructionError(f"`beta` = {self.beta!r} must be (start, end) with start >= end > 0, e.g. (20, 2)")
        self.beta = (float(beta[0]), float(beta[1]))
        if not _is_number(self.warmup) or not 0 <= self.warmup < 1:
            raise ReconstructionError(f"`warmup` = {self.warmup!r} must be a fraction in [0, 1)")
        if not _is_number(self.qdrop_prob) or not 0 <= self.qdrop_prob <= 1:
            raise ReconstructionError(f"`qdrop_prob` = {self.qdrop_prob!r} must be a probability in [0, 1]")
        for name in ("adaround", "learn_activation_scales", "cache_on_cpu"):
            if not isinstance(getattr(self, name), bool):
                raise ReconstructionError(f"`{name}` = {getattr(self, name)!r} must be true or false")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "beta": list(self.beta)}

    @classmethod
    def from_dict(cls, data: dict) -> "ReconstructionConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ReconstructionError(f"unknown reconstruction setting(s) {unknown}; allowed: {sorted(known)}")
        return cls(**data)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ============================================================================================== results
@dataclass
class BlockResult:
    """One block: its reconstruction loss (squared error summed per image, averaged over the calibration
    images, with the quantized model's own input) before and after, or why it was skipped."""

    name: str
    loss_before: float = float("nan")
    loss_after: float = float("nan")
    quantized_layers: int = 0
    calls: int = 1  # calls per forward, all fit together (of all its tied blocks)
    tied_with: list[str] = field(default_factory=list)  # blocks sharing its quantized layers, fit with it
    target: str = "float model"  # or "float block": the float block on the quantized input (selected queries)
    rounded_layers: int = 0  # layers whose rounding AdaRound learned
    learned_scales: int = 0  # activation quantizers whose step size was learned
    flipped_fraction: float = 0.0  # weights AdaRound rounded the other way than nearest rounding
    soft_fraction: float = 0.0  # h(V) strictly between 0 and 1 just before hard rounding (0 when converged)
    cached_bytes_per_image: int = 0
    seconds: float = 0.0
    reverted: bool = False  # the optimised block was worse than before and was put back
    skipped: Optional[str] = None


@dataclass
class ReconstructionResult:
    blocks: list[BlockResult] = field(default_factory=list)
    num_images: int = 0
    seconds: float = 0.0
    cached_bytes_per_image: int = 0  # the largest per-image cache of any block

    def losses(self) -> dict[str, tuple[float, float]]:
        """``{block: (loss before, loss after)}`` of the reconstructed (not skipped) blocks."""
        return {b.name: (b.loss_before, b.loss_after) for b in self.blocks if b.skipped is None}


# ============================================================================================== nested tensors
# Blocks read and return tensors, lists of tensors (YOLO's Concat and Detect) or dicts of them.
@dataclass(frozen=True)
class _Shared:
    """An input tensor that is the same for every calibration batch and has no batch dimension (Deformable
    DETR's level shapes and start indices): passed to the block as it is, never sliced by image."""

    tensor: torch.Tensor


def _map_nested(fn: Callable[[Any], Any], obj: Any, leaf: type) -> Any:
    """``obj`` with every ``leaf`` replaced by ``fn(leaf)``, in new containers (named tuples, lists, tuples,
    dicts); anything else is kept as it is."""
    if isinstance(obj, leaf):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_map_nested(fn, v, leaf) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_nested(fn, v, leaf) for v in obj)
    if isinstance(obj, dict):
        return {k: _map_nested(fn, v, leaf) for k, v in obj.items()}
    return obj


def _map_tensors(fn: Callable[[torch.Tensor], Any], obj: Any) -> Any:
    return _map_nested(fn, obj, torch.Tensor)


def _unshared(obj: Any) -> Any:
    """``obj`` in new containers, each :class:`_Shared` replaced by its tensor: what the block is called with."""
    return _map_nested(lambda s: s.tensor, obj, _Shared)


def _leaves(obj: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    _map_tensors(found.append, obj)
    return found


def _rebuild(template: Any, tensors: Iterable[torch.Tensor]) -> Any:
    it = iter(tensors)
    return _map_tensors(lambda _: next(it), template)


def _detached_copy(obj: Any, device: Optional[torch.device]) -> Any:
    # Copies of the tensors (the block may work in place on its input once the hook returns) and new
    # containers (YOLO's Detect head assigns into the list it is given).
    return _map_tensors(lambda t: t.detach().to(device or t.device, copy=True), obj)


def _nbytes(obj: Any) -> int:
    return sum(t.numel() * t.element_size() for t in _leaves(obj))


def _first_non_finite(obj: Any) -> Optional[str]:
    for t in _leaves(obj):
        if t.is_floating_point() and not torch.isfinite(t).all():
            return "NaN" if torch.isnan(t).any() else "inf"
    return None


# ============================================================================================== block cache
@dataclass
class _BlockCache:
    """One block's cached data for all calibration images: the quantized model's input, the float model's
    input and output (``args``/``kwargs`` trees whose tensors are concatenated along the batch dimension)."""

    quant_input: tuple[tuple, dict]
    float_input: tuple[tuple, dict]
    float_output: Any
    num_images: int

    @property
    def nbytes(self) -> int:
        inputs = _nbytes(self.quant_input) + (0 if self.float_input is self.quant_input else _nbytes(self.float_input))
        return inputs + _nbytes(self.float_output)

    def select(self, index: torch.Tensor, device: torch.device):
        take = lambda t: t[index.to(t.device)].to(device)  # noqa: E731
        return (_map_tensors(take, self.quant_input), _map_tensors(take, self.float_input),
                _map_tensors(take, self.float_output))


def _capture(model: nn.Module, block: str, batches: Sequence[Any], forward_fn, *, calls: int, want_output: bool,
             device: Optional[torch.device]) -> tuple[list[list], list[list]]:
    """Run ``forward_fn`` on each batch and keep the block's inputs (and outputs) of its ``calls`` calls, as
    ``[call][batch]`` lists; each forward stops right after what is needed."""
    module = model.get_submodule(block)
    inputs: list[list] = []  # [batch][call]
    outputs: list[list] = []

    def pre_hook(mod, args, kwargs):
        inputs[-1].append(_detached_copy((args, kwargs), device))
        if not want_output and len(inputs[-1]) == calls:
            raise _StopForward

    def post_hook(mod, args, kwargs, output):
        outputs[-1].append(_detached_copy(output, device))
        if len(outputs[-1]) == calls:
            raise _StopForward

    handles = [module.register_forward_pre_hook(pre_hook, with_kwargs=True)]
    if want_output:
        handles.append(module.register_forward_hook(post_hook, with_kwargs=True))
    try:
        for i, batch in enumerate(batches):
            inputs.append([])
            outputs.append([])
            try:
                forward_fn(model, batch)
            except _StopForward:
                pass
            if not inputs[-1]:
                raise ReconstructionError(
                    f"block {block!r} did not run in the forward of calibration batch {i}; is it on the path of "
                    "`forward_fn`?"
                )
            if len(inputs[-1]) != calls or (want_output and len(outputs[-1]) != calls):
                raise ReconstructionError(
                    f"block {block!r} ran {len(inputs[-1])} time(s) in the forward of calibration batch {i} of the "
                    f"{'float' if want_output else 'quantized'} model, {calls} time(s) in the quantized model's "
                    "first forward; reconstruction needs the same calls in every forward"
                )
    finally:
        for h in handles:
            h.remove()
    by_call = lambda per_batch: [[calls_[c] for calls_ in per_batch] for c in range(calls)]  # noqa: E731
    return by_call(inputs), by_call(outputs) if want_output else []


def _call_order(model: nn.Module, blocks: Sequence[str], batch: Any, forward_fn) -> dict[str, tuple[int, int]]:
    """``{block: (position of its first call among all the blocks' calls, calls per forward)}`` from one forward
    of ``batch``; a block that does not run is left out."""
    seen: dict[str, list[int]] = {}
    counter = [0]

    def hook_for(name: str):
        def hook(mod, args):
            seen.setdefault(name, []).append(counter[0])
            counter[0] += 1
        return hook

    handles = [model.get_submodule(b).register_forward_pre_hook(hook_for(b)) for b in blocks]
    try:
        with torch.no_grad():
            forward_fn(model, batch)
    finally:
        for h in handles:
            h.remove()
    return {name: (positions[0], len(positions)) for name, positions in seen.items()}


def _within(name: str, outer: str) -> bool:
    """Whether module ``name`` is ``outer`` or lies inside it (``""``, the whole model, holds every module)."""
    return outer == "" or name == outer or name.startswith(outer + ".")


def _in_call_order(blocks: list[str], first_call: dict[str, tuple[int, int]]) -> list[str]:
    """``blocks`` sorted by their first call (stable). A block that did not run (a DETR's query embedding, read as
    a weight) stays behind the block named before it. An enclosing block named after blocks inside it keeps its
    place after them (a second, coarser pass over them)."""
    keys: dict[str, float] = {}
    for i, name in enumerate(blocks):
        inner = [keys[a] for a in blocks[:i] if _within(a, name)]
        own = float(first_call[name][0]) if name in first_call else keys[blocks[i - 1]] if i else -1.0
        keys[name] = max([own] + [k + 0.5 for k in inner])
    return sorted(blocks, key=lambda b: keys[b])


def _tied_groups(model: nn.Module, blocks: list[str]) -> list[list[str]]:
    """``blocks`` (in call order) grouped where they share a quantized layer without one lying inside the other
    (RTMDet's towers: one conv per depth, shared by the per-level modules that wrap it with their own BatchNorm).
    A shared layer has one rounding and one input step size: fit to one member after another, each later fit
    starts from the rounding the earlier ones fixed and serves only its own level. A group is reconstructed at its
    first member's place, fit to all its members' calls at once."""
    tied = DisjointSet(blocks)
    holders: dict[int, list[str]] = {}  # quantized layer -> the blocks holding it
    for name in blocks:
        for _, layer in quantized_layers(model.get_submodule(name)):
            holders.setdefault(id(layer), []).append(name)
    for names in holders.values():
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                if not (_within(a, b) or _within(b, a)):  # an enclosing block is a second pass, not a tie
                    tied.merge(a, b)
    # subsets keep no order: members in call order, groups at their first member's place
    groups = [sorted(subset, key=blocks.index) for subset in tied.subsets()]
    return sorted(groups, key=lambda g: blocks.index(g[0]))


_PLACEHOLDER = torch.empty(0)


def _shared_leaves(columns: list[list[torch.Tensor]]) -> set[int]:
    """Positions of the input leaves that are integer (not boolean) tensors equal in every calibration batch:
    level shapes and start indices, which have no batch dimension even when their size happens to equal the
    batch's. Block inputs that are data (activations, masks) are floating point or boolean."""
    first = columns[0]
    if any(len(leaves) != len(first) for leaves in columns):
        return set()
    return {j for j, t in enumerate(first)
            if not t.is_floating_point() and t.dtype != torch.bool and not t.is_complex()
            and all(torch.equal(leaves[j], t) for leaves in columns[1:])}


def _concat_batches(trees: list, block: str, what: str) -> tuple[Any, int]:
    """One tree whose tensors hold every batch, concatenated along dim 0, and the number of images.

    Empties ``trees`` and frees each batch's tensors as soon as they are concatenated, so the peak memory is the
    cache plus one tensor's worth of batches, not twice the cache."""
    columns = [_leaves(t) for t in trees]
    if not columns[0]:
        raise ReconstructionError(f"block {block!r}: its {what} holds no tensor")
    shared = _shared_leaves(columns) if what == "input" else set()
    if shared:  # keep them in the structure, out of the per-image columns
        first = iter(range(len(columns[0])))
        template = _map_tensors(lambda t: _Shared(t) if next(first) in shared else _PLACEHOLDER, trees[0])
        columns = [[t for j, t in enumerate(leaves) if j not in shared] for leaves in columns]
    else:
        template = _map_tensors(lambda t: _PLACEHOLDER, trees[0])  # the structure, without the batch's tensors
    trees.clear()
    images = 0
    for i, leaves in enumerate(columns):
        n = leaves[0].shape[0] if leaves and leaves[0].dim() else 0
        bad = [tuple(t.shape) for t in leaves if t.dim() == 0 or t.shape[0] != n]
        if len(leaves) != len(columns[0]) or bad:
            raise ReconstructionError(
                f"block {block!r}: every tensor of its {what} must have the batch as leading dimension "
                f"(batch {i}: shapes {[tuple(t.shape) for t in leaves]})"
            )
        images += n
    by_leaf = [list(col) for col in zip(*columns)]
    columns.clear()
    merged = []
    for i, col in enumerate(by_leaf):
        try:
            merged.append(torch.cat(col))
        except RuntimeError as e:
            raise ReconstructionError(f"block {block!r}: the calibration batches give its {what} different shapes "
                                      f"({e}); use batches of one image size") from None
        by_leaf[i] = None
    return _rebuild(template, merged), images


# ============================================================================================== AdaRound
def _rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


class _AdaRoundLayer:
    """Learnable rounding of one quantized layer's weight, with the layer's (fixed) weight scale and zero point.

    While active, the layer's ``quantized_weight`` is replaced by :meth:`soft_weight` (an instance attribute
    shadowing the method, removed by :meth:`detach`).
    """

    def __init__(self, module: QuantModuleMixin) -> None:
        self.module = module
        wq = module.weight_quantizer
        if not wq.initialized:
            wq.initialize_from(module.weight)
        w = module.weight.detach().float()
        shape = [1] * w.dim()
        if wq.per_channel:
            shape[wq.channel_axis] = -1
        # The quantizer's own arithmetic (quantizers.fake_quantize_reference): clamped scale, rounded zero point.
        self.scale = wq.scale.detach().float().clamp_min(1e-8).reshape(shape)
        self.zero_point = wq.zero_point.detach().float().round().clamp(wq.qmin, wq.qmax).reshape(shape)
        self.qmin, self.qmax = wq.qmin, wq.qmax
        scaled = w / self.scale
        self.floor = torch.floor(scaled)
        self.nearest = torch.round(scaled)
        # Start from the float weight: h(V) equals the fractional part, i.e. W̃ = W inside the range.
        frac = ((scaled - self.floor - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1 - 1e-4)
        self.v = nn.Parameter(torch.log(frac / (1 - frac)))

    def attach(self) -> None:
        self.module.quantized_weight = self.soft_weight  # type: ignore[method-assign]

    def detach(self) -> None:
        self.module.__dict__.pop("quantized_weight", None)

    def h(self) -> torch.Tensor:
        return _rectified_sigmoid(self.v)

    def _weight_from(self, h: torch.Tensor) -> torch.Tensor:
        code = (self.floor + h + self.zero_point).clamp(self.qmin, self.qmax)
        return ((code - self.zero_point) * self.scale).to(self.module.weight.dtype)

    def soft_weight(self) -> torch.Tensor:
        return self._weight_from(self.h())

    def hard_weight(self) -> torch.Tensor:
        return self._weight_from((self.v.detach() >= 0).float())

    def regularizer(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    @torch.no_grad()
    def fold(self) -> tuple[int, int, int]:
        """Write the hard rounding into the stored weight; returns (flipped vs nearest, still soft, total)."""
        h = self.h()
        soft = int(((h > 0) & (h < 1)).sum())
        hard = (self.v >= 0).float()
        flipped = int((self.floor + hard != self.nearest).sum())
        self.module.weight.copy_(self.hard_weight())  # in place: the weight-cache version key moves
        return flipped, soft, h.numel()


def _beta_at(step: int, cfg: ReconstructionConfig) -> Optional[float]:
    """β of the rounding regulariser at ``step`` (``None`` during the warm-up: no regulariser)."""
    start = int(cfg.warmup * cfg.iterations)
    if step < start:
        return None
    progress = (step - start) / max(1, cfg.iterations - start)
    return cfg.beta[1] + (cfg.beta[0] - cfg.beta[1]) * (1 - progress)


# ============================================================================================== loss
def _reconstruction_loss(output: Any, target: Any) -> torch.Tensor:
    """Squared error summed over each image's elements, averaged over images, summed over output tensors
    (QDrop's measure; the summed scale keeps it comparable to the summed rounding regulariser)."""
    total = None
    for o, t in zip(_leaves(output), _leaves(target)):
        if not t.is_floating_point():
            continue
        err = (o.float() - t.float()).pow(2).reshape(o.shape[0], -1).sum(1).mean()
        total = err if total is None else total + err
    if total is None:
        raise ReconstructionError("the block's output holds no floating-point tensor to reconstruct")
    return total


def _mix_qdrop(quant: Any, float_: Any, prob: float, generator: torch.Generator) -> Any:
    if prob <= 0:
        return quant
    mixed = []
    for q, f in zip(_leaves(quant), _leaves(float_)):
        if q.is_floating_point():
            keep_float = torch.rand(q.shape, generator=generator).to(q.device) < prob
            q = torch.where(keep_float, f, q)
        mixed.append(q)
    return _rebuild(quant, mixed)


def _run_block(block: nn.Module, inputs: tuple[tuple, dict]) -> Any:
    args, kwargs = inputs
    # Fresh containers each call (``_unshared`` builds new ones): the block may write into the list it is given.
    return block(*_unshared(args), **_unshared(kwargs))


@torch.no_grad()
def _evaluate(members: list[_Member], batch_size: int, device, when: str, extra_loss=None) -> float:
    """The unit's loss on all cached images with the quantized model's own input, averaged over its blocks'
    calls."""
    total = 0.0
    num_images = members[0].caches[0].num_images
    for start in range(0, num_images, batch_size):
        index = torch.arange(start, min(start + batch_size, num_images))
        for member in members:
            for cache in member.caches:
                quant_in, _, target = cache.select(index, device)
                out = _run_block(member.module, quant_in)
                bad = _first_non_finite(out)
                if bad:
                    raise ReconstructionError(f"block {member.name!r}: {bad} in the quantized model's output ({when} "
                                              "reconstruction)")
                total += float(_block_loss(member.name, out, target, extra_loss)) * len(index)
    return total / (num_images * sum(len(m.caches) for m in members))


# ============================================================================================== entry point
def _check_blocks(quant_model: nn.Module, float_model: nn.Module, blocks: Sequence[str]) -> list[str]:
    if isinstance(blocks, str):
        raise ReconstructionError(f"`blocks` = {blocks!r} must be a list of module names, not one string")
    blocks = list(blocks)
    if not blocks:
        raise ReconstructionError("`blocks` is empty: name the sub-modules to reconstruct, or pass None")
    quant_modules, float_modules = dict(quant_model.named_modules()), dict(float_model.named_modules())
    for name in blocks:
        if not isinstance(name, str):
            raise ReconstructionError(f"block {name!r} must be a module name (a string)")
        for label, modules, model in (("quantized", quant_modules, quant_model), ("float", float_modules, float_model)):
            if name not in modules:
                examples = [n for n, _ in model.named_children()][:5]
                raise ReconstructionError(f"no block named {name!r} in the {label} model ({type(model).__name__}); "
                                          f"block names are module names such as {examples}")
    if len(set(blocks)) != len(blocks):
        twice = sorted({b for b in blocks if blocks.count(b) > 1})
        raise ReconstructionError(f"`blocks` names {twice} more than once")
    # A block may contain blocks reconstructed *before* it (a second, coarser pass, e.g. the whole head after its
    # paths for detection-aware regularisation); one inside a block already done would undo nothing useful.
    for i, a in enumerate(blocks):
        for b in blocks[i + 1:]:
            if _within(b, a):
                raise ReconstructionError(f"block {b!r} lies inside {a!r}, which comes before it; name disjoint "
                                          "sub-modules, or the enclosing block after the ones inside it")
    return blocks


def reconstruct(
    quant_model: nn.Module,
    float_model: nn.Module,
    batches: Iterable[Any],
    forward_fn: Optional[Callable[[nn.Module, Any], Any]] = None,
    *,
    blocks: Optional[Sequence[str]] = None,
    config: Optional[ReconstructionConfig] = None,
    family=None,
    progress: bool = False,
    extra_loss: Optional[Callable[[str, Any, Any, torch.Tensor], Optional[torch.Tensor]]] = None,
    selected_query_blocks: Optional[Sequence[str]] = None,
) -> ReconstructionResult:
    """Optimise the quantized model block by block to reproduce the float model (AdaRound, LSQ, QDrop).

    Args:
        quant_model: the model converted by :func:`detq_hooks.quantize`, calibrated (:func:`detq_hooks.calibrate`);
            changed in place. Its activation quantizers that have no range yet initialise from the first data.
        float_model: the float model it was converted from (a deep copy taken before conversion); only read.
        batches: calibration batches (read once and kept, so both models see the same images).
        forward_fn: ``forward_fn(model, batch)`` runs one batch (default: ``model(batch)``, unpacking
            tuples/dicts), as for :func:`detq_hooks.calibrate`.
        blocks: module names to reconstruct, in data-flow order (default: the detector family's
            :meth:`~detq_hooks.detectors.DetectorFamily.reconstruction_blocks`). Blocks without a quantized layer
            are skipped.
        config: :class:`ReconstructionConfig` (default settings if ``None``).
        family: the :class:`~detq_hooks.detectors.DetectorFamily` asked for the blocks (default: found from
            the model).
        progress: a progress bar per block, with its loss.
        extra_loss: ``extra_loss(block, quantized output, float output, reconstruction loss) -> term or None``
            added to a block's loss (e.g. TASKQ's detection-aware task regularisation on the head block); it
            counts in the before/after comparison too.
        selected_query_blocks: module names that run on queries the model selects from its own data (a two-stage
            DETR's top-k proposals; default: the family's :meth:`~detq_hooks.detectors.DetectorFamily.selected_query_blocks`).
            A block inside one of them, or enclosing one, is fit to the float *block* run on the quantized model's
            input (its :attr:`BlockResult.target` is ``"float block"``), without QDrop: there the float model's
            inputs and outputs belong to other queries than the quantized model's.

    Returns:
        :class:`ReconstructionResult` with each block's loss before and after, times and cache size.

    Under ``torch.distributed`` every rank reconstructs on its own batches and then takes rank 0's weights and
    step sizes (broadcast), so all ranks hold the same model. An error on one rank only (e.g. NaN in its data)
    leaves the others waiting at that broadcast: give every rank clean data.

    Raises:
        ReconstructionError: no batches, fewer images than ``config.batch_size``, a block name that is not a
            module of both models, NaN/inf in a block's float or quantized output, a model without quantized
            layers. The quantized model is then restored exactly (its ``state_dict`` and modes).
    """
    config = config if config is not None else ReconstructionConfig()
    if not isinstance(config, ReconstructionConfig):
        raise TypeError(f"`config` must be a ReconstructionConfig, got {type(config).__name__}")
    if not any(is_quantized_module(m) for m in quant_model.modules()):
        raise ReconstructionError(f"reconstruct() needs a model converted by detq_hooks.quantize(); this "
                                  f"{type(quant_model).__name__} has no quantized layers")
    if any(is_quantized_module(m) for m in float_model.modules()):
        raise ReconstructionError("`float_model` has quantized layers: pass a deep copy of the model taken before "
                                  "detq_hooks.quantize()")
    if blocks is None or selected_query_blocks is None:
        from .detectors import family_for

        family = family or family_for(quant_model)
    if blocks is None:
        blocks = family.reconstruction_blocks(quant_model)
    blocks = _check_blocks(quant_model, float_model, blocks)
    if selected_query_blocks is None:
        selected_query_blocks = family.selected_query_blocks(quant_model)
    selected = _check_selected(quant_model, selected_query_blocks)
    if config.num_batches is not None:
        batches = [b for _, b in zip(range(config.num_batches), batches)]
    else:
        batches = list(batches)
    if not batches:
        raise ReconstructionError("reconstruct() got no calibration batches: the iterable given as `batches` is empty")

    forward_fn = forward_fn or default_forward
    started = time.perf_counter()
    snapshot = {k: v.detach().clone() for k, v in quant_model.state_dict(keep_vars=True).items()}
    modes = {m: m.training for m in quant_model.modules()}
    float_modes = {m: m.training for m in float_model.modules()}
    grad_flags = {p: p.requires_grad for p in quant_model.parameters()}
    result = ReconstructionResult()
    quant_model.eval()  # BatchNorm uses its running statistics, as in deployment
    float_model.eval()
    try:
        for p in quant_model.parameters():
            p.requires_grad_(False)
        calls = _call_order(quant_model, blocks, batches[0], forward_fn)
        for group in _tied_groups(quant_model, _in_call_order(blocks, calls)):
            result.blocks.append(_reconstruct_block(quant_model, float_model, group, batches, forward_fn, config,
                                                    progress and dist_utils.rank() == 0, result, extra_loss,
                                                    calls=[calls.get(name, (0, 1))[1] for name in group],
                                                    local=[_overlaps(name, selected) for name in group]))
        with torch.no_grad():  # under torch.distributed every rank ends with rank 0's weights and step sizes
            for tensor in quant_model.state_dict().values():
                dist_utils.broadcast_(tensor)
    except BaseException:
        for m in quant_model.modules():
            m.__dict__.pop("quantized_weight", None)
        quant_model.load_state_dict(snapshot)
        raise
    finally:
        for p, flag in grad_flags.items():
            p.requires_grad_(flag)
        for m, flag in modes.items():
            m.train(flag)
        for m, flag in float_modes.items():
            m.train(flag)
    result.seconds = time.perf_counter() - started
    return result


def _check_selected(model: nn.Module, names: Sequence[str]) -> list[str]:
    if isinstance(names, str):
        raise ReconstructionError(f"`selected_query_blocks` = {names!r} must be a list of module names, not one string")
    modules = dict(model.named_modules(remove_duplicate=False))
    for name in names:
        if not isinstance(name, str) or name not in modules:
            raise ReconstructionError(f"`selected_query_blocks` entry {name!r} is not a module name of the quantized "
                                      f"model ({type(model).__name__})")
    return list(names)


def _overlaps(block: str, names: Sequence[str]) -> bool:
    """Whether ``block`` is one of ``names``, lies inside one, or encloses one."""
    return any(_within(block, n) or _within(n, block) for n in names)


def _float_block_outputs(float_model: nn.Module, name: str, quant_in: list[list], device, cache_device) -> list[list]:
    """The float block's outputs on the quantized model's cached inputs, ``[call][batch]``, on ``cache_device``."""
    block = float_model.get_submodule(name)
    to_device = lambda t: t.to(device, copy=True)  # noqa: E731  (a copy: the block may work in place on its input)
    with torch.no_grad():
        return [[_detached_copy(_run_block(block, _map_tensors(to_device, inputs)), cache_device) for inputs in per_batch]
                for per_batch in quant_in]


def _cache_block(quant_model, float_model, name, batches, forward_fn, cfg: ReconstructionConfig, device, *,
                 calls: int, local: bool) -> list[_BlockCache]:
    """One block's caches, one per call per forward, on all calibration images (see :class:`_BlockCache`)."""
    cache_device = torch.device("cpu") if cfg.cache_on_cpu else None
    with torch.no_grad():
        quant_in, _ = _capture(quant_model, name, batches, forward_fn, calls=calls, want_output=False, device=cache_device)
        if local:  # the float model's own inputs belong to other queries: run the float block on the quantized input
            float_in, float_out = quant_in, _float_block_outputs(float_model, name, quant_in, device, cache_device)
        else:
            float_in, float_out = _capture(float_model, name, batches, forward_fn, calls=calls, want_output=True,
                                           device=cache_device)
    caches = []
    for call in range(calls):
        where = f" (call {call + 1} of {calls} per forward)" if calls > 1 else ""
        for i, tree in enumerate(float_out[call]):
            bad = _first_non_finite(tree)
            if bad:
                raise ReconstructionError(f"block {name!r}: {bad} in the float model's output{where} (calibration batch {i})")
        for i, tree in enumerate(quant_in[call]):
            bad = _first_non_finite(tree)
            if bad:
                raise ReconstructionError(f"block {name!r}: {bad} in its input{where} from the quantized model "
                                          f"(calibration batch {i}), i.e. in an earlier block's quantized output")
        quant_input, n = _concat_batches(quant_in[call], name, "input")
        # a float block run on the quantized input: one input for both (no copy, and QDrop mixes nothing in)
        float_input = quant_input if local else _concat_batches(float_in[call], name, "input")[0]
        float_output, _ = _concat_batches(float_out[call], name, "output")
        if len(_leaves(quant_input)) != len(_leaves(float_input)):
            raise ReconstructionError(f"block {name!r} reads differently structured inputs in the float and quantized "
                                      f"models{where}")
        if caches and n != caches[0].num_images:
            raise ReconstructionError(f"block {name!r}: its calls per forward read different batch sizes "
                                      f"({caches[0].num_images} and {n} images)")
        caches.append(_BlockCache(quant_input, float_input, float_output, n))
    return caches


@dataclass
class _Member:
    """One block of a reconstruction unit (a unit holds several when they share quantized layers)."""

    name: str
    module: nn.Module
    caches: list[_BlockCache]


def _reconstruct_block(quant_model, float_model, names: list[str], batches, forward_fn, cfg: ReconstructionConfig,
                       progress, result: ReconstructionResult, extra_loss=None, *, calls: list[int],
                       local: list[bool]) -> BlockResult:
    """Reconstruct one unit: a block, or blocks that share quantized layers (``names[1:]`` are
    :attr:`BlockResult.tied_with`), fit together to the mean loss over all their calls."""
    name = names[0]
    modules = [quant_model.get_submodule(n) for n in names]
    out = BlockResult(name, calls=sum(calls), tied_with=list(names[1:]),
                      target="float block" if any(local) else "float model")
    layers = list({id(m): m for module in modules for _, m in quantized_layers(module)}.values())  # shared once
    out.quantized_layers = len(layers)
    if not layers:
        out.skipped = "no quantized layer"
        return out
    t0 = time.perf_counter()
    device = next(iter(quant_model.parameters())).device
    members = [_Member(n, module, _cache_block(quant_model, float_model, n, batches, forward_fn, cfg, device,
                                               calls=c, local=lo))
               for n, module, c, lo in zip(names, modules, calls, local)]
    n = members[0].caches[0].num_images
    if any(c.num_images != n for m in members for c in m.caches):
        raise ReconstructionError(f"blocks {names} share quantized layers but read different batch sizes")
    if n < cfg.batch_size:
        raise ReconstructionError(f"block {name!r}: the calibration batches hold {n} images, fewer than one "
                                  f"reconstruction batch (`batch_size` = {cfg.batch_size}); pass more batches or "
                                  "lower `batch_size`")
    out.cached_bytes_per_image = math.ceil(sum(c.nbytes for m in members for c in m.caches) / n)
    result.num_images = n
    result.cached_bytes_per_image = max(result.cached_bytes_per_image, out.cached_bytes_per_image)

    out.loss_before = _evaluate(members, cfg.batch_size, device, "before", extra_loss)
    initial_state = [{k: v.detach().clone() for k, v in m.module.state_dict().items()} for m in members]
    rounders = [_AdaRoundLayer(m) for m in layers if cfg.adaround and m.weight_quantizer.enabled]
    scales = []
    if cfg.learn_activation_scales:
        for m in layers:
            q = m.input_quantizer
            if q is None or not q.enabled:
                continue
            # q.modules(): a wrapper such as sparse.SparseOutlierQuantizer holds the FakeQuantizer inside.
            for fq in q.modules():
                if isinstance(fq, FakeQuantizer) and isinstance(fq.scale, nn.Parameter):
                    scales.append(fq.scale)  # the step size only: an LSQ+ offset stays as calibrated
    out.rounded_layers, out.learned_scales = len(rounders), len(scales)
    if rounders or scales:
        _optimise(members, rounders, scales, cfg, device, name, progress, extra_loss)
    flipped = soft = total = 0
    for r in rounders:
        r.detach()
        f, s, t = r.fold()
        flipped, soft, total = flipped + f, soft + s, total + t
    out.flipped_fraction = flipped / total if total else 0.0
    out.soft_fraction = soft / total if total else 0.0
    out.loss_after = _evaluate(members, cfg.batch_size, device, "after", extra_loss)
    if out.loss_after > out.loss_before:
        for m, state in zip(members, initial_state):
            m.module.load_state_dict(state)
        out.reverted, out.loss_after, out.flipped_fraction = True, out.loss_before, 0.0
    out.seconds = time.perf_counter() - t0
    return out


def _block_loss(name: str, output: Any, target: Any, extra_loss) -> torch.Tensor:
    rec = _reconstruction_loss(output, target)
    term = extra_loss(name, output, target, rec) if extra_loss is not None else None
    return rec if term is None else rec + term


def _optimise(members: list[_Member], rounders: list[_AdaRoundLayer], scales: list[nn.Parameter],
              cfg: ReconstructionConfig, device, name: str, progress: bool, extra_loss=None) -> None:
    groups = []
    if rounders:
        groups.append({"params": [r.v for r in rounders], "lr": cfg.lr})
    for p in scales:
        p.requires_grad_(True)
        groups.append({"params": [p], "lr": cfg.scale_lr * float(p.detach().abs().mean().clamp_min(1e-12))})
    optimizer = torch.optim.Adam(groups)
    num_calls = sum(len(m.caches) for m in members)
    generator = torch.Generator().manual_seed(cfg.seed)
    steps: Iterable[int] = range(cfg.iterations)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        steps = bar = tqdm(steps, desc=f"reconstruct {name}", leave=False)
    for r in rounders:
        r.attach()
    try:
        with torch.enable_grad():
            for step in steps:
                index = torch.randperm(members[0].caches[0].num_images, generator=generator)[: cfg.batch_size]
                rec = 0
                for member in members:  # every call of every tied block on the same images, their losses averaged
                    for cache in member.caches:
                        quant_in, float_in, target = cache.select(index, device)
                        inputs = _mix_qdrop(quant_in, float_in, cfg.qdrop_prob, generator)
                        rec = rec + _block_loss(member.name, _run_block(member.module, inputs), target, extra_loss)
                rec = rec / num_calls
                beta = _beta_at(step, cfg)
                loss = rec
                if beta is not None and rounders and cfg.round_weight > 0:
                    loss = rec + cfg.round_weight * sum(r.regularizer(beta) for r in rounders)
                if not torch.isfinite(loss):
                    raise ReconstructionError(f"block {name!r}: the reconstruction loss became {float(loss)} at "
                                              f"iteration {step}; lower `lr` / `scale_lr`")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if bar is not None and step % 10 == 0:
                    bar.set_postfix(loss=f"{rec.item():.4g}", beta="warm-up" if beta is None else f"{beta:.1f}")
    finally:
        if bar is not None:
            bar.close()
        for r in rounders:
            r.detach()
        for p in scales:
            p.requires_grad_(False)


__all__ = ["reconstruct", "ReconstructionConfig", "ReconstructionResult", "BlockResult", "ReconstructionError"]
