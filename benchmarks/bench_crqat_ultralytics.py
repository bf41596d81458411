"""CR-QAT ablation with Ultralytics: plain LSQ QAT vs curriculum only vs distillation only vs both, at W4A4 and
W4A8, from one cached float YOLO checkpoint with the same epoch budget, on the synthetic data.

    YOLO_OFFLINE=1 python benchmarks/bench_crqat_ultralytics.py [--model yolo11n.yaml --float-epochs 60
        --qat-epochs 6 --imgsz 160 --num-train 512 --num-val 96 --bits w4a4,w4a8 --seed 0]

The float model comes from ``detq_hooks.tools.zoo.cached_float_checkpoint`` (trained once, then reused). Every QAT run
uses the same optimizer settings and seed; mAP is COCO mAP50-95 (pycocotools) of each run's best.pt on the val
split. Also printed: each run's mean training time per epoch relative to plain QAT of the same bits (the
teacher's cost). Results go to ``<out>/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")

VARIANTS = {  # name -> recipe sections added to the bit-width preset
    "plain": {},
    "curriculum": {"curriculum": {"enabled": True}},
    "distillation": {"distillation": {"enabled": True}},
    "both": {"curriculum": {"enabled": True}, "distillation": {"enabled": True}},
}


def run_qat(start: Path, data: str, imgsz: int, epochs: int, project: Path, label: str, recipe, ds, seed: int = 0) -> dict:
    """``recipe=None``: float fine-tuning with the same budget (the fair float reference)."""
    from ultralytics import YOLO

    from detq_hooks.ultralytics import DetQTrainer
    from detq_hooks.tools.zoo import evaluate_ultralytics

    model = YOLO(str(start))
    t = time.time()
    extra = {} if recipe is None else {"trainer": DetQTrainer, "detq": recipe}
    model.train(data=data, **extra, imgsz=imgsz, epochs=epochs, batch=16, amp=False,
                plots=False, workers=0, device="cpu", exist_ok=True, project=str(project), name=label, seed=seed,
                deterministic=True, verbose=False, optimizer="AdamW", lr0=0.0005, nbs=16, warmup_epochs=0,
                close_mosaic=epochs, val=True)
    wall = time.time() - t
    res = evaluate_ultralytics(model.trainer.best, ds, imgsz=imgsz)
    return {"run": label, "map50_95": res.map50_95, "map50": res.map50, "train_s": wall, "s_per_epoch": wall / epochs}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="yolo11n.yaml")
    p.add_argument("--float-epochs", type=int, default=60)
    p.add_argument("--qat-epochs", type=int, default=6)
    p.add_argument("--imgsz", type=int, default=160)
    p.add_argument("--num-train", type=int, default=512)
    p.add_argument("--num-val", type=int, default=96)
    p.add_argument("--bits", default="w4a4,w4a8")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", type=Path, default=Path("/tmp/detq_bench_crqat_ultralytics"))
    p.add_argument("--seed", type=int, default=0, help="training seed of every run (float fine-tune included)")
    a = p.parse_args(argv)

    from detq_hooks.tools.data import make_synthetic_dataset
    from detq_hooks.tools.zoo import cached_float_checkpoint, synthetic_data_dir

    root = synthetic_data_dir(a.num_train, a.num_val, a.imgsz)
    ds = make_synthetic_dataset(root, num_train=a.num_train, num_val=a.num_val, imgsz=a.imgsz, seed=0)
    ref = cached_float_checkpoint(ds, a.model, epochs=a.float_epochs, imgsz=a.imgsz, verbose=False)
    float_map = ref.metrics["map50_95"]
    print(f"float {a.model}: mAP50-95 {float_map:.4f} ({'cached' if ref.cached else 'trained'}: {ref.checkpoint})")

    ft = run_qat(ref.checkpoint, str(ds.yolo_yaml), a.imgsz, a.qat_epochs, a.out / "runs", "float_finetune", None, ds,
                 a.seed)
    print(json.dumps(ft))
    # Retained fraction against the better float model: the reference, or the reference trained on with the
    # same budget as QAT (else QAT gets credit for training the float model does not get).
    float_map = max(float_map, ft["map50_95"])
    rows = []
    for bits in a.bits.split(","):
        for variant in a.variants.split(","):
            recipe = {"preset": bits, "name": f"{bits}-{variant}", **VARIANTS[variant]}
            row = run_qat(ref.checkpoint, str(ds.yolo_yaml), a.imgsz, a.qat_epochs, a.out / "runs", f"{bits}_{variant}",
                          recipe, ds, a.seed)
            row.update(bits=bits, variant=variant, seed=a.seed, retained=row["map50_95"] / max(float_map, 1e-9))
            rows.append(row)
            print(json.dumps(row))
    plain = {r["bits"]: r["s_per_epoch"] for r in rows if r["variant"] == "plain"}
    print(f"\nfloat mAP50-95 {ref.metrics['map50_95']:.4f} (after {a.qat_epochs} more float epochs: {ft['map50_95']:.4f}); "
          f"QAT {a.qat_epochs} epochs from the reference, imgsz {a.imgsz}; retained = mAP / {float_map:.4f}")
    print(f"{'bits':6} {'variant':13} {'mAP50-95':>9} {'retained':>9} {'time/plain':>11}")
    for r in rows:
        r["time_vs_plain"] = r["s_per_epoch"] / plain[r["bits"]] if r["bits"] in plain else float("nan")
        print(f"{r['bits']:6} {r['variant']:13} {r['map50_95']:9.4f} {r['retained']:9.1%} {r['time_vs_plain']:11.2f}")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps({"float": ref.metrics, "config": {k: str(v) for k, v in vars(a).items()},
                                                    "float_finetune": ft, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
