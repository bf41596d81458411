"""OpenVINO and onnxruntime exports with the residual adds on integers (``integer_adds=True``, the default)
against the trained graph exactly (``integer_adds=False``), beside NNCF's PTQ and onnxruntime's
``quantize_static`` of the same float model.

    YOLO_OFFLINE=1 python benchmarks/bench_integer_adds.py [--recipes w8a8 w8a8+shared --sizes 320 640
        --rounds 15 --json out.json]

From the cached float YOLO11n reference and the calibration images of ``bench_deploy.py`` (same PTQ), for each
recipe and both export modes: mAP50-95 of the IR in OpenVINO (default precision and f32) on the 64 synthetic
validation images at 160 px; the CPU plugin's standalone float nodes (``Subgraph``: a quantizer it could not fuse
into a convolution) and integer ``Eltwise`` adds in its runtime model; and, at each ``--sizes``, two latencies
measured side by side in ``--rounds`` interleaved rounds (2 threads, batch 1): the wall time of one inference
and the sum of the executed nodes' times from the plugin's own profiler (``PERF_COUNT``), which leaves out the
thread scheduling that makes wall times on a shared 2-core VM spread by ±20 %. The same for
``export_onnx(target="onnxruntime")`` in onnxruntime (wall time, mAP, the fused ``QLinearAdd``/``QLinearSigmoid``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def runtime_counts(xml: Path) -> dict[str, int]:
    from detq_hooks.deploy import ov_compiled

    types = [op.get_rt_info()["layerType"].astype(str) for op in ov_compiled(xml).get_runtime_model().get_ops()]
    return {"standalone_subgraphs": types.count("Subgraph"), "eltwise": types.count("Eltwise")}


def time_side_by_side(files: dict[str, Path], size: int, rounds: int, reps: int = 10) -> dict[str, dict]:
    import openvino as ov

    core = ov.Core()
    x = np.zeros((1, 3, size, size), np.float32)
    requests = {}
    for name, xml in files.items():
        for precision in ("default", "f32"):
            cfg = {"INFERENCE_NUM_THREADS": 2, "PERF_COUNT": True, "PERFORMANCE_HINT": "LATENCY"}
            if precision == "f32":
                cfg["INFERENCE_PRECISION_HINT"] = "f32"
            requests[f"{name} | {precision}"] = core.compile_model(str(xml), "CPU", cfg).create_infer_request()
    wall = {k: [] for k in requests}
    nodes = {k: [] for k in requests}
    for req in requests.values():
        for _ in range(5):
            req.infer({0: x})
    for _ in range(rounds):
        for k, req in requests.items():
            w = n = 0.0
            for _ in range(reps):
                t = time.perf_counter()
                req.infer({0: x})
                w += time.perf_counter() - t
                n += sum(p.real_time.total_seconds() for p in req.profiling_info if p.status.name == "EXECUTED")
            wall[k].append(w / reps * 1e3)
            nodes[k].append(n / reps * 1e3)

    def stats(v):
        q = np.percentile(v, [10, 50, 90])
        return {"median_ms": round(float(q[1]), 3), "p10_ms": round(float(q[0]), 3), "p90_ms": round(float(q[2]), 3)}

    return {k: {"wall": stats(wall[k]), "node_sum": stats(nodes[k])} for k in requests}


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--recipes", nargs="+", default=["w8a8", "w8a8+shared"])
    p.add_argument("--sizes", type=int, nargs="+", default=[320, 640])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--out", default="/tmp/detq_bench_integer_adds")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import bench_deploy as bd
    from detq_hooks.deploy import export_openvino, make_runner, ort_op_counts, time_runners
    from detq_hooks.export import export_onnx
    from detq_hooks.tools.data import make_synthetic_dataset
    from detq_hooks.tools.zoo import cached_float_checkpoint, synthetic_data_dir
    from detq_hooks.ultralytics.deploy import export_head_mode
    from detq_hooks.ultralytics.evaluate import load_images

    t0 = time.time()
    ds = make_synthetic_dataset(synthetic_data_dir(256, 64, 160), num_train=256, num_val=64, imgsz=160, seed=0)
    ref = cached_float_checkpoint(ds, "yolo11n.yaml", epochs=20, imgsz=160, verbose=False)
    calib = [a for _, a, _ in load_images(ds.train_images, 160)][:64]
    val = load_images(ds.val_images, 160)
    models = bd.build_models(str(ref.checkpoint), calib, args.recipes)
    out = Path(args.out)
    names = dict(input_names=["images"], output_names=["output0"])
    out.mkdir(parents=True, exist_ok=True)
    report = {"float_map50_95": ref.map50_95, "map50_95": {}, "runtime": {}, "latency": {},
              "onnxruntime": {"map50_95": {}, "ops": {}, "latency": {}}}

    def export_ort(recipe, adds, size):
        path = out / f"{recipe}_{'int' if adds else 'float'}_adds_{size}_ort.onnx"
        calib_s = [torch.from_numpy(c[None]) for c in bd._resize(calib, size)]
        export_onnx(export_head_mode(models[recipe]), torch.zeros(1, 3, size, size), path, target="onnxruntime",
                    calibration_inputs=calib_s, integer_adds=adds, **names)
        return path

    def export(recipe, adds, size):
        xml = out / f"{recipe}_{'int' if adds else 'float'}_adds_{size}" / "m.xml"
        export_openvino(export_head_mode(models[recipe]), torch.zeros(1, 3, size, size), xml, integer_adds=adds, **names)
        return xml

    for r in args.recipes:
        for adds in (False, True):
            key = f"{r}, integer_adds={adds}"
            xml = export(r, adds, 160)
            report["map50_95"][key] = {prec or "default": round(bd.evaluate_runner(make_runner(xml, "openvino", 2, prec),
                                                                                      ds, 160, val), 4)
                                       for prec in (None, "f32")}
            print(key, report["map50_95"][key], flush=True)
            ort160 = export_ort(r, adds, 160)
            report["onnxruntime"]["map50_95"][key] = round(bd.evaluate_runner(make_runner(ort160, "onnxruntime", 2), ds,
                                                                              160, val), 4)
            print(key, "onnxruntime mAP", report["onnxruntime"]["map50_95"][key], flush=True)
    float160 = out / "float_160.onnx"
    export_onnx(export_head_mode(models["float"]), torch.zeros(1, 3, 160, 160), float160, **names)
    qs160 = bd.ort_quantize_static(float160, out / "qs_160.onnx", [torch.from_numpy(c[None]) for c in calib])
    report["onnxruntime"]["map50_95"]["ort_quantize_static"] = round(
        bd.evaluate_runner(make_runner(qs160, "onnxruntime", 2), ds, 160, val), 4)
    for size in args.sizes:
        calib_s = [torch.from_numpy(c[None]) for c in bd._resize(calib, size)]
        files = {f"{r}, integer_adds={adds}": export(r, adds, size) for r in args.recipes for adds in (False, True)}
        files["nncf_ptq"] = bd.nncf_ptq(models["float"], size, out / f"nncf_{size}" / "nncf.xml", calib_s)
        report["runtime"][size] = {k: runtime_counts(v) for k, v in files.items()}
        report["latency"][size] = time_side_by_side(files, size, args.rounds)
        for k, v in report["latency"][size].items():
            print(f"{size} px  {k:40s} wall {v['wall']['median_ms']:7.2f} ms  node sum {v['node_sum']['median_ms']:7.2f} ms"
                  f" ({v['node_sum']['p10_ms']:.2f}-{v['node_sum']['p90_ms']:.2f})", flush=True)
        print(size, "px runtime nodes:", report["runtime"][size], flush=True)
        ort_files = {f"{r}, integer_adds={adds}": export_ort(r, adds, size) for r in args.recipes for adds in (False, True)}
        float_onnx = out / f"float_{size}.onnx"
        export_onnx(export_head_mode(models["float"]), torch.zeros(1, 3, size, size), float_onnx, **names)
        ort_files["ort_quantize_static"] = bd.ort_quantize_static(float_onnx, out / f"qs_{size}.onnx", calib_s)
        keep = ("QLinearConv", "QLinearAdd", "QLinearSigmoid", "QLinearMul", "Add", "Sigmoid")
        report["onnxruntime"]["ops"][size] = {k: {op: ort_op_counts(p)[op] for op in keep} for k, p in ort_files.items()}
        report["onnxruntime"]["latency"][size] = time_runners(
            {k: make_runner(p, "onnxruntime", 2) for k, p in ort_files.items()}, np.zeros((1, 3, size, size), np.float32),
            reps=20, rounds=args.rounds)
        for k, v in report["onnxruntime"]["latency"][size].items():
            print(f"{size} px onnxruntime {k:40s} {v['median_ms']:7.2f} ms ({v['p10_ms']:.2f}-{v['p90_ms']:.2f})",
                  report["onnxruntime"]["ops"][size][k], flush=True)
    report["seconds"] = round(time.time() - t0, 1)
    report["rounds"] = args.rounds
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print(json.dumps({"map50_95": report["map50_95"], "onnxruntime_map50_95": report["onnxruntime"]["map50_95"],
                      "seconds": report["seconds"]}, indent=1))


if __name__ == "__main__":
    main()
