"""Step-time cost of the Fisher-trace regulariser in Ultralytics QAT, paired in one process: plain W4A8 QAT vs
the same with the regulariser (every k steps, as the Fisher presets), alternating, several rounds.

    YOLO_OFFLINE=1 python benchmarks/bench_fisher_step.py [--every 12 --rounds 3 --epochs 1 --json PATH
        --model yolo11n.yaml --imgsz 160 --num-train 256 --num-val 64 --float-epochs 20]

Training time per epoch (Ultralytics' epoch start to end, validation excluded) on the cached float YOLO11n and
its synthetic data (160 px, 256 images, batch 16); prints each round's ratio and the median with its range.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")


def epoch_seconds(checkpoint, ds, recipe, epochs: int, project: str, name: str, imgsz: int = 160) -> float:
    from ultralytics import YOLO

    from detq_hooks.ultralytics import DetQTrainer

    model, times, started = YOLO(str(checkpoint)), [], {}
    model.add_callback("on_train_epoch_start", lambda t: started.update(t=time.perf_counter()))
    model.add_callback("on_train_epoch_end", lambda t: times.append(time.perf_counter() - started["t"]))
    model.train(data=str(ds.yolo_yaml), trainer=DetQTrainer, detq=recipe, epochs=epochs, imgsz=imgsz, batch=16, amp=False,
                plots=False, workers=0, device="cpu", exist_ok=True, project=project, name=name, val=False,
                verbose=False, seed=0, nbs=16, warmup_epochs=0)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--every", type=int, default=12)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--model", default="yolo11n.yaml")
    p.add_argument("--imgsz", type=int, default=160)
    p.add_argument("--num-train", type=int, default=256)
    p.add_argument("--num-val", type=int, default=64)
    p.add_argument("--float-epochs", type=int, default=20)
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    a = p.parse_args(argv)
    from detq_hooks.tools.data import make_synthetic_dataset
    from detq_hooks.tools.zoo import cached_float_checkpoint, synthetic_data_dir

    ds = make_synthetic_dataset(synthetic_data_dir(a.num_train, a.num_val, a.imgsz), num_train=a.num_train,
                                num_val=a.num_val, imgsz=a.imgsz, seed=0)
    ckpt = cached_float_checkpoint(ds, a.model, epochs=a.float_epochs, imgsz=a.imgsz, verbose=False).checkpoint
    reg = {"preset": "w4a8", "critical": {"classes": ["star", "checker"]},
           "fisher_regularizer": {"enabled": True, "every": a.every, "warmup": 0.0}}
    ratios, rounds = [], []
    for r in range(a.rounds):
        plain = epoch_seconds(ckpt, ds, "w4a8", a.epochs, "/tmp/detq_fisher_step", f"plain{r}", a.imgsz)
        with_reg = epoch_seconds(ckpt, ds, reg, a.epochs, "/tmp/detq_fisher_step", f"reg{r}", a.imgsz)
        ratios.append(with_reg / plain)
        rounds.append({"round": r, "plain_s_per_epoch": plain, "regulariser_s_per_epoch": with_reg, "ratio": ratios[-1]})
        print(f"round {r}: plain {plain:.2f} s/epoch, regulariser every {a.every} {with_reg:.2f} s/epoch, "
              f"ratio {ratios[-1]:.3f}", flush=True)
    print(f"regulariser every {a.every} steps: {statistics.median(ratios):.3f}x plain QAT per epoch "
          f"(range {min(ratios):.3f}-{max(ratios):.3f}, {a.rounds} rounds)")
    if a.json:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from _measure import save_json

        save_json(a.json, a, rounds, ratio_median=statistics.median(ratios))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
