"""Export of a fake-quantized model as the integer model a runtime deploys.

:func:`export_onnx` writes a clean QuantizeLinear/DequantizeLinear (QDQ) ONNX graph: every weight is stored as
its integer codes (``int8`` initializers, per-channel symmetric, zero point 0; ``INT4`` with
``weight_storage="int4"`` at opset ≥ 21) feeding one ``DequantizeLinear``; every activation quantizer is one
``QuantizeLinear`` → ``DequantizeLinear`` pair with a constant scale and zero point; BatchNorm is folded into
the integer weights; no quantizer arithmetic (``Round``, ``Clip``, ``Cast`` of scales ...) is left. A quantizer
whose range is narrower than its 8-bit container (4-bit activations) keeps one ``Clip`` with constant bounds
in front of its ``QuantizeLinear``. ``target="onnxruntime"`` adds the units onnxruntime fuses into
``QLinearConv`` (see :mod:`detq_hooks.onnx_graph`). :func:`detq_hooks.export_openvino` builds on this file.

Files are written to a temporary name and renamed, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .quantizers import iter_quantizers

TARGETS = ("qdq", "onnxruntime", "openvino")
WEIGHT_STORAGES = ("int8", "int4")


class ExportError(ValueError):
    """An export that cannot give the requested integer model (the message names the culprit)."""


@dataclass
class ExportResult:
    path: Path
    quantize_linear: int = 0
    dequantize_linear: int = 0
    bits_histogram: dict[int, int] = field(default_factory=dict)  # quantizer bit width -> count
    file_bytes: int = 0
    integer_weight_bytes: int = 0  # bytes of integer initializers (weight codes, int32 biases)
    float_initializer_bytes: int = 0
    target: str = "qdq"
    weight_storage: str = "int8"
    quantized_convs: int = 0  # Conv nodes whose input and weight are both dequantized integers
    notes: list[str] = field(default_factory=list)  # what could not be done as asked, and what was done

    def __fspath__(self) -> str:
        return str(self.path)


def _as_tuple(x: Any) -> tuple:
    return x if isinstance(x, tuple) else (x,)


def check_exportable(model: nn.Module) -> dict[int, int]:
    """Bit-width histogram of the enabled quantizers; :class:`ExportError` if one was never calibrated."""
    bits: dict[int, int] = {}
    for name, q in iter_quantizers(model):
        if not q.enabled:
            continue
        if not q.initialized:
            raise ExportError(
                f"quantizer {name!r} has no calibrated range (its scale was never initialised); run "
                "detq_hooks.calibrate(model, batches) or train the model before exporting"
            )
        bits[q.bits] = bits.get(q.bits, 0) + 1
    return bits


def _writable_target(path: Path) -> Path:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"cannot create the output folder {str(path.parent)!r}: {e.strerror or e}") from e
    if path.is_dir():
        raise ExportError(f"output path {str(path)!r} is a folder; give a file name")
    if not os.access(path.parent, os.W_OK):
        raise ExportError(f"output folder {str(path.parent)!r} is not writable")
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | Path,
    *,
    input_names: Optional[Sequence[str]] = None,
    output_names: Optional[Sequence[str]] = None,
    dynamic_axes: Optional[dict] = None,
    opset: int = 17,
    target: str = "qdq",
    weight_storage: str = "int8",
    calibration_inputs: Optional[Sequence[Any]] = None,
    integer_adds: bool = True,
) -> ExportResult:
    """Export a quantized model to a clean QDQ ONNX file with integer weights (checked by ``onnx.checker``).

    Args:
        model: a model converted by :func:`detq_hooks.quantize` and calibrated or trained (a float model
            exports as plain ONNX).
        example_inputs: a tensor or tuple of tensors for tracing.
        path: the ``.onnx`` file to write (written whole or not at all).
        opset: ONNX opset, ≥ 13 for per-channel weights, ≥ 21 for ``weight_storage="int4"``.
        target: ``"qdq"`` (QDQ on the inputs of quantized layers: what OpenVINO and TensorRT run as integers)
            or ``"onnxruntime"`` (adds a ``QuantizeLinear`` on each quantized Conv's output and int32 biases,
            so onnxruntime's CPU provider fuses ``QLinearConv``; needs ``calibration_inputs``) or ``"openvino"``
            (the QDQ graph without the requantizers OpenVINO propagates by itself: what
            :func:`detq_hooks.export_openvino` converts).
        weight_storage: ``"int8"`` (any bit width in an 8-bit container) or ``"int4"`` (≤ 4-bit weights packed
            two per byte; onnxruntime and OpenVINO then dequantize those weights to float at load time).
        calibration_inputs: inputs (tensors or tuples) from which ``target="onnxruntime"`` calibrates the
            requantization scales of the Conv outputs.
        integer_adds: with ``target="openvino"`` or ``"onnxruntime"``, put both inputs of each ``Add`` whose sum
            is quantized (the residual adds) on an 8-bit grid, so OpenVINO adds integers and fuses the quantizers
            into the convolutions, and onnxruntime fuses ``QLinearAdd`` and the SiLUs before it
            (:func:`detq_hooks.onnx_graph.integer_adds`; each input is rounded once more than in the fake-quant
            model). ``False``: the trained graph exactly. The ``"qdq"`` target is always the trained graph.

    Example:
        >>> res = export_onnx(qmodel, torch.randn(1, 3, 64, 64), "model.onnx")  # doctest: +SKIP
        >>> res.integer_weight_bytes > res.float_initializer_bytes  # doctest: +SKIP
        True
    """
    import onnx

    from .onnx_graph import (clean_qdq, drop_requantizers_after_selections, graph_summary, pack_int4_weights,
                             share_activation_qdq)
    from .onnx_graph import integer_adds as integer_add_inputs
    from .onnx_ort import make_ort_units
    from .sharing import is_shared

    if target not in TARGETS:
        raise ExportError(f"`target` = {target!r} is not one of {list(TARGETS)}")
    if weight_storage not in WEIGHT_STORAGES:
        raise ExportError(f"`weight_storage` = {weight_storage!r} is not one of {list(WEIGHT_STORAGES)}")
    bits = check_exportable(model)
    if bits and opset < 13:
        raise ExportError(f"`opset` = {opset} is too old: per-channel DequantizeLinear needs opset 13 or later")
    if weight_storage == "int4" and opset < 21:
        raise ExportError(f"`weight_storage` = 'int4' needs INT4 DequantizeLinear, opset 21 or later; got `opset` = {opset}")
    if target == "onnxruntime" and bits and not calibration_inputs:
        raise ExportError("`target` = 'onnxruntime' needs `calibration_inputs` to set the Conv output scales")
    path = _writable_target(Path(path))
    was_training = model.training
    model.eval()
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="detq-export-") as tmp:
        raw = Path(tmp) / "raw.onnx"
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    model,
                    _as_tuple(example_inputs),
                    str(raw),
                    dynamo=False,
                    opset_version=opset,
                    do_constant_folding=True,
                    input_names=list(input_names) if input_names else None,
                    output_names=list(output_names) if output_names else None,
                    dynamic_axes=dynamic_axes,
                )
        finally:
            model.train(was_training)
        proto = onnx.load(str(raw))
    clean_qdq(proto)
    hoist = is_shared(model)
    share_activation_qdq(proto, hoist=hoist)
    if integer_adds and target in ("openvino", "onnxruntime") and integer_add_inputs(proto):
        share_activation_qdq(proto, hoist=hoist)  # the skip tensors are now quantized for every reader
    if target == "openvino":
        drop_requantizers_after_selections(proto)
    if target == "onnxruntime" and bits:
        notes += make_ort_units(proto, [_as_tuple(x) for x in calibration_inputs])
    if weight_storage == "int4":
        packed = pack_int4_weights(proto, {b for b in bits if b <= 4})
        if not packed:
            notes.append("weight_storage='int4': no weight has 4 bits or fewer; weights stay int8")
        else:
            notes.append(
                f"weight_storage='int4': {packed} weight tensors stored as INT4; onnxruntime and OpenVINO CPU "
                "dequantize INT4 Conv weights to float (no integer Conv kernel); use 'int8' storage for integer speed"
            )
    onnx.checker.check_model(proto)
    atomic_write_bytes(path, proto.SerializeToString())
    info = graph_summary(proto)
    for n in notes:
        warnings.warn(n, stacklevel=2)
    return ExportResult(
        path, info["QuantizeLinear"], info["DequantizeLinear"], bits, path.stat().st_size,
        info["integer_bytes"], info["float_bytes"], target, weight_storage, info["quantized_convs"], notes,
    )


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


__all__ = ["export_onnx", "compare_onnx", "onnx_session", "ExportResult", "ExportError", "check_exportable"]
