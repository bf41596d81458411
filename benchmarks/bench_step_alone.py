"""Training-step time of YOLO11n as a user's run sees it: float and each recipe alone in a fresh process.

    YOLO_OFFLINE=1 python benchmarks/bench_step_alone.py [--variants float,w8a8,w4a4 --rounds 3 --json out.json]

``bench_ultralytics.py`` times every configuration side by side in one process, so float steps run with the malloc
setting that ``detq_hooks.quantize`` made for the process (``detq_hooks.allocator``). A user compares two separate
runs instead: Ultralytics' float training with glibc's default malloc against the same training with detq-hooks.
This script starts one process per configuration (same model, data, batches and optimizer as bench_ultralytics.py's
step timing), in turns (float, w8a8, ..., float, w8a8, ...), and reports per round the ratio of each configuration's
median step to float's median step of that round, the minor page faults per step and the allocator's status.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")


def child(variant: str, imgsz: int, batch: int, steps: int, data_root: str | None, num_train: int, num_val: int) -> dict:
    import resource

    import torch
    from ultralytics.models.yolo.detect import DetectionTrainer

    from detq_hooks import allocator
    from detq_hooks.detectors.ultralytics import UltralyticsFamily
    from detq_hooks.session import QuantSession
    from detq_hooks.tools.data import make_synthetic_dataset
    from detq_hooks.tools.zoo import synthetic_data_dir
    from detq_hooks.ultralytics.trainer import calibration_forward

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_ultralytics import train_step, training_batches  # the same batches and step as its timing

    root = data_root or synthetic_data_dir(num_train, num_val, imgsz)
    ds = make_synthetic_dataset(root, num_train=num_train, num_val=num_val, imgsz=imgsz, seed=0)
    trainer = DetectionTrainer(overrides=dict(model="yolo11n.yaml", data=str(ds.yolo_yaml), imgsz=imgsz, batch=batch,
                                              device="cpu", workers=0, amp=False, plots=False, verbose=False,
                                              exist_ok=True, project="/tmp/detq_bench_runs", name="alone"))
    torch.manual_seed(0)
    model = trainer.model = trainer.get_model(cfg="yolo11n.yaml", verbose=False)
    batches = training_batches(trainer, batch)
    model.args = trainer.args
    if variant != "float":  # the session as DetQTrainer runs it
        session = QuantSession(variant, family=UltralyticsFamily(), calibration_batches=2)
        session.convert(model)
        session.calibrate(model, [b["img"] for b in batches], calibration_forward)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    for i in range(3):
        train_step(model, opt, batches[i % len(batches)])
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = [train_step(model, opt, batches[i % len(batches)]) for i in range(steps)]
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / steps
    return {"variant": variant, "median_s": statistics.median(times), "faults_per_step": faults,
            "allocator": allocator.status(), "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--variants", default="float,w8a8,w4a4")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--imgsz", type=int, default=160)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--num-train", type=int, default=512)
    p.add_argument("--num-val", type=int, default=96)
    p.add_argument("--data-root", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print("RESULT " + json.dumps(child(a.child, a.imgsz, a.batch, a.steps, a.data_root, a.num_train, a.num_val)))
        return
    variants = a.variants.split(",")
    if variants[0] != "float":
        raise SystemExit("--variants must start with float (the baseline)")
    rounds = []
    for r in range(a.rounds):
        got = {}
        for v in variants:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", v, "--steps", str(a.steps), "--imgsz",
                   str(a.imgsz), "--batch", str(a.batch), "--num-train", str(a.num_train), "--num-val", str(a.num_val),
                   *(["--data-root", a.data_root] if a.data_root else [])]
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if out.returncode or line is None:
                raise SystemExit(f"{v} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
            got[v] = json.loads(line[len("RESULT "):])
        rounds.append(got)
        print(f"round {r}: " + ", ".join(f"{v} {got[v]['median_s'] * 1e3:.1f} ms ({got[v]['faults_per_step']:.0f} faults/step)"
                                         for v in variants), flush=True)
    rows = []
    print(f"YOLO11n, batch {a.batch}, {a.imgsz} px, each configuration alone in its process, {a.rounds} rounds of {a.steps} steps")
    print(f"{'variant':<10} {'step [ms]':>9} {'÷ float, med (min-max)':>24} {'faults/step':>11}  allocator")
    for v in variants:
        ratios = [g[v]["median_s"] / g["float"]["median_s"] for g in rounds]
        row = {"variant": v, "step_ms": statistics.median(g[v]["median_s"] for g in rounds) * 1e3,
               "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
               "ratios": ratios, "faults_per_step": statistics.median(g[v]["faults_per_step"] for g in rounds),
               "allocator": rounds[0][v]["allocator"], "threads": rounds[0][v]["threads"]}
        rows.append(row)
        print(f"{v:<10} {row['step_ms']:>9.1f} {row['ratio_median']:>8.3f} ({row['ratio_min']:.3f}-{row['ratio_max']:.3f})"
              f"{'':>4} {row['faults_per_step']:>11.0f}  {row['allocator']}")
    if a.json:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from _measure import save_json

        save_json(a.json, a, rows, allocator="per row: each configuration ran in its own process")


if __name__ == "__main__":
    main()
