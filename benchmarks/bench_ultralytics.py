"""Ultralytics adapter benchmark (CPU): QAT step-time overhead and mAP after equal budgets, plus Ultralytics'
own ``quantize=8`` (ModelOpt INT8 QAT) on the same model and data where it runs.

    YOLO_OFFLINE=1 python benchmarks/bench_ultralytics.py [--imgsz 160 --num-train 512 --pre-epochs 60 --epochs 6]

ModelOpt (for ``quantize=8``) is not a dependency of detq-hooks; to include it without touching the shared venv:

    pip install --target /tmp/modelopt_site --no-deps nvidia-modelopt
    pip install --target /tmp/modelopt_site ninja omegaconf "pulp<4" pydantic regex safetensors huggingface_hub
    PYTHONPATH=/tmp/modelopt_site YOLO_OFFLINE=1 python benchmarks/bench_ultralytics.py

1. Step time: one Ultralytics training step (forward + loss + backward + optimizer step, batch 16) of YOLO11n in
   float, W8A8, W4A8, W4A4, W4A4 CR-QAT (also with a bf16 teacher) and Ultralytics ``quantize=8`` (ModelOpt, where it
   imports), interleaved, same batches: per-step ratios to float (median, min-max); the validation forward (eval,
   no_grad) likewise; the memory a training step holds for backward plus parameters, gradients and optimizer state,
   as a ratio to float.
   Targets (issue 11): W8A8 <= min(1.10, ModelOpt), W4A4 <= 1.15, CR-QAT W4A4 <= 1.45, memory <= 1.2,
   validation <= 1.1.
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
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _measure import clock, fmt_ratio, model_state_bytes, ratio_stats, saved_for_backward_bytes  # noqa: E402


def training_batches(trainer, batch: int, n: int = 4) -> list:
    """The first ``n`` preprocessed training batches of an Ultralytics trainer's loader."""
    batches = []
    for b in trainer.get_dataloader(trainer.data["train"], batch_size=batch, rank=-1, mode="train"):
        batches.append(trainer.preprocess_batch(b))
        if len(batches) >= n:
            break
    return batches


def train_step(model, opt, b) -> float:
    """Seconds of one training step as Ultralytics runs it (with DetQTrainer: the batch handed to the session as its
    ``preprocess_batch`` does), forward with the loss, backward, optimizer step."""
    t = clock()
    criterion = getattr(model, "criterion", None)
    if hasattr(criterion, "session"):
        criterion.session.batch_ready(b)
    loss, _ = model(b)
    loss.sum().backward()
    opt.step()
    opt.zero_grad()
    return clock() - t


# Configurations timed beside the presets: CR-QAT with its teacher's forward under bf16 autocast (an opt-in recipe
# key, for CPUs with AVX512-BF16/AMX and GPUs; slower where bf16 has no hardware kernels).
EXTRA_RECIPES = {"w4a4-crqat, bf16 teacher": {"preset": "w4a4-crqat", "distillation": {"teacher_precision": "bfloat16"}}}


def step_times(model_yaml: str, data_yaml: str, imgsz: int, steps: int, batch: int, recipes: list[str]) -> dict:
    """Training-step seconds, validation-forward seconds and memory held for backward, for float, each recipe and
    Ultralytics' ``quantize=8`` (where ModelOpt imports), on identical batches. The variants are built first and
    the steps interleaved (float, W8A8, ..., float, W8A8, ...) so that load from other processes hits them alike."""
    from ultralytics.models.yolo.detect import DetectionTrainer

    from detq_hooks.detectors.ultralytics import UltralyticsFamily
    from detq_hooks.session import QuantSession
    from detq_hooks.ultralytics.criterion import DetQCriterion
    from detq_hooks.ultralytics.trainer import calibration_forward

    trainer = DetectionTrainer(overrides=dict(model=model_yaml, data=data_yaml, imgsz=imgsz, batch=batch, device="cpu",
                                              workers=0, amp=False, plots=False, verbose=False, exist_ok=True,
                                              project="/tmp/detq_bench_runs", name="steps"))
    trainer.model = trainer.get_model(cfg=model_yaml, verbose=False)
    batches = training_batches(trainer, batch)
    base = trainer.model
    base.args = trainer.args
    names = ["float", *recipes]
    if modelopt_check() == "importable":
        names.append("ultralytics_quantize8")
    variants = {}
    for name in names:
        model = copy.deepcopy(base)
        if name == "ultralytics_quantize8":  # Ultralytics' own INT8 QAT (ModelOpt), as its trainer prepares it
            from ultralytics.utils.torch_utils import prepare_qat

            model = prepare_qat(model, batches, lambda b: b, batches=2)
        elif name != "float":  # the session as DetQTrainer runs it
            session = QuantSession(EXTRA_RECIPES.get(name, name), family=UltralyticsFamily(), calibration_batches=2)
            session.convert(model)  # CR-QAT: the float teacher is copied first
            session.calibrate(model, [b["img"] for b in batches], calibration_forward)
            if session.terms:  # CR-QAT at its final stage (every layer quantized, every distillation term on)
                session.start_training(model, progress=1.0)
                model.criterion = DetQCriterion(model.init_criterion(), model, session)
        model.train()
        variants[name] = (model, torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9))

    def val_forwards(model, b):
        """The first forward after a training step (new weights: quantized again; integer layers keep the float path
        for a weight seen once) and the third, as the rest of a validation pass runs (the second packs the integer
        weights, once per pass)."""
        model.eval()
        times = []
        with torch.no_grad():
            for _ in range(3):
                t = clock()
                model(b["img"])
                times.append(clock() - t)
        model.train()
        return times[0], times[2]

    memory = {}
    for name, (model, opt) in variants.items():  # warm-up (3 steps), then one step with its memory counted
        for i in range(3):
            train_step(model, opt, batches[i % len(batches)])
        loss, saved = saved_for_backward_bytes(lambda: model(batches[0])[0].sum(), model)
        loss.backward()
        opt.zero_grad()
        memory[name] = saved + model_state_bytes(model, opt)
    times = {k: [] for k in variants}
    vals = {k: [] for k in variants}
    firsts = {k: [] for k in variants}
    for i in range(steps):
        b = batches[i % len(batches)]
        for name, (model, opt) in variants.items():
            times[name].append(train_step(model, opt, b))
        for name, (model, opt) in variants.items():
            first, then = val_forwards(model, b)
            firsts[name].append(first)
            vals[name].append(then)
    return {"train": ratio_stats(times), "val": ratio_stats(vals), "val_first": ratio_stats(firsts), "memory_bytes": memory,
            "memory_ratio": {k: v / memory["float"] for k, v in memory.items()}}


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
    p.add_argument("--batch", type=int, default=16, help="images per step of the step-time measurement")
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

    from detq_hooks import kernels

    report["quantizer_kernels"] = kernels.status()
    print("quantizer kernels:", report["quantizer_kernels"], "| modelopt:", modelopt_check())
    st = step_times(a.model, data, a.imgsz, a.steps, a.batch, ["w8a8", "w4a8", "w4a4", "w4a4-crqat", *EXTRA_RECIPES])
    report["step_time_s"] = {k: v["median_s"] for k, v in st["train"].items()}
    report["step_time_ratio"] = {k: v["ratio_median"] for k, v in st["train"].items()}
    report["step_time_ratio_stats"] = st["train"]
    report["validation_forward_ratio_stats"] = st["val"]
    report["first_validation_forward_ratio_stats"] = st["val_first"]
    report["memory_bytes"] = st["memory_bytes"]
    report["memory_ratio"] = st["memory_ratio"]
    from detq_hooks import allocator

    report["allocator"] = allocator.status()
    if "w4a4-crqat" in st["train"]:
        report["teacher_cost_vs_plain_w4a4"] = st["train"]["w4a4-crqat"]["median_s"] / st["train"]["w4a4"]["median_s"]
    report["clock"] = os.environ.get("DETQ_BENCH_CLOCK", "wall")
    print(f"YOLO11n, batch {a.batch}, {a.imgsz} px, {a.steps} interleaved steps, torch threads {torch.get_num_threads()}, "
          f"clock {report['clock']}")
    print(f"{'variant':<22} {'step [s]':>8} {'train ratio med (min-max)':>27} {'val ratio med (min-max)':>25} {'memory ratio':>12}")
    for k, v in st["train"].items():
        print(f"{k:<22} {v['median_s']:>8.3f} {fmt_ratio(v):>27} {fmt_ratio(st['val'][k]):>25} {st['memory_ratio'][k]:>12.3f}")

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
