"""ONNX export of a fake-quantized model as a QuantizeLinear/DequantizeLinear (QDQ) graph.

Every fake quantizer becomes a QuantizeLinear → DequantizeLinear pair, the form onnxruntime and TensorRT
fuse into integer kernels. ONNX's integer containers are 8 bits wide: weights go to int8 (symmetric),
activations to uint8 (asymmetric). Lower bit widths are represented exactly but not compactly: a Clip to
the representable range precedes QuantizeLinear, so every code lies in the 4-bit (or 2..7-bit) range while
being stored in an 8-bit container. :func:`export_onnx` reports how many QDQ pairs of each width it wrote.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .quantizers import iter_quantizers, quantizer_mode


@dataclass
class ExportResult:
    path: Path
    quantize_linear: int = 0
    dequantize_linear: int = 0
    bits_histogram: dict[int, int] = field(default_factory=dict)  # quantizer bit width -> count

    def __fspath__(self) -> str:
        return str(self.path)


def _as_tuple(x: Any) -> tuple:
    return x if isinstance(x, tuple) else (x,)


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | Path,
    *,
    input_names: Optional[Sequence[str]] = None,
    output_names: Optional[Sequence[str]] = None,
    dynamic_axes: Optional[dict] = None,
    opset: int = 17,
) -> ExportResult:
    """Export a quantized model to ONNX with QDQ pairs (and check the file with ``onnx.checker``).

    Args:
        model: a model converted by :func:`detq_hooks.quantize` (a float model exports as plain ONNX).
        example_inputs: a tensor or tuple of tensors for tracing.
        path: where to write the ``.onnx`` file.

    Example:
        >>> res = export_onnx(qmodel, torch.randn(1, 3, 64, 64), "model.onnx")  # doctest: +SKIP
        >>> res.quantize_linear > 0  # doctest: +SKIP
        True
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    bits: dict[int, int] = {}
    for _, q in iter_quantizers(model):
        if q.enabled:
            bits[q.bits] = bits.get(q.bits, 0) + 1
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), quantizer_mode("export"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                _as_tuple(example_inputs),
                str(path),
                dynamo=False,
                opset_version=opset,
                do_constant_folding=True,
                input_names=list(input_names) if input_names else None,
                output_names=list(output_names) if output_names else None,
                dynamic_axes=dynamic_axes,
            )
    finally:
        model.train(was_training)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    ops = [n.op_type for n in proto.graph.node]
    return ExportResult(path, ops.count("QuantizeLinear"), ops.count("DequantizeLinear"), bits)


def onnx_session(path: str | Path, threads: Optional[int] = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _flatten(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flatten(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _flatten(v)]
    return []


def compare_onnx(model: nn.Module, path: str | Path, inputs: Any) -> dict[str, float]:
    """Run the ONNX file in onnxruntime and the PyTorch model on the same inputs.

    Returns ``max_abs`` (largest absolute difference over all outputs), ``max_rel`` (that divided by the
    largest absolute PyTorch output) and ``mismatch_fraction`` (share of elements differing by more than
    1e-3 of the output range, i.e. where a rounding decision flipped).
    """
    sess = onnx_session(path)
    inputs = _as_tuple(inputs)
    feed = {i.name: t.detach().cpu().numpy() for i, t in zip(sess.get_inputs(), inputs)}
    onnx_out = sess.run(None, feed)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        torch_out = _flatten(model(*inputs))
    model.train(was_training)
    max_abs, ref_scale, mismatched, total = 0.0, 0.0, 0, 0
    for t, o in zip(torch_out, onnx_out):
        t = t.detach().cpu().float().numpy()
        if t.shape != o.shape:
            raise ValueError(f"ONNX output shape {o.shape} differs from PyTorch's {t.shape}")
        d = np.abs(t - o.astype(np.float32))
        max_abs = max(max_abs, float(d.max(initial=0.0)))
        rng = float(np.abs(t).max(initial=0.0))
        ref_scale = max(ref_scale, rng)
        mismatched += int((d > 1e-3 * max(rng, 1e-6)).sum())
        total += d.size
    return {
        "max_abs": max_abs,
        "max_rel": max_abs / max(ref_scale, 1e-12),
        "mismatch_fraction": mismatched / max(total, 1),
    }


__all__ = ["export_onnx", "compare_onnx", "onnx_session", "ExportResult"]
