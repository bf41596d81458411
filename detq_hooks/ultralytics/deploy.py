"""An Ultralytics detection model exported as deployed and measured there: file size, latency in
onnxruntime and OpenVINO (default and f32 precision), and the exported model's COCO mAP.

Float models export as plain ONNX (and the same file as OpenVINO IR); quantized ones as
``export_onnx(target="onnxruntime")`` for onnxruntime and ``export_openvino`` for OpenVINO.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..modules import is_quantized_module


def export_head_mode(model: nn.Module, fmt: str = "onnx") -> nn.Module:
    """A float32 eval copy whose head returns one tensor, as Ultralytics' exporter sets it."""
    m = copy.deepcopy(model).float().eval()
    for mod in m.modules():
        if hasattr(mod, "export") and isinstance(getattr(mod, "export"), bool):
            mod.export = True
        if hasattr(mod, "format"):
            mod.format = fmt
    return m


def export_deployed(model: nn.Module, out_dir: str | Path, imgsz: int,
                    calibration_images: Sequence[np.ndarray]) -> dict[str, Path]:
    """``{"onnxruntime": .onnx, "openvino": .xml}`` for ``model`` at batch 1, ``imgsz`` px."""
    from ..deploy import convert_onnx_to_openvino, export_openvino
    from ..export import export_onnx

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    m = export_head_mode(model)
    x = torch.zeros(1, 3, imgsz, imgsz)
    names = dict(input_names=["images"], output_names=["output0"])
    if not any(is_quantized_module(mod) for mod in m.modules()):
        onnx_path = export_onnx(m, x, out / "model.onnx", **names).path
        return {"onnxruntime": onnx_path, "openvino": convert_onnx_to_openvino(onnx_path, out / "model.xml")[0]}
    calib = [torch.from_numpy(np.asarray(a, np.float32)[None]) for a in calibration_images]
    onnx_path = export_onnx(m, x, out / "model_ort.onnx", target="onnxruntime", calibration_inputs=calib, **names).path
    return {"onnxruntime": onnx_path, "openvino": export_openvino(m, x, out / "model.xml", **names).xml}


def deployed_latency(files: dict[str, dict[str, Path]], imgsz: int, threads: Optional[int] = 2, reps: int = 20,
                     rounds: int = 3) -> dict[str, dict[str, float]]:
    """Median ms per model and runtime (``onnxruntime``, ``openvino``, ``openvino_f32``), all timed side by side."""
    from ..deploy import make_runner, time_runners

    threads = threads or 2
    runners = {}
    for name, f in files.items():
        runners[(name, "onnxruntime")] = make_runner(f["onnxruntime"], "onnxruntime", threads)
        runners[(name, "openvino")] = make_runner(f["openvino"], "openvino", threads)
        runners[(name, "openvino_f32")] = make_runner(f["openvino"], "openvino", threads, "f32")
    x = np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)
    lat = time_runners(runners, x, reps=reps, rounds=rounds)
    out: dict[str, dict[str, float]] = {}
    for (name, rt), v in lat.items():
        out.setdefault(name, {})[rt] = v["median_ms"]
    return out


__all__ = ["export_head_mode", "export_deployed", "deployed_latency"]
