"""Deployed integer models (issue 10): file size, CPU latency in onnxruntime and OpenVINO, and mAP50-95.

    YOLO_OFFLINE=1 python benchmarks/bench_deploy.py [--sizes 320 640 --reps 20 --rounds 5 --threads 2
        --model yolo11n.yaml --imgsz 160 --num-train 256 --num-val 64 --float-epochs 20]

From the cached float YOLO11n reference (``detq_hooks.tools.zoo``: 20 epochs from scratch at 160 px on 256 synthetic
images, trained once) this builds, with the same calibration images (``--calib`` training images):

* float: ONNX (onnxruntime, f32) and the same file in OpenVINO at its default precision (bf16 on CPUs with
  AVX512-BF16/AMX) and at f32;
* ours W8A8 and W4A8 (``quantize_ultralytics`` + ``calibrate``, PTQ from the float model, DFL kept float):
  ``export_onnx(target="onnxruntime")`` in onnxruntime, ``export_openvino`` in OpenVINO (default and f32);
  ``--recipes w8a8+shared`` adds a preset with ``quantization.shared_activations`` (one quantizer per tensor);
* onnxruntime's own ``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations, MinMax) of the float
  ONNX, weighted ops only as Ultralytics' ``onnx_int8_quantize`` does (the decode stays float), in onnxruntime;
* NNCF's PTQ of the float model exactly as Ultralytics' ``export(format="openvino", int8=True)`` runs it
  (``torch2openvino``: preset MIXED, the head's decode and Sigmoid ignored), in OpenVINO.

mAP depends on which images calibrate a model (about ±0.001 here), so with ``--calib-subsets K`` every PTQ model (ours,
``quantize_static``, NNCF) is built K times, from K disjoint sets of ``--calib`` training images, and each mAP is
reported as the mean over them with its min and max and the per-set values; the comparison with a peer is then
paired (the same images calibrate both). Latency is measured on the files of the first set.

Latency: batch 1, ``--threads`` threads, every runner of one image size timed side by side in ``--rounds``
interleaved rounds of ``--reps`` calls (median, p10, p90 and per-round medians), so contention on a shared
machine hits all alike. mAP50-95: each exported model at the training size (160 px) on the 64 synthetic
validation images, scored by pycocotools (``detq_hooks.evaluation``), beside the PyTorch fake-quant model.
Writes ``results.json``, ``results.md`` and ``results.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from suite import paired_differences  # noqa: E402  (benchmarks/ is this script's folder)

from detq_hooks.ultralytics.deploy import export_head_mode  # noqa: E402  (after the offline environment variables)


def recipe_spec(name: str):
    """A preset name, or ``<preset>+shared``: that preset with ``quantization.shared_activations`` on."""
    if name.endswith("+shared"):
        return {"preset": name[: -len("+shared")], "name": name, "quantization": {"shared_activations": True}}
    return name


def build_models(ref_pt: str, calib_images: list[np.ndarray], recipes: list[str]) -> dict:
    from ultralytics.nn.tasks import load_checkpoint

    import detq_hooks as dq
    from detq_hooks.recipe import load_recipe
    from detq_hooks.ultralytics.trainer import quantize_ultralytics

    float_model, _ = load_checkpoint(ref_pt)
    float_model = float_model.float().eval()
    models = {"float": float_model}
    batches = [torch.from_numpy(np.stack(calib_images[i:i + 8])) for i in range(0, len(calib_images), 8)]
    for r in recipes:
        qm = quantize_ultralytics(copy.deepcopy(float_model), load_recipe(recipe_spec(r)))
        dq.calibrate(qm.eval(), batches)
        models[r] = qm.eval()
    return models


def export_all(models: dict, imgsz: int, out: Path, calib: list[np.ndarray]) -> dict[str, dict]:
    """{variant: {"path", "runtime", "precision"?, "bytes"}} for one image size."""
    from detq_hooks.deploy import convert_onnx_to_openvino, export_openvino, file_bytes
    from detq_hooks.export import export_onnx

    out.mkdir(parents=True, exist_ok=True)
    x = torch.zeros(1, 3, imgsz, imgsz)
    names = dict(input_names=["images"], output_names=["output0"])
    calib_t = [torch.from_numpy(c[None]) for c in _resize(calib, imgsz)]
    files = {}
    fm = export_head_mode(models["float"])
    export_onnx(fm, x, out / "float.onnx", **names)
    convert_onnx_to_openvino(out / "float.onnx", out / "float_ov" / "float.xml")
    files["float"] = {"onnx": out / "float.onnx", "ov": out / "float_ov" / "float.xml"}
    for r, m in models.items():
        if r == "float":
            continue
        qm = export_head_mode(m)
        export_onnx(qm, x, out / f"{r}_ort.onnx", target="onnxruntime", calibration_inputs=calib_t, **names)
        export_openvino(qm, x, out / f"{r}_ov" / f"{r}.xml", **names)
        files[r] = {"onnx": out / f"{r}_ort.onnx", "ov": out / f"{r}_ov" / f"{r}.xml"}
    files["ort_quantize_static"] = {"onnx": ort_quantize_static(out / "float.onnx", out / "ort_qs.onnx", calib_t)}
    files["nncf_ptq"] = {"ov": nncf_ptq(models["float"], imgsz, out / "nncf_ov" / "nncf.xml", calib_t)}
    for v in files.values():
        v["bytes"] = {k: file_bytes(p) for k, p in v.items()}
    return files


def _resize(images: list[np.ndarray], imgsz: int) -> list[np.ndarray]:
    import cv2

    if images[0].shape[-1] == imgsz:
        return images
    return [cv2.resize(im.transpose(1, 2, 0), (imgsz, imgsz), interpolation=cv2.INTER_LINEAR).transpose(2, 0, 1).copy()
            for im in images]


def ort_quantize_static(float_onnx: Path, out: Path, calib: list[torch.Tensor]) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"images": c.numpy()} for c in calib])

        def get_next(self):
            return next(self.it, None)

    import onnx

    # as Ultralytics' own `onnx_int8_quantize`: only weighted ops, so the head decode stays float (one int8 scale
    # over box pixels and class probabilities would round every score to 0), here with per-channel weights
    exclude = [n.name for n in onnx.load(str(float_onnx)).graph.node if n.op_type not in {"Conv", "Gemm", "MatMul"}]
    quantize_static(str(float_onnx), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=exclude)
    return out


def nncf_ptq(float_model, imgsz: int, xml: Path, calib: list[torch.Tensor]) -> Path:
    import nncf
    import openvino as ov
    from ultralytics.nn.modules import Detect
    from ultralytics.utils.export.openvino import torch2openvino

    m = export_head_mode(float_model, "openvino")
    ds = nncf.Dataset([c for c in calib], lambda t: t.numpy())
    ov_model = torch2openvino(m, torch.zeros(1, 3, imgsz, imgsz), quantize=8, calibration_dataset=ds,
                              int8_detect=isinstance(m.model[-1], Detect))
    xml.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(ov_model, str(xml), compress_to_fp16=False)
    return xml


def runners_for(files: dict, threads: int) -> dict:
    from detq_hooks.deploy import make_runner

    r = {}
    for name, v in files.items():
        if "onnx" in v:
            r[f"{name} | onnxruntime"] = make_runner(v["onnx"], "onnxruntime", threads)
        if "ov" in v:
            r[f"{name} | openvino default"] = make_runner(v["ov"], "openvino", threads)
            r[f"{name} | openvino f32"] = make_runner(v["ov"], "openvino", threads, "f32")
    return r


def evaluate_runner(run, ds, imgsz: int, images) -> float:
    from detq_hooks.evaluation import coco_evaluate
    from detq_hooks.ultralytics.evaluate import predict_coco

    dets, _ = predict_coco(lambda a: torch.from_numpy(np.concatenate([run(a[i:i + 1])[0] for i in range(len(a))])),
                           images, ds.coco_val_json, "Detect", imgsz, batch=8)
    return coco_evaluate(ds.coco_val_json, dets).map50_95


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", type=int, nargs="+", default=[320, 640])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calib", type=int, default=64, help="training images used for calibration (all methods)")
    p.add_argument("--calib-subsets", type=int, default=3,
                   help="disjoint calibration sets the mAP is measured over (as many as the training images allow)")
    p.add_argument("--recipes", nargs="+", default=["w8a8", "w4a8"],
                   help="presets to calibrate and export; <preset>+shared: with quantization.shared_activations")
    p.add_argument("--out", default="/tmp/detq_bench_deploy")
    p.add_argument("--skip-map", action="store_true")
    # the float model, its synthetic data and the size mAP is measured at (benchmarks/run.py --quick shrinks them)
    p.add_argument("--model", default="yolo11n.yaml")
    p.add_argument("--imgsz", type=int, default=160)
    p.add_argument("--num-train", type=int, default=256)
    p.add_argument("--num-val", type=int, default=64)
    p.add_argument("--float-epochs", type=int, default=20)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import openvino as ov
    import onnxruntime as ort

    from detq_hooks.tools.data import make_synthetic_dataset
    from detq_hooks.ultralytics.evaluate import evaluate, load_images
    from detq_hooks.tools.zoo import cached_float_checkpoint, synthetic_data_dir

    t0 = time.time()
    imgsz = args.imgsz
    ds = make_synthetic_dataset(synthetic_data_dir(args.num_train, args.num_val, imgsz), num_train=args.num_train,
                                num_val=args.num_val, imgsz=imgsz, seed=0)
    ref = cached_float_checkpoint(ds, args.model, epochs=args.float_epochs, imgsz=imgsz, verbose=False)
    all_train = [a for _, a, _ in load_images(ds.train_images, imgsz)]
    subsets = [all_train[k * args.calib:(k + 1) * args.calib]
               for k in range(calibration_set_count(args.calib_subsets, len(all_train), args.calib))]
    train_images = subsets[0]
    models = build_models(str(ref.checkpoint), train_images, args.recipes)
    report = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "threads": args.threads, "shared": True},
              "versions": {"onnxruntime": ort.__version__, "openvino": ov.__version__, "torch": torch.__version__},
              "float_reference": {"checkpoint": str(ref.checkpoint), "map50_95": ref.map50_95},
              "sizes": {}, "map50_95": {}, "map_imgsz": imgsz}
    exported = {}  # image size -> files (the mAP size is often a latency size too)

    if not args.skip_map:  # accuracy at the training size, exported the same way
        val = load_images(ds.val_images, imgsz)
        exported[imgsz] = map_over_calibration_sets(
            report, len(subsets),
            lambda k: (models if k == 0 else build_models(str(ref.checkpoint), subsets[k], args.recipes), subsets[k]),
            lambda k, ms, calib: export_all(ms, imgsz, out / (f"s{imgsz}" if k == 0 else f"s{imgsz}_calib{k}"), calib),
            lambda m: evaluate(export_head_mode(m), ds.val_images, ds.coco_val_json, imgsz, head_type="Detect",
                               images=val)[0].map50_95,
            lambda run: evaluate_runner(run, ds, imgsz, val), args.threads)

    time_sizes_and_write(report, args, out, exported, lambda size: export_all(models, size, out / f"s{size}", train_images), t0)


def time_sizes_and_write(report: dict, args, out: Path, exported: dict, export_at, started: float) -> None:
    """Latency of every exported file at each ``args.sizes`` (side by side), then results.json/.md/.png.
    ``exported``: files already written per size; ``export_at(size)`` writes the others."""
    from detq_hooks.deploy import runtime_precisions, time_openvino_nodes, time_runners

    for size in args.sizes:
        files = exported.get(size) or export_at(size)
        runners = runners_for(files, args.threads)
        x = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
        lat = time_runners(runners, x, reps=args.reps, rounds=args.rounds)
        del runners
        # the plugin's own node times: a steadier figure than wall clock on a shared machine (second pass)
        nodes = time_openvino_nodes({f"{n} | openvino {p or 'default'}": (v["ov"], p) for n, v in files.items()
                                     if "ov" in v for p in (None, "f32")}, x, args.threads, args.reps, args.rounds)
        prec = {n: runtime_precisions(v["ov"]) for n, v in files.items() if "ov" in v}
        report["sizes"][size] = {"latency": lat, "openvino_node_ms": nodes,
                                 "bytes": {n: v["bytes"] for n, v in files.items()}, "openvino_conv_precisions": prec}
        print(size, json.dumps({k: round(v["median_ms"], 2) for k, v in lat.items()}, indent=1), flush=True)
    report["seconds"] = round(time.time() - started, 1)
    (out / "results.json").write_text(json.dumps(report, indent=2, default=str))
    md = table(report)
    (out / "results.md").write_text(md)
    print(md)
    plot(report, out / "results.png")
    print(f"written {out / 'results.json'}, results.md, results.png")


def table(report: dict) -> str:
    lines = []
    acc = report.get("map50_95", {})
    for imgsz, r in report["sizes"].items():
        lines += [f"\n### {report.get('detector', 'YOLO11n')} {imgsz} px, batch 1, {report['machine']['threads']} threads (shared machine)\n",
                  "| model | runtime | latency median ms (p10-p90) | vs float f32 | vs float default | "
                  f"OpenVINO node time ms (p10-p90) | file MB | mAP50-95 ({report.get('map_imgsz', 160)} px) |",
                  "|---|---|---|---|---|---|---|---|"]
        lat = r["latency"]
        f32 = {"onnxruntime": lat.get("float | onnxruntime", {}).get("median_ms"),
               "openvino": lat.get("float | openvino f32", {}).get("median_ms")}
        dflt = {"onnxruntime": f32["onnxruntime"], "openvino": lat.get("float | openvino default", {}).get("median_ms")}
        for k, v in lat.items():
            name, runtime = k.split(" | ")
            rt = runtime.split()[0]
            size = r["bytes"][name]["onnx" if rt == "onnxruntime" else "ov"] / 1e6
            node = r.get("openvino_node_ms", {}).get(k)
            node_cell = f"{node['median_ms']:.2f} ({node['p10_ms']:.2f}-{node['p90_ms']:.2f})" if node else ""
            lines.append(f"| {name} | {runtime} | {v['median_ms']:.2f} ({v['p10_ms']:.2f}-{v['p90_ms']:.2f}) | "
                         f"{f32[rt] / v['median_ms']:.2f}x | {dflt[rt] / v['median_ms']:.2f}x | {node_cell} | "
                         f"{size:.2f} | {map_cell(report, k)} |")
    if acc:
        lines += ["\n| model | mAP50-95 PyTorch fake-quant |", "|---|---|"]
        lines += [f"| {k.split(' | ')[0]} | {map_cell(report, k)} |" for k in acc if k.endswith("pytorch")]
        lines += paired_lines(report)
    return "\n".join(lines) + "\n"


def map_cell(report: dict, key: str) -> str:
    """The mean mAP over the calibration sets, with (min-max) where there were several."""
    mean, values = report.get("map50_95", {}).get(key), report.get("map50_95_subsets", {}).get(key, [])
    if mean is None:
        return ""
    return f"{mean:.4f}" + (f" ({min(values):.4f}-{max(values):.4f})" if len(values) > 1 else "")


def paired_lines(report: dict) -> list[str]:
    """Each of our exported W8A8 models minus the peer in the same runtime, calibration set by calibration set."""
    rows = [f"| {ours.replace(' | ', ', ')} | {peer.replace(' | ', ', ')} | {' / '.join(f'{d:+.4f}' for d in diffs)} | "
            f"{sum(d > 0 for d in diffs)} of {len(diffs)} |"
            for ours, peer, diffs in paired_differences(report.get("map50_95_subsets", {}))]
    if not rows:
        return []
    return ["\n| ours | peer | mAP50-95 difference per calibration set | sets ours ahead |", "|---|---|---|---|", *rows]


def calibration_set_count(wanted: int, images: int, per_set: int) -> int:
    """How many disjoint sets of ``per_set`` images ``images`` training images give: at most ``wanted``, at least 1."""
    return max(1, min(wanted, images // max(1, per_set)))


def map_over_calibration_sets(report: dict, num_sets: int, calibrated, export, score_model, score_runner,
                              threads: int) -> dict:
    """mAP of every model and exported file for each calibration set k: ``calibrated(k)`` gives (models,
    calibration inputs), ``export(k, models, calib)`` the files, ``score_model`` / ``score_runner`` an mAP. The float
    model needs no calibration and is scored on the first set only. Writes the mean, the per-set values and the
    number of sets into ``report``; returns the first set's files (the ones latency is timed on)."""
    per_set: dict[str, list[float]] = {}
    first = None
    for k in range(num_sets):
        models, calib = calibrated(k)
        files = export(k, models, calib)
        first = first or files
        for name, m in models.items():
            if k == 0 or name != "float":
                per_set.setdefault(f"{name} | pytorch", []).append(score_model(m))
        for key, run in runners_for(files, threads).items():
            if k == 0 or not key.startswith("float |"):
                per_set.setdefault(key, []).append(score_runner(run))
        print(f"calibration set {k}:", json.dumps({n: round(v[-1], 4) for n, v in per_set.items()}), flush=True)
    report["map50_95"] = {n: float(np.mean(v)) for n, v in per_set.items()}
    report["map50_95_subsets"] = per_set
    report["calib_subsets"] = num_sets
    print(json.dumps(report["map50_95"], indent=1), flush=True)
    return first


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(report["sizes"])
    fig, axes = plt.subplots(1, len(sizes), figsize=(7 * len(sizes), 6), squeeze=False)
    for ax, imgsz in zip(axes[0], sizes):
        lat = report["sizes"][imgsz]["latency"]
        names = list(lat)
        med = [lat[n]["median_ms"] for n in names]
        err = [[lat[n]["median_ms"] - lat[n]["p10_ms"] for n in names], [lat[n]["p90_ms"] - lat[n]["median_ms"] for n in names]]
        ax.barh(range(len(names)), med, xerr=err, color=["#888" if n.startswith("float") else "#3a7" if n.startswith("w") else "#c84" for n in names])
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("latency ms (median, p10-p90)")
        ax.set_title(f"{report.get('detector', 'YOLO11n')} {imgsz} px, batch 1, {report['machine']['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    main()
