"""Deployable integer models: OpenVINO IR export, and running/timing exported files in their runtimes.

:func:`export_openvino` writes the clean QDQ ONNX of :func:`detq_hooks.export_onnx` and converts it with
OpenVINO's own ONNX frontend: each activation ``QuantizeLinear``/``DequantizeLinear`` pair becomes one
``FakeQuantize`` with our learned scale and zero point, each weight stays an ``i8`` constant with its
per-channel scale (OpenVINO's dequantization subgraph), and the CPU plugin runs every quantized convolution
in ``u8 × i8`` with the requantization and SiLU fused into it as post-ops. Nothing is re-quantized (NNCF is
not involved). :func:`runtime_precisions` reads what the CPU plugin really executed.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
from torch import nn

from .export import ExportError, ExportResult, _writable_target, export_onnx


@dataclass
class OpenVINOExportResult:
    xml: Path
    bin: Path
    onnx: ExportResult  # figures of the QDQ graph the IR was converted from
    file_bytes: int = 0  # .xml + .bin
    notes: list[str] = field(default_factory=list)

    def __fspath__(self) -> str:
        return str(self.xml)


def _require_openvino():
    try:
        import openvino as ov
    except ImportError as e:  # pragma: no cover - the `export` extra installs it
        raise ExportError("OpenVINO export needs the `openvino` package: pip install 'detq-hooks[export]'") from e
    return ov


def convert_onnx_to_openvino(onnx_path: str | Path, xml_path: str | Path) -> tuple[Path, Path]:
    """Convert an ONNX file to OpenVINO IR (``.xml`` + ``.bin``, weights kept at full precision; written
    atomically: both files appear together or not at all)."""
    ov = _require_openvino()
    xml = _writable_target(Path(xml_path))
    if xml.suffix != ".xml":
        raise ExportError(f"OpenVINO IR path {str(xml)!r} must end in .xml")
    binp = xml.with_suffix(".bin")
    with tempfile.TemporaryDirectory(prefix=".detq-ov-", dir=str(xml.parent)) as tmp:
        tmp_xml = Path(tmp) / xml.name
        ov_model = ov.convert_model(str(onnx_path))
        ov.save_model(ov_model, str(tmp_xml), compress_to_fp16=False)
        os.replace(Path(tmp) / binp.name, binp)
        os.replace(tmp_xml, xml)
    return xml, binp


def export_openvino(
    model: nn.Module,
    example_inputs: Any,
    path: str | Path,
    *,
    opset: int = 17,
    weight_storage: str = "int8",
    integer_adds: bool = True,
    **onnx_kwargs,
) -> OpenVINOExportResult:
    """Export a quantized model as an OpenVINO int8 IR (``path`` ends in ``.xml``; ``.bin`` beside it).

    The model goes through :func:`detq_hooks.export_onnx` (integer weights, constant Q/DQ) and OpenVINO's
    ONNX frontend; the learned scales are kept as they are (no NNCF re-quantization). ``integer_adds`` (on by
    default) also puts both inputs of each residual ``Add`` whose sum is quantized on an 8-bit grid, which the
    fake-quant model adds in float: OpenVINO then adds integers and fuses every quantizer into a convolution
    (YOLO11n with shared quantizers: 35 standalone float nodes become 6, 1-5 % less node time, level with
    NNCF's PTQ model; each input is rounded once more, mAP unchanged within 0.002). ``integer_adds=False``
    exports the trained graph exactly.

    Example:
        >>> res = export_openvino(qmodel, torch.zeros(1, 3, 320, 320), "model.xml")  # doctest: +SKIP
        >>> runtime_precisions(res.xml)["Convolution"]  # doctest: +SKIP
        {'u8': 88}
    """
    _require_openvino()
    xml = _writable_target(Path(path))
    if xml.suffix != ".xml":
        raise ExportError(f"OpenVINO IR path {str(xml)!r} must end in .xml")
    with tempfile.TemporaryDirectory(prefix="detq-ov-") as tmp:
        res = export_onnx(model, example_inputs, Path(tmp) / "model.onnx", opset=opset,
                          weight_storage=weight_storage, integer_adds=integer_adds,
                          **{"target": "openvino", **onnx_kwargs})
        xml, binp = convert_onnx_to_openvino(res.path, xml)
        res.path = xml  # the intermediate ONNX file is gone; its graph figures stay in `res`
    size = xml.stat().st_size + binp.stat().st_size
    return OpenVINOExportResult(xml, binp, res, size, list(res.notes))


# ------------------------------------------------------------------ running and timing exported files
def ort_session(path: str | Path, threads: int = 2, optimized_path: Optional[str | Path] = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # no per-initializer warnings
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ov_compiled(path: str | Path, threads: int = 2, precision: Optional[str] = None, perf_count: bool = False):
    """A CPU-compiled OpenVINO model (latency hint). ``precision`` None: the plugin's default (bf16 on CPUs
    with AVX512-BF16/AMX); ``"f32"`` forces float32. ``perf_count``: the plugin times each node
    (``profiling_info`` of its infer requests)."""
    ov = _require_openvino()
    cfg: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    if precision:
        cfg["INFERENCE_PRECISION_HINT"] = precision
    if perf_count:
        cfg["PERF_COUNT"] = True
    return ov.Core().compile_model(str(path), "CPU", cfg)


def runtime_precisions(path_or_compiled, layer_types=("Convolution", "GroupConvolution")) -> dict[str, dict[str, int]]:
    """``{layer type: {runtime precision: count}}`` from OpenVINO's runtime model (what the CPU plugin ran)."""
    cm = ov_compiled(path_or_compiled) if isinstance(path_or_compiled, (str, Path)) else path_or_compiled
    out: dict[str, Counter] = {}
    for op in cm.get_runtime_model().get_ops():
        info = op.get_rt_info()
        lt = info["layerType"].astype(str)
        if lt in layer_types:
            out.setdefault(lt, Counter())[info["runtimePrecision"].astype(str)] += 1
    return {k: dict(v) for k, v in out.items()}


def ort_op_counts(path: str | Path, threads: int = 1) -> Counter:
    """Op types of onnxruntime's optimized graph (e.g. how many Conv became ``QLinearConv``)."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        opt = Path(tmp) / "optimized.onnx"
        ort_session(path, threads, optimized_path=opt)
        proto = onnx.load(str(opt))
    return Counter(n.op_type for n in proto.graph.node)


def make_runner(path: str | Path, runtime: str, threads: int = 2, precision: Optional[str] = None):
    """A ``f(np.ndarray) -> list[np.ndarray]`` running an exported file in ``"onnxruntime"`` or ``"openvino"``."""
    if runtime == "onnxruntime":
        sess = ort_session(path, threads)
        name = sess.get_inputs()[0].name
        return lambda x: sess.run(None, {name: x})
    if runtime == "openvino":
        cm = ov_compiled(path, threads, precision)
        req = cm.create_infer_request()

        def run(x):
            results = req.infer([x])  # one inference, every output read from it
            return [results[o] for o in cm.outputs]

        return run
    raise ValueError(f"`runtime` = {runtime!r} is not one of ['onnxruntime', 'openvino']")


def time_runners(runners: dict[str, Any], x: np.ndarray, reps: int = 50, rounds: int = 5, warmup: int = 5) -> dict[str, dict]:
    """Latency (ms) of several runners measured side by side: ``rounds`` interleaved rounds of ``reps`` calls,
    so contention on a shared machine hits all alike. Returns median, p10, p90 and the per-round medians."""
    def wall_ms(run):
        t = time.perf_counter()
        run(x)
        return (time.perf_counter() - t) * 1e3

    for run in runners.values():
        for _ in range(warmup):
            run(x)
    return _side_by_side({k: (lambda run=run: wall_ms(run)) for k, run in runners.items()}, reps, rounds)


def time_openvino_nodes(files: dict[str, tuple], x: np.ndarray, threads: int = 2, reps: int = 20, rounds: int = 5,
                        warmup: int = 5) -> dict[str, dict]:
    """The OpenVINO CPU plugin's own time of each inference: the sum of its executed nodes' times (``PERF_COUNT``),
    for ``files`` = ``{key: (xml, precision or None)}``, in ``rounds`` interleaved rounds of ``reps`` calls.

    It leaves out the thread scheduling between nodes, which on a shared machine spreads wall-clock latency by
    tens of percent while this sum moves by a few; the two answer different questions (what a user waits for,
    what the kernels cost), so :func:`time_runners` stays the latency. Same keys as ``time_runners``' result."""
    def node_ms(req):
        req.infer([x])
        return sum(p.real_time.total_seconds() for p in req.profiling_info if p.status.name == "EXECUTED") * 1e3

    requests = {}
    for key, (path, precision) in files.items():
        requests[key] = ov_compiled(path, threads, precision, perf_count=True).create_infer_request()
        for _ in range(warmup):
            requests[key].infer([x])
    return _side_by_side({k: (lambda req=req: node_ms(req)) for k, req in requests.items()}, reps, rounds)


def _side_by_side(measures: dict[str, Any], reps: int, rounds: int) -> dict[str, dict]:
    """``rounds`` interleaved rounds of ``reps`` calls of each ``measures`` value (a call returns ms): median, p10,
    p90 over all calls and the median of each round."""
    samples: dict[str, list[float]] = {k: [] for k in measures}
    round_medians: dict[str, list[float]] = {k: [] for k in measures}
    for _ in range(rounds):
        for key, measure in measures.items():
            ts = [measure() for _ in range(reps)]
            samples[key] += ts
            round_medians[key].append(statistics.median(ts))
    out = {}
    for key, ts in samples.items():
        q = np.percentile(ts, [10, 50, 90])
        out[key] = {"median_ms": float(q[1]), "p10_ms": float(q[0]), "p90_ms": float(q[2]),
                    "round_medians_ms": [round(v, 3) for v in round_medians[key]]}
    return out


def file_bytes(path: str | Path) -> int:
    p = Path(path)
    if p.suffix == ".xml":
        return p.stat().st_size + p.with_suffix(".bin").stat().st_size
    return p.stat().st_size


__all__ = [
    "export_openvino",
    "convert_onnx_to_openvino",
    "OpenVINOExportResult",
    "runtime_precisions",
    "ort_op_counts",
    "make_runner",
    "time_runners",
    "time_openvino_nodes",
    "ort_session",
    "ov_compiled",
    "file_bytes",
]
