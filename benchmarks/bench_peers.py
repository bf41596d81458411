"""Other tools' quantization of the same float YOLO11n on the same data, beside ours: COCO mAP50-95 of each.

    YOLO_OFFLINE=1 python benchmarks/bench_peers.py [--qat-epochs 6 --calib 64 --threads 2 --json peers.json
        --model yolo11n.yaml --imgsz 160 --num-train 256 --num-val 64 --float-epochs 20]

From the cached float reference (``detq_hooks.tools.zoo``), with the same first ``--calib`` training images for
every calibration:

* ours: W8A8 PTQ (min-max calibration, PyTorch fake-quant) and W8A8 QAT (``DetQTrainer``, ``--qat-epochs``);
* onnxruntime ``quantize_static`` of the float ONNX (as ``bench_deploy.py``: QDQ, weighted ops), in onnxruntime;
* NNCF PTQ exactly as Ultralytics' ``export(format="openvino", int8=True)`` runs it, in OpenVINO at f32;
* NNCF PyTorch QAT: ``nncf.quantize`` on the PyTorch model, then ``--qat-epochs`` of fine-tuning;
* Ultralytics ``quantize=8`` (INT8 QAT through NVIDIA ModelOpt), ``--qat-epochs`` from the float model.

A tool that cannot run here gets a row with its reason instead of a number. QAT rows also get the float model
fine-tuned with the same budget, the fair reference for them. Every model is scored by one function
(``detq_hooks.ultralytics.evaluate``: the raw network, Ultralytics' NMS, pycocotools) on the val split.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _measure import save_json  # noqa: E402
from bench_deploy import build_models, evaluate_runner, nncf_ptq, ort_quantize_static  # noqa: E402
from bench_ultralytics import modelopt_check, train_eval  # noqa: E402


def failure(exc: BaseException) -> str:
    """The exception in one line (its type and first line), for a row's reason."""
    first_line = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"{type(exc).__name__}: {first_line}"


def nncf_pytorch_qat(float_model, calib: list[torch.Tensor], loader_args: dict, epochs: int):
    """NNCF's PyTorch QAT: ``nncf.quantize`` on the PyTorch model, then fine-tuning with Ultralytics' loss."""
    import nncf
    from ultralytics.models.yolo.detect import DetectionTrainer

    model = copy.deepcopy(float_model).float().eval()
    # The head makes its anchors only when the input shape changes, so they ran in NNCF's tracing pass but not in
    # its statistics pass ("Statistics were not collected for the node /stack/0"): remade at every call instead.
    model.model[-1].dynamic = True
    quantized = nncf.quantize(model, nncf.Dataset(calib), subset_size=len(calib))
    trainer = DetectionTrainer(overrides=loader_args)
    trainer.model = quantized  # the data loader reads the model's strides
    quantized.args = trainer.args
    loader = trainer.get_dataloader(trainer.data["train"], batch_size=loader_args["batch"], rank=-1, mode="train")
    for p in quantized.parameters():  # a loaded checkpoint comes frozen (NNCF's integer parameters stay as they are)
        if p.is_floating_point():
            p.requires_grad_(True)
    optimizer = torch.optim.AdamW(quantized.parameters(), lr=5e-4)
    quantized.train()
    for _ in range(epochs):
        for batch in loader:
            loss, _ = quantized.loss(trainer.preprocess_batch(batch))
            optimizer.zero_grad()
            loss.sum().backward()
            optimizer.step()
    return quantized.eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="yolo11n.yaml")
    p.add_argument("--imgsz", type=int, default=160)
    p.add_argument("--num-train", type=int, default=256)
    p.add_argument("--num-val", type=int, default=64)
    p.add_argument("--float-epochs", type=int, default=20)
    p.add_argument("--qat-epochs", type=int, default=6)
    p.add_argument("--calib", type=int, default=64, help="training images used for calibration (every tool)")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime and OpenVINO threads")
    p.add_argument("--seed", type=int, default=0, help="training seed of the QAT runs and the float fine-tune")
    p.add_argument("--skip-ptq", action="store_true",
                   help="only the float model and the QAT rows (the PTQ rows do not depend on --seed)")
    p.add_argument("--out", type=Path, default=Path("/tmp/detq_bench_peers"))
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)

    from detq_hooks.deploy import make_runner
    from detq_hooks.export import export_onnx
    from detq_hooks.tools.data import make_synthetic_dataset
    from detq_hooks.tools.zoo import cached_float_checkpoint, synthetic_data_dir
    from detq_hooks.ultralytics import DetQTrainer
    from detq_hooks.ultralytics.deploy import export_head_mode
    from detq_hooks.ultralytics.evaluate import evaluate, load_images

    a.out.mkdir(parents=True, exist_ok=True)
    ds = make_synthetic_dataset(synthetic_data_dir(a.num_train, a.num_val, a.imgsz), num_train=a.num_train,
                                num_val=a.num_val, imgsz=a.imgsz, seed=0)
    ref = cached_float_checkpoint(ds, a.model, epochs=a.float_epochs, imgsz=a.imgsz, verbose=False)
    calib_images = [im for _, im, _ in load_images(ds.train_images, a.imgsz)][: a.calib]
    calib = [torch.from_numpy(im[None]) for im in calib_images]
    val = load_images(ds.val_images, a.imgsz)

    def score(model) -> float:
        return evaluate(model, ds.val_images, ds.coco_val_json, a.imgsz, images=val)[0].map50_95

    def score_exported(path: Path, runtime: str, precision: str | None = None) -> float:
        # one image at a time: the files are exported at batch 1, as bench_deploy.py runs them
        return evaluate_runner(make_runner(path, runtime, a.threads, precision), ds, a.imgsz, val)

    rows = []

    def measure(tool: str, method: str, runtime: str, kind: str, run) -> None:
        """One row: ``run()`` gives mAP50-95; an exception becomes the row's reason, not a crash."""
        row = {"tool": tool, "method": method, "bits": "FP32" if kind.startswith("float") else "W8A8",
               "runtime": runtime, "kind": kind}
        started = time.perf_counter()
        try:
            row["map50_95"] = float(run())
        except Exception as e:  # noqa: BLE001  (a peer that does not run here is a result, not an error)
            row["error"] = failure(e)
            row["trace_tail"] = traceback.format_exc()[-1500:]
        row["seconds"] = time.perf_counter() - started
        rows.append(row)
        print(row, flush=True)

    models = build_models(str(ref.checkpoint), calib_images, ["w8a8"])
    float_model = models["float"]
    measure("float", "float (no quantization)", "PyTorch", "float", lambda: score(float_model))
    if not a.skip_ptq:
        measure("detq-hooks", "PTQ min-max calibration", "PyTorch fake-quant", "ptq", lambda: score(models["w8a8"]))
        float_onnx = a.out / "float.onnx"
        export_onnx(export_head_mode(float_model), torch.zeros(1, 3, a.imgsz, a.imgsz), float_onnx,
                    input_names=["images"], output_names=["output0"])
        measure("onnxruntime", "quantize_static (QDQ, MinMax)", "onnxruntime", "ptq",
                lambda: score_exported(ort_quantize_static(float_onnx, a.out / "ort_qs.onnx", calib), "onnxruntime"))
        measure("NNCF", "PTQ (nncf.quantize, as Ultralytics int8=True)", "OpenVINO f32", "ptq",
                lambda: score_exported(nncf_ptq(float_model, a.imgsz, a.out / "nncf" / "nncf.xml", calib), "openvino",
                                       "f32"))

    data, project = str(ds.yolo_yaml), str(a.out / "runs")
    epochs = f"{a.qat_epochs} epoch{'s' if a.qat_epochs != 1 else ''}"
    train = dict(start=str(ref.checkpoint), data=data, imgsz=a.imgsz, epochs=a.qat_epochs, project=project, ds=ds,
                 seed=a.seed)
    measure("float", f"float fine-tune, {epochs} (the QAT rows' reference)", "PyTorch", "float-finetune",
            lambda: train_eval("float_ft", **train)["map50_95"])
    measure("detq-hooks", f"QAT LSQ, {epochs}", "PyTorch fake-quant", "qat",
            lambda: train_eval("detq_w8a8", **train, trainer=DetQTrainer, detq="w8a8")["map50_95"])
    loader_args = dict(model=a.model, data=data, imgsz=a.imgsz, batch=16, device="cpu", workers=0, amp=False,
                       plots=False, verbose=False, exist_ok=True, project=project, name="nncf_qat", seed=a.seed)
    measure("NNCF", f"PyTorch QAT (nncf.quantize + {epochs})", "PyTorch fake-quant", "qat",
            lambda: score(nncf_pytorch_qat(float_model, calib, loader_args, a.qat_epochs)))

    def ultralytics_quantize8():
        modelopt = modelopt_check()
        if modelopt != "importable":  # Ultralytics would try to pip-install it at run time; offline it cannot
            raise ModuleNotFoundError(f"NVIDIA ModelOpt, which quantize=8 needs, does not import ({modelopt}); it is "
                                      "not a detq-hooks dependency (bench_ultralytics.py says how to add it)")
        return train_eval("ultralytics_quantize8", **train, quantize=8)["map50_95"]

    measure("Ultralytics", f"quantize=8 QAT (NVIDIA ModelOpt), {epochs}", "PyTorch fake-quant", "qat",
            ultralytics_quantize8)
    if a.json:
        save_json(a.json, a, rows, float_reference={"checkpoint": str(ref.checkpoint), "map50_95": ref.map50_95})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
