"""Ultralytics adapter benchmark (CPU): QAT step-time overhead and mAP after equal budgets, plus Ultralytics'
own ``quantize=8`` (ModelOpt INT8 QAT) on the same model and data where it runs.

    YOLO_OFFLINE=1 python benchmarks/bench_ultralytics.py [--imgsz 160 --num-train 512 --pre-epochs 60 --epochs 6]

ModelOpt (for ``quantize=8``) is not a dependency of detq-hooks; to include it without touching the shared venv:

    pip install --target /tmp/modelopt_site --no-deps nvidia-modelopt
    pip install --target /tmp/modelopt_site ninja omegaconf "pulp<4" pydantic regex safetensors huggingface_hub
    PYTHONPATH=/tmp/modelopt_site YOLO_OFFLINE=1 python benchmarks/bench_ultralytics.py

1. Step time: one Ultralytics training step (forward + loss + backward + optimizer step, batch 16) of YOLO11n in
   float, W8A8 and W4A8 (median of ``--steps`` steps after warm-up, same batches). Target W8A8 <= 1.3x float.
2. Accuracy: a float YOLO11n trained ``--pre-epochs`` epochs from scratch (``detq_hooks.tools.zoo``: trained once,
   then cached; the same reference as bench_crqat_ultralytics.py); from it, three runs of ``--epochs`` epochs each:
   float fine-tuning, W8A8 QAT and W4A8 QAT (DetQTrainer), all with the same optimizer settings; COCO mAP of
   each best.pt on the synthetic val set (detq_hooks.evaluation).
3. Ultralytics ``quantize=8`` from the same float model with the same budget: mAP and step time, or the exact
   reason it does not run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
import traceback
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")

import torch


def step_times(model_yaml: str, data_yaml: str, imgsz: int, steps: int, batch: int, recipes: list[str]) -> dict:
    """Median seconds per training step for float and each recipe, on identical batches."""
    from ultralytics.models.yolo.detect import DetectionTrainer

    from detq_hooks import calibrate
    from detq_hooks.ultralytics.trainer import calibration_forward, quantize_ultralytics
    from detq_hooks.distill import Teacher
    from detq_hooks.recipe import load_recipe
    from detq_hooks.ultralytics.crqat import DistillCriterion, ultralytics_stages

    trainer = DetectionTrainer(overrides=dict(model=model_yaml, data=data_yaml, imgsz=imgsz, batch=batch, device="cpu",
                                              workers=0, amp=False, plots=False, verbose=False, exist_ok=True,
                                              project="/tmp/detq_bench_runs", name="steps"))
    trainer.model = trainer.get_model(cfg=model_yaml, verbose=False)
    loader = trainer.get_dataloader(trainer.data["train"], batch_size=batch, rank=-1, mode="train")
    batches = []
    for b in loader:
        batches.append(trainer.preprocess_batch(b))
        if len(batches) >= 4:
            break
    base = trainer.model
    base.args = trainer.args
    results = {}
    names = ["float", *recipes]
    if modelopt_check() == "importable":
        names.append("ultralytics_quantize8")
    for name in names:
        model = copy.deepcopy(base)
        if name == "ultralytics_quantize8":  # Ultralytics' own INT8 QAT (ModelOpt), as its trainer prepares it
            from ultralytics.utils.torch_utils import prepare_qat

            model = prepare_qat(model, batches, lambda b: b, batches=2)
        elif name != "float":
            recipe = load_recipe(name)
            teacher = Teacher.from_model(model) if recipe.distillation.enabled else None
            quantize_ultralytics(model, recipe)
            calibrate(model, [b["img"] for b in batches], forward_fn=lambda m, x: calibration_forward(m, x), num_batches=2)
            if teacher is not None:  # CR-QAT: task loss + distillation from the float teacher (final stage: all terms)
                model.criterion = DistillCriterion(model.init_criterion(), model, teacher, ultralytics_stages(model),
                                                   recipe.distillation, lambda: 1)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        times = []
        for i in range(steps + 3):
            b = batches[i % len(batches)]
            t = time.perf_counter()
            loss, _ = model(b)
            loss.sum().backward()
            opt.step()
            opt.zero_grad()
            if i >= 3:
                times.append(time.perf_counter() - t)
        results[name] = statistics.median(times)
    return results


def train_eval(label, start, data, imgsz, epochs, project, ds, trainer=None, **kw) -> dict:
    from ultralytics import YOLO
    from ultralytics.nn.tasks import load_checkpoint

    from detq_hooks.ultralytics.evaluate import evaluate

    t = time.time()
    model = YOLO(str(start))
    args = dict(data=data, imgsz=imgsz, epochs=epochs, batch=16, amp=False, plots=False, workers=0, device="cpu",
                exist_ok=True, project=project, name=label, seed=0, deterministic=True, verbose=False,
                optimizer="AdamW", lr0=0.001, nbs=16, warmup_epochs=0, close_mosaic=epochs)
    args.update(kw)
    if trainer is not None:
        args["trainer"] = trainer
    model.train(**args)
    wall = time.time() - t
    best = model.trainer.best
    m, _ = load_checkpoint(str(best))
    res, _ = evaluate(m.eval(), ds.val_images, ds.coco_val_json, imgsz)
    return {"run": label, "map50_95": res.map50_95, "map50": res.map50, "wall_s": wall, "best": str(best)}


def modelopt_check() -> str:
    try:
        import modelopt.torch.quantization  # noqa: F401

        return "importable"
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--imgsz", type=int, default=160)
    p.add_argument("--num-train", type=int, default=512)
    p.add_argument("--num-val", type=int, default=96)
    p.add_argument("--pre-epochs", type=int, default=60)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--model", default="yolo11n.yaml")
    p.add_argument("--out", default="/tmp/detq_bench_ultralytics")
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--start", default=None, help="float .pt to start from instead of the cached reference")
    p.add_argument("--data-root", default=None,
                   help="synthetic data folder (default: detq_hooks.tools.zoo.synthetic_data_dir, the benchmarks' shared one)")
    a = p.parse_args()

    from detq_hooks.tools.data import make_synthetic_dataset
    from detq_hooks.ultralytics import DetQTrainer
    from detq_hooks.tools.zoo import cached_float_checkpoint, synthetic_data_dir

    out = Path(a.out)
    data_root = a.data_root or synthetic_data_dir(a.num_train, a.num_val, a.imgsz)
    ds = make_synthetic_dataset(data_root, num_train=a.num_train, num_val=a.num_val, imgsz=a.imgsz, seed=0)
    data = str(ds.yolo_yaml)
    report: dict = {"config": vars(a), "torch_threads": torch.get_num_threads()}

    st = step_times(a.model, data, a.imgsz, a.steps, 16, ["w8a8", "w4a8", "w4a4", "w4a4-crqat"])
    report["step_time_s"] = st
    report["step_time_ratio"] = {k: st[k] / st["float"] for k in st}
    if "w4a4-crqat" in st:
        report["teacher_cost_vs_plain_w4a4"] = st["w4a4-crqat"] / st["w4a4"]
    print("step time (s):", {k: round(v, 4) for k, v in st.items()}, "ratio:", {k: round(v, 3) for k, v in report["step_time_ratio"].items()})

    if not a.skip_accuracy:
        project = str(out / "runs")
        if a.start:
            start = a.start
        else:
            ref = cached_float_checkpoint(ds, a.model, epochs=a.pre_epochs, imgsz=a.imgsz, verbose=False)
            start = str(ref.checkpoint)
            report["float_reference"] = {"checkpoint": start, "map50_95": ref.map50_95}
        rows = [
            train_eval("float_ft", start, data, a.imgsz, a.epochs, project, ds),
            train_eval("w8a8", start, data, a.imgsz, a.epochs, project, ds, trainer=DetQTrainer, detq="w8a8"),
            train_eval("w4a8", start, data, a.imgsz, a.epochs, project, ds, trainer=DetQTrainer, detq="w4a8"),
        ]
        try:
            rows.append(train_eval("ultralytics_quantize8", start, data, a.imgsz, a.epochs, project, ds, quantize=8))
        except Exception as e:  # noqa: BLE001
            rows.append({"run": "ultralytics_quantize8", "error": f"{type(e).__name__}: {e}".strip()[:600],
                         "modelopt_import": modelopt_check(), "trace_tail": traceback.format_exc()[-800:]})
        report["accuracy"] = rows
        for r in rows:
            print(r)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"written {out / 'results.json'}")


if __name__ == "__main__":
    main()
