"""The recomputed-weight layers as compiled autograd nodes against the Python Functions they replace (issue 11).

    YOLO_OFFLINE=1 python benchmarks/bench_compiled_nodes.py [--imgsz 160 --batch 16 --rounds 20]

YOLO11n in Ultralytics' own training step (forward with its loss, backward, SGD step), float and each recipe built
once, then timed in interleaved rounds: float, then per recipe a step with ``detq_hooks.modules._COMPILED_NODES``
on (``conv2d_recomputed_weight`` / ``linear_recomputed_weight``) and one with it off (``_ConvRecomputed`` /
``_LinearRecomputedWeight``). The two paths compute the same thing bit for bit (tests/test_kernels.py); what differs is
the interpreter time of the Python Functions, a fixed cost per layer and step, so small images and batches show it
most. Prints step ÷ float for both paths and compiled ÷ Python per round (median and quartiles).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_ultralytics import train_step, training_batches  # noqa: E402


def quartiles(values: list[float]) -> str:
    v = sorted(values)
    return f"{statistics.median(v):.3f} (q1 {v[len(v) // 4]:.3f}, q3 {v[3 * len(v) // 4]:.3f})"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--imgsz", type=int, default=160)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=20, help="timed rounds (3 more are run first as warm-up)")
    p.add_argument("--recipes", default="w8a8,w4a4")
    p.add_argument("--model", default="yolo11n.yaml")
    a = p.parse_args()

    from ultralytics.models.yolo.detect import DetectionTrainer

    from detq_hooks import modules
    from detq_hooks.detectors.ultralytics import UltralyticsFamily
    from detq_hooks.session import QuantSession
    from detq_hooks.tools.data import make_synthetic_dataset
    from detq_hooks.tools.zoo import synthetic_data_dir
    from detq_hooks.ultralytics.trainer import calibration_forward

    ds = make_synthetic_dataset(synthetic_data_dir(512, 96, 160), num_train=512, num_val=96, imgsz=160, seed=0)
    trainer = DetectionTrainer(overrides=dict(model=a.model, data=str(ds.yolo_yaml), imgsz=a.imgsz, batch=a.batch,
                                              device="cpu", workers=0, amp=False, plots=False, verbose=False,
                                              exist_ok=True, project="/tmp/detq_bench_runs", name="compiled_nodes"))
    trainer.model = trainer.get_model(cfg=a.model, verbose=False)
    batches = training_batches(trainer, a.batch)
    base = trainer.model
    base.args = trainer.args
    recipes = a.recipes.split(",")
    variants = {}
    for name in ["float", *recipes]:
        model = copy.deepcopy(base)
        if name != "float":
            session = QuantSession(name, family=UltralyticsFamily(), calibration_batches=2)
            session.convert(model)
            session.calibrate(model, [b["img"] for b in batches], calibration_forward)
        model.train()
        variants[name] = (model, torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9))

    times: dict[str, list[float]] = {"float": []}
    for r in recipes:
        times[f"{r} compiled"], times[f"{r} python"] = [], []
    for i in range(a.rounds + 3):
        b = batches[i % len(batches)]
        times["float"].append(train_step(*variants["float"], b))
        for r in recipes:
            for path, on in (("compiled", True), ("python", False)):
                modules._COMPILED_NODES = on
                times[f"{r} {path}"].append(train_step(*variants[r], b))
    modules._COMPILED_NODES = True
    timed = {k: v[3:] for k, v in times.items()}
    print(f"{a.model}, batch {a.batch}, {a.imgsz} px, {a.rounds} interleaved rounds, torch threads "
          f"{torch.get_num_threads()}")
    for k, v in timed.items():
        ratios = [x / f for x, f in zip(v, timed["float"])]
        print(f"{k:<16} step {statistics.median(v) * 1e3:8.1f} ms   ÷ float {quartiles(ratios)}")
    for r in recipes:
        per_round = [c / py for c, py in zip(timed[f"{r} compiled"], timed[f"{r} python"])]
        print(f"{r}: compiled ÷ Python Function, per round {quartiles(per_round)}")


if __name__ == "__main__":
    main()
