"""Sparse outlier quantization of long-tailed activations (TASKQ's sparse part) — **simulated**.

SiLU activations of detectors have a short negative tail and a long positive one: a range wide enough for the
few largest values leaves the bulk of them with a handful of levels at 4 bits. Here an activation is split into
a *sparse* part, the top-``ratio`` fraction of its elements by magnitude (default 0.5 %), which passes through at
high precision (float, or ``outlier_bits``-bit with its own per-tensor scale), and a *dense* rest quantized by an
ordinary :class:`~detq_hooks.quantizers.FakeQuantizer` whose range is found by an Lp/MSE search on the dense
values alone, so it is tight.

Simulated: the outliers are chosen per forward (a top-k of ``|x|`` over the whole tensor) and kept in the same
dense tensor. A deployed model needs a sparse side path (outlier values plus their indices beside the low-bit
tensor, and a sparse correction of the next layer's output); :mod:`detq_hooks.export` has none, so exporting a
model that contains a :class:`SparseOutlierQuantizer` raises :class:`SparseQuantizationError` rather than
silently writing a dense-only graph. :meth:`SparseOutlierQuantizer.storage_cost` says what the side path would
cost.

Example:
    >>> import torch
    >>> from detq_hooks.quantizers import FakeQuantizer
    >>> from detq_hooks.sparse import SparseOutlierQuantizer
    >>> x = torch.nn.functional.silu(3 * torch.randn(10_000))
    >>> q = SparseOutlierQuantizer(FakeQuantizer(bits=4, symmetric=False), ratio=0.005)
    >>> q.calibrate_from(x)
    >>> x_hat = q(x)  # 50 largest |x| exact, the rest on a 16-level grid fit to the dense values
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .quantizers import FakeQuantizer, _mode, quant_range
from .ranges import MAX_SEARCH_SAMPLES, mse_range

MAX_RATIO = 0.2
INDEX_BITS = 32  # one int32 flat index per outlier in a coordinate-list side path


class SparseQuantizationError(ValueError):
    """A sparse outlier quantizer is configured or used in a way it does not support; the message says which."""


def check_ratio(ratio: float) -> float:
    """``ratio`` as a float, or :class:`SparseQuantizationError` unless it is in (0, 0.2]."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= MAX_RATIO:
        raise SparseQuantizationError(
            f"`ratio` = {ratio!r} must be a fraction in (0, {MAX_RATIO}] (the share of elements kept as outliers; "
            "TASKQ uses 0.001-0.01)"
        )
    return float(ratio)


def outlier_mask(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """``True`` at the ``ceil(ratio · numel)`` elements of largest magnitude (more on exact ties)."""
    flat = x.detach().reshape(-1).abs()
    k = min(flat.numel(), max(1, math.ceil(ratio * flat.numel())))
    threshold = torch.kthvalue(flat.float(), flat.numel() - k + 1).values
    return x.detach().abs() >= threshold


def dense_range(x: torch.Tensor, ratio: float, bits: int, symmetric: bool, p: float = 2.4) -> tuple[float, float]:
    """Lp-optimal (``p = 2``: MSE) clipping range of ``x`` without its top-``ratio`` outliers."""
    values = x.detach().float().reshape(-1)
    dense = values[~outlier_mask(values, ratio)]
    if dense.numel() == 0:
        raise SparseQuantizationError("no dense values left after removing the outliers")
    if dense.numel() > MAX_SEARCH_SAMPLES:  # the search costs O(candidates x samples)
        g = torch.Generator().manual_seed(0)
        dense = dense[torch.randperm(dense.numel(), generator=g)[:MAX_SEARCH_SAMPLES].to(dense.device)]
    return mse_range(dense.cpu(), dense.min().item(), dense.max().item(), bits, symmetric, p)


class SparseOutlierQuantizer(nn.Module):
    """Dense low-bit quantization plus a sparse high-precision path for the largest ``ratio`` of the elements.

    Simulated only (see the module docstring): export raises :class:`SparseQuantizationError`.

    Args:
        dense: the activation quantizer of the dense part (a per-tensor :class:`FakeQuantizer`; its step size is
            still learned by LSQ in QAT or block reconstruction).
        ratio: fraction of elements kept as outliers, in (0, 0.2]; default 0.005.
        outlier_bits: ``None`` keeps outliers in float; 8 (or 2..16) quantizes them symmetrically with a
            per-tensor scale from their largest magnitude, computed per forward.
        norm: ``p`` of the Lp error the dense range minimises (2: MSE; 2.4 as in QDrop/BRECQ calibration).

    ``ratio`` and ``outlier_bits`` are buffers (0 meaning float), so checkpoints carry them; the dense quantizer
    is a sub-module with its own scale and zero point.
    """

    def __init__(self, dense: FakeQuantizer, ratio: float = 0.005, *, outlier_bits: Optional[int] = None,
                 norm: float = 2.4) -> None:
        super().__init__()
        if not isinstance(dense, FakeQuantizer) or dense.per_channel:
            raise SparseQuantizationError(f"`dense` must be a per-tensor FakeQuantizer, got {dense!r}")
        if outlier_bits is not None and (isinstance(outlier_bits, bool) or not isinstance(outlier_bits, int)
                                         or not 2 <= outlier_bits <= 16):
            raise SparseQuantizationError(f"`outlier_bits` = {outlier_bits!r} must be None (float) or an integer in [2, 16]")
        self.dense = dense
        self.norm = float(norm)
        self.register_buffer("ratio_state", torch.tensor(check_ratio(ratio), dtype=torch.float64))
        self.register_buffer("outlier_bits_state", torch.tensor(outlier_bits or 0, dtype=torch.int32))
        self.last_outlier_fraction = 0.0  # of the latest forward: ties can add a few

    @property
    def ratio(self) -> float:
        return float(self.ratio_state)

    @property
    def outlier_bits(self) -> Optional[int]:
        return int(self.outlier_bits_state) or None

    # The layer-facing flags are the dense quantizer's (curriculum, reports and checkpoints read them).
    @property
    def enabled(self) -> bool:
        return self.dense.enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self.dense.enabled = value

    @property
    def bits(self) -> int:
        return self.dense.bits

    @property
    def initialized(self) -> bool:
        return self.dense.initialized

    @torch.no_grad()
    def calibrate_from(self, x: torch.Tensor) -> tuple[float, float]:
        """Set the dense quantizer's range by the Lp search on ``x`` without its outliers; returns the range."""
        lo, hi = dense_range(x, self.ratio, self.dense.bits, self.dense.symmetric, self.norm)
        self.dense.set_range(torch.tensor([lo]), torch.tensor([hi]))
        return lo, hi

    def _outliers(self, x: torch.Tensor) -> torch.Tensor:
        bits = self.outlier_bits
        if bits is None:
            return x
        qmin, qmax = quant_range(bits, True)
        scale = x.detach().abs().amax().clamp_min(1e-8) / qmax
        return x + ((torch.round(x / scale).clamp(qmin, qmax) * scale) - x).detach()  # straight-through

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _mode() == "export" or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
            raise SparseQuantizationError(
                "sparse outlier quantization is simulated: an exported graph would need a sparse side path "
                "(outlier values and indices) that detq_hooks.export does not write; for a deployable model run TASKQ "
                "without it (e.g. `{'preset': 'w4a8-taskq', 'ptq': {'sparse': False}}`; YAML `ptq: {sparse: false}`)"
            )
        if not self.dense.enabled:
            return x
        mask = outlier_mask(x, self.ratio)
        self.last_outlier_fraction = float(mask.float().mean())
        if self.dense.observer is not None:  # calibrate(): the observer sees the dense values only
            self.dense.observer.observe(x[~mask])
            return x
        if not self.dense.initialized:
            self.calibrate_from(x)
        return torch.where(mask, self._outliers(x), self.dense(x))

    def storage_cost(self) -> dict[str, float]:
        """Bits per element an exported tensor would take: the dense code plus, for the ``ratio`` share of
        outliers, a value and a flat index each (the honest price of the sparse path)."""
        sparse = self.ratio * ((self.outlier_bits or 32) + INDEX_BITS)
        return {"dense_bits": float(self.dense.bits), "sparse_bits": sparse,
                "bits_per_element": self.dense.bits + sparse}

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}, outlier_bits={self.outlier_bits or 'float'}, simulated"


def outlier_ratio(quantizer: Optional[nn.Module]) -> Optional[float]:
    """The outlier ratio of a layer's input quantizer, ``None`` when it is not sparse."""
    return quantizer.ratio if isinstance(quantizer, SparseOutlierQuantizer) else None


def add_outlier_quantizers(model: nn.Module, ratio: float = 0.005, *, skip_roles=("first",)) -> list[str]:
    """Wrap the per-tensor activation (input) quantizer of every quantized layer of ``model`` in a
    :class:`SparseOutlierQuantizer` (TASKQ's sparse part; layers whose role is in ``skip_roles`` — the image input
    of the first layer has no long tail — are left dense). Idempotent; returns the names of the wrapped layers.
    The ratio travels in the checkpoint's per-layer plan (``input_outliers``)."""
    from .modules import is_quantized_module

    ratio = check_ratio(ratio)
    todo = []
    for name, layer in model.named_modules():
        q = getattr(layer, "input_quantizer", None) if is_quantized_module(layer) else None
        if q is None or isinstance(q, SparseOutlierQuantizer) or getattr(layer, "detq_layer_role", "body") in skip_roles:
            continue
        if not isinstance(q, FakeQuantizer) or q.per_channel:
            raise SparseQuantizationError(f"layer {name!r}: its input quantizer is not a per-tensor FakeQuantizer")
        todo.append((name, layer, q))
    for _, layer, q in todo:  # checked first: all or nothing
        layer.input_quantizer = SparseOutlierQuantizer(q, ratio)
    return [n for n, _, _ in todo]


__all__ = ["SparseOutlierQuantizer", "SparseQuantizationError", "dense_range", "outlier_mask", "check_ratio",
           "outlier_ratio", "add_outlier_quantizers"]
