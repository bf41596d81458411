"""Step-time cost of the Fisher-trace regulariser in Ultralytics QAT, paired in one process: plain W4A8 QAT vs
the same with the regulariser (every k steps, as the Fisher presets), alternating, several rounds.

    YOLO_OFFLINE=1 python benchmarks/bench_fisher_step.py [--every 12 --rounds 3 --epochs 1]

Training time per epoch (Ultralytics' epoch start to end, validation excluded) on the cached float YOLO11n and
its synthetic data (160 px, 256 images, batch 16); prints each round's ratio and the median with its range.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")


def epoch_seconds(checkpoint, ds, recipe, epochs: int, project: str, name: str) -> float:
    from ultralytics import YOLO

    from detq_hooks.ultralytics import DetQTrainer

    model, times, started = YOLO(str(checkpoint)), [], {}
    model.add_callback("on_train_epoch_start", lambda t: started.update(t=time.perf_counter()))
    model.add_callback("on_train_epoch_end", lambda t: times.append(time.perf_counter() - started["t"]))
    model.train(data=str(ds.yolo_yaml), trainer=DetQTrainer, detq=recipe, epochs=epochs, imgsz=160, batch=16, amp=False,
                plots=False, workers=0, device="cpu", exist_ok=True, project=project, name=name, val=False,
                verbose=False, seed=0, nbs=16, warmup_epochs=0)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--every", type=int, default=12)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=1)
    a = p.parse_args(argv)
    from detq_hooks.tools.data import make_synthetic_dataset
    from detq_hooks.tools.zoo import cached_float_checkpoint, synthetic_data_dir

    ds = make_synthetic_dataset(synthetic_data_dir(256, 64, 160), num_train=256, num_val=64, imgsz=160, seed=0)
    ckpt = cached_float_checkpoint(ds, "yolo11n.yaml", epochs=20, imgsz=160, verbose=False).checkpoint
    reg = {"preset": "w4a8", "critical": {"classes": ["star", "checker"]},
           "fisher_regularizer": {"enabled": True, "every": a.every, "warmup": 0.0}}
    ratios = []
    for r in range(a.rounds):
        plain = epoch_seconds(ckpt, ds, "w4a8", a.epochs, "/tmp/detq_fisher_step", f"plain{r}")
        with_reg = epoch_seconds(ckpt, ds, reg, a.epochs, "/tmp/detq_fisher_step", f"reg{r}")
        ratios.append(with_reg / plain)
        print(f"round {r}: plain {plain:.2f} s/epoch, regulariser every {a.every} {with_reg:.2f} s/epoch, "
              f"ratio {ratios[-1]:.3f}", flush=True)
    print(f"regulariser every {a.every} steps: {statistics.median(ratios):.3f}x plain QAT per epoch "
          f"(range {min(ratios):.3f}-{max(ratios):.3f}, {a.rounds} rounds)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
