"""Deployed integer RTMDet-tiny (MMDetection, issue 10): file size, CPU latency in onnxruntime and OpenVINO, mAP50-95.

    python benchmarks/bench_deploy_mmdet.py [--sizes 320 640 --reps 20 --rounds 5 --threads 2 --calib 64
        --recipes w8a8 w4a8 --float-epochs 40 --out /tmp/detq_bench_deploy_mmdet]

The MMDetection row of ``bench_deploy.py``, along the path a user takes: the float model is
``integrations/mmdet/rtmdet_tiny_synthetic.py`` trained 40 epochs from scratch at 160 px on 256 synthetic images
(cached, as ``bench_ptq_mmdet.py``'s); ours is PTQ through MMDetection's own ``Runner.train()`` with ``DetQHook``
and the ``<bits>-ptq`` preset (calibration on the first ``--calib`` training images), its checkpoint
``detq_ptq-<bits>.pth`` loaded back with ``load_quantized_detector(config, checkpoint)`` and exported with
``export_onnx(exportable(model), target="onnxruntime")`` and ``export_openvino(exportable(model))``. Beside it,
on the same calibration images: onnxruntime's own ``quantize_static`` (QDQ, per-channel int8 weights, uint8
activations, weighted ops only) of the float ONNX, and NNCF's ``nncf.quantize`` (preset MIXED) of the float
OpenVINO model.

Every file is the detector from the preprocessed image to the head's raw outputs (decoding and NMS are the
head's ``predict_by_feat``, outside the graph). Latency: batch 1, ``--threads`` threads, every runner of one
image size side by side in interleaved rounds (median, p10, p90). mAP50-95: each exported model at 160 px on the
64 synthetic validation images with ``evaluate_exported`` (the config's test pipeline, the head's decoding, the
config's CocoMetric: what ``Runner.test()`` reports), beside the PyTorch models. With ``--calib-subsets K`` (default
3) every PTQ model, ours and the peers', is built from K disjoint sets of ``--calib`` training images (the
training set's images ``k·calib … (k+1)·calib - 1``, through the training pipeline), mAP is reported as the mean
over them with the per-set values (``map50_95_subsets``), and latency is timed on the files of the first set, as
``bench_deploy.py`` does. Writes ``results.json``,
``results.md`` and ``results.png`` under ``--out`` in ``bench_deploy.py``'s format.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

from _mmdet import cached_float_mmdet, mmdet_cfg, synthetic_mmdet_data  # noqa: E402
from bench_deploy import (  # noqa: E402
    calibration_set_count, map_over_calibration_sets, ort_quantize_static, time_sizes_and_write)

CONFIG = "rtmdet_tiny_synthetic"
IMGSZ = 160  # training and mAP size of the cached float model


def float_detector(cfg, checkpoint: Path):
    from mmengine.registry import init_default_scope
    from mmengine.runner import load_checkpoint

    from mmdet.registry import MODELS

    init_default_scope("mmdet")
    model = MODELS.build(cfg.model)
    ckpt = load_checkpoint(model, str(checkpoint), map_location="cpu")
    model.dataset_meta = (ckpt.get("meta") or {}).get("dataset_meta")
    return model.eval()


def ptq_through_runner(cfg, bits: str, calib_batches: int, work: Path) -> Path:
    """``Runner.train()`` with ``DetQHook`` and the PTQ preset: the checkpoint it saves (the user's path)."""
    from mmengine.runner import Runner

    cfg = copy.deepcopy(cfg)
    cfg.work_dir = str(work)
    cfg.custom_imports = dict(imports=["detq_hooks.mmengine"], allow_failed_imports=False)
    cfg.custom_hooks = list(cfg.custom_hooks) + [dict(type="DetQHook", recipe=f"{bits}-ptq",
                                                      calibration_batches=calib_batches)]
    Runner.from_cfg(cfg).train()
    saved = sorted(work.glob("detq_*.pth"))
    if len(saved) != 1:
        raise RuntimeError(f"DetQHook's PTQ run wrote {saved} under {work}, expected one detq_<recipe>.pth")
    return saved[0]


def calibration_inputs(model, cfg, n: int) -> list[torch.Tensor]:
    """The first ``n`` training images through the data preprocessor, one tensor each (what DetQHook saw)."""
    from detq_hooks.mmengine.deploy import _dataloader

    out = []
    for batch in _dataloader(cfg, "train"):
        inputs = model.data_preprocessor(batch, False)["inputs"]
        out += [inputs[i:i + 1] for i in range(inputs.shape[0])]
        if len(out) >= n:
            return out[:n]
    return out


def nncf_ptq_openvino(float_onnx: Path, xml: Path, calib: list[torch.Tensor]) -> Path:
    import nncf
    import openvino as ov

    ov_model = ov.Core().read_model(str(float_onnx))
    quantized = nncf.quantize(ov_model, nncf.Dataset(calib, lambda t: t.numpy()), preset=nncf.QuantizationPreset.MIXED,
                              subset_size=len(calib))
    xml.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(quantized, str(xml), compress_to_fp16=False)
    return xml


def export_all(models: dict, size: int, out: Path, calib: list[torch.Tensor]) -> dict[str, dict]:
    """{variant: {"onnx"/"ov": path, "bytes": {...}}} for one input size."""
    import torch.nn.functional as F

    from detq_hooks.deploy import convert_onnx_to_openvino, export_openvino, file_bytes
    from detq_hooks.export import export_onnx
    from detq_hooks.mmengine.deploy import exportable

    out.mkdir(parents=True, exist_ok=True)
    x = torch.zeros(1, 3, size, size)
    at_size = [c if c.shape[-1] == size else F.interpolate(c, size=(size, size), mode="bilinear", align_corners=False)
               for c in calib]
    names = dict(input_names=["images"])
    export_onnx(exportable(models["float"]), x, out / "float.onnx", **names)
    convert_onnx_to_openvino(out / "float.onnx", out / "float_ov" / "float.xml")
    files = {"float": {"onnx": out / "float.onnx", "ov": out / "float_ov" / "float.xml"}}
    for name, m in models.items():
        if name == "float":
            continue
        export_onnx(exportable(m), x, out / f"{name}_ort.onnx", target="onnxruntime", calibration_inputs=at_size, **names)
        export_openvino(exportable(m), x, out / f"{name}_ov" / f"{name}.xml", **names)
        files[name] = {"onnx": out / f"{name}_ort.onnx", "ov": out / f"{name}_ov" / f"{name}.xml"}
    files["ort_quantize_static"] = {"onnx": ort_quantize_static(out / "float.onnx", out / "ort_qs.onnx", at_size)}
    files["nncf_ptq"] = {"ov": nncf_ptq_openvino(out / "float.onnx", out / "nncf_ov" / "nncf.xml", at_size)}
    for v in files.values():
        v["bytes"] = {k: file_bytes(p) for k, p in v.items()}
    return files


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[320, 640])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calib", type=int, default=64, help="training images used for calibration (all methods)")
    p.add_argument("--recipes", nargs="+", default=["w8a8", "w4a8"], help="bit widths of our PTQ (<bits>-ptq presets)")
    p.add_argument("--calib-subsets", type=int, default=3,
                   help="disjoint calibration sets the mAP is measured over (as many as the training images allow)")
    p.add_argument("--float-epochs", type=int, default=40)
    p.add_argument("--num-train", type=int, default=256)
    p.add_argument("--num-val", type=int, default=64)
    p.add_argument("--out", default="/tmp/detq_bench_deploy_mmdet")
    p.add_argument("--skip-map", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    import onnxruntime as ort
    import openvino as ov

    from detq_hooks.mmengine.deploy import evaluate_exported, load_quantized_detector

    t0 = time.time()
    ds = synthetic_mmdet_data(IMGSZ, args.num_train, args.num_val)
    float_ckpt = cached_float_mmdet(CONFIG, IMGSZ, 8, args.float_epochs, ds)
    cfg = mmdet_cfg(CONFIG, out / "work", IMGSZ, 8, load_from=str(float_ckpt))
    cfg.dump(str(out / "config.py"))
    float_model = float_detector(cfg, float_ckpt)

    def calibrated_on(k: int) -> tuple[dict, list[torch.Tensor]]:
        """Our PTQ models and every tool's calibration inputs from the k-th set of ``--calib`` training images."""
        cfg_k = copy.deepcopy(cfg)
        cfg_k.train_dataloader.dataset.indices = list(range(k * args.calib, (k + 1) * args.calib))
        models = {"float": float_model}
        for bits in args.recipes:
            ckpt = ptq_through_runner(cfg_k, bits, max(1, args.calib // 8), out / "work" / f"{bits}_calib{k}")
            models[bits] = load_quantized_detector(out / "config.py", ckpt)
        return models, calibration_inputs(float_model, cfg_k, args.calib)

    num_sets = calibration_set_count(args.calib_subsets, args.num_train, args.calib)
    models, calib = calibrated_on(0)
    report = {"detector": "RTMDet-tiny", "machine": {"cpu": platform.processor() or platform.machine(),
                                                     "cores": os.cpu_count(), "threads": args.threads, "shared": True},
              "versions": {"onnxruntime": ort.__version__, "openvino": ov.__version__, "torch": torch.__version__},
              "float_reference": {"checkpoint": str(float_ckpt)}, "sizes": {}, "map50_95": {}, "map_imgsz": IMGSZ}
    exported = {}
    torch.set_num_threads(args.threads)

    if not args.skip_map:
        exported[IMGSZ] = map_over_calibration_sets(
            report, num_sets, lambda k: (models, calib) if k == 0 else calibrated_on(k),
            lambda k, ms, cal: export_all(ms, IMGSZ, out / (f"s{IMGSZ}" if k == 0 else f"s{IMGSZ}_calib{k}"), cal),
            lambda m: evaluate_exported(m, None, out / "config.py")["coco/bbox_mAP"],
            lambda run: evaluate_exported(float_model, run, out / "config.py")["coco/bbox_mAP"], args.threads)
        report["float_reference"]["map50_95"] = report["map50_95"]["float | pytorch"]

    time_sizes_and_write(report, args, out, exported, lambda size: export_all(models, size, out / f"s{size}", calib), t0)


if __name__ == "__main__":
    main()
