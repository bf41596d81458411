"""Step time of the Lightning FCOS example, quantized (DetQCallback) vs float, side by side in one run.

Each configuration trains the example's ``FCOSModule`` for a few steps with ``Trainer.fit`` on in-memory
synthetic batches (data loading is not what is measured); the median time from ``on_train_batch_start`` to
``on_train_batch_end`` (forward, backward, optimizer step) after warm-up is reported, and the rounds are
interleaved (float, W8A8, W4A8, float, ...) so that load from other processes hits every configuration alike.

    python benchmarks/bench_lightning.py                      # 128 px, batch 4, ResNet-18 FCOS
    python benchmarks/bench_lightning.py --imgsz 320          # the size issue 11's targets are set at
    python benchmarks/bench_lightning.py --imgsz 96 --steps 6 --rounds 1

Also printed: the memory one training step holds for backward (every saved tensor's storage once) plus
parameters, gradients and optimizer state, as a ratio to float. ``--json PATH`` also writes the figures.

``--accuracy`` measures mAP instead: the example's own run (``examples/lightning_fcos.py``: float training on
synthetic COCO data, then QAT with each recipe from the float weights, COCO mAP50-95 of each)::

    python benchmarks/bench_lightning.py --accuracy [--float-epochs 40 --qat-epochs 4 --seed 0 --json out.json]

(40 float epochs: at 6 the FCOS trained from scratch reached mAP50-95 0.013, too little for "kept" to mean
anything; at 40, 0.040 in about 5 minutes on 2 threads.) The post-training recipes (``-ptq``, ``-taskq``)
calibrate and reconstruct on ``--ptq-images`` training images (64, as ``bench_ptq*.py``); QAT recipes start from
ranges calibrated on the example's 4 batches.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import lightning.pytorch as pl  # noqa: E402
from lightning_fcos import FCOSModule, StepTimer, collate  # noqa: E402

from detq_hooks.lightning import DetQCallback  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _measure import model_state_bytes, save_json  # noqa: E402


class SavedBytes(pl.Callback):
    """Bytes autograd keeps for backward in the last training step (each storage once), plus model state."""

    def __init__(self) -> None:
        self.storages: dict[int, int] = {}
        self.saved = 0
        self.state = 0
        self._ctx = None
        self._params: set[int] = set()

    def _pack(self, t):
        s = t.untyped_storage()
        if s.data_ptr() not in self._params:  # parameters are counted with the model state
            self.storages[s.data_ptr()] = s.nbytes()
        return t

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.storages = {}
        self._params = {p.untyped_storage().data_ptr() for p in pl_module.parameters()}
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()

    def on_before_backward(self, trainer, pl_module, loss):
        if self._ctx is not None:
            self._ctx.__exit__(None, None, None)
            self._ctx = None
            self.saved = sum(self.storages.values())

    def on_train_end(self, trainer, pl_module):
        self.state = model_state_bytes(pl_module, trainer.optimizers[0] if trainer.optimizers else None)


class RandomBoxes(Dataset):
    def __init__(self, n: int, imgsz: int, num_classes: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(n):
            img = torch.rand(3, imgsz, imgsz, generator=g)
            k = 4
            xy = torch.rand(k, 2, generator=g) * imgsz * 0.7
            wh = torch.rand(k, 2, generator=g) * imgsz * 0.25 + 6
            boxes = torch.cat([xy, (xy + wh).clamp(max=imgsz - 1)], 1)
            labels = torch.randint(1, num_classes + 1, (k,), generator=g)
            self.items.append((img, {"boxes": boxes, "labels": labels, "image_id": 0}))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def time_steps(recipe, args) -> float:
    pl.seed_everything(0, verbose=False)
    module = FCOSModule(num_classes=8, min_size=args.imgsz, max_size=args.imgsz, backbone=args.backbone,
                        fpn_channels=args.fpn_channels, lr=0.002)
    loader = DataLoader(RandomBoxes(args.batch_size * (args.steps + args.warmup), args.imgsz, 8),
                        batch_size=args.batch_size, collate_fn=collate)
    timer = StepTimer(warmup=args.warmup)
    mem = SavedBytes()
    cbs = [timer] + ([DetQCallback(recipe=recipe, calibration_batches=1)] if recipe else []) + [mem]
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=args.steps + args.warmup, callbacks=cbs, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0, precision=args.precision)
    trainer.fit(module, loader)
    return statistics.median(timer.times) * 1000, mem.saved + mem.state


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--imgsz", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--fpn-channels", type=int, default=64)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--precision", default="32-true")
    p.add_argument("--recipes", nargs="+", default=["w8a8", "w4a8"])
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    accuracy = p.add_argument_group("--accuracy: float training then QAT, COCO mAP (examples/lightning_fcos.py)")
    accuracy.add_argument("--accuracy", action="store_true")
    accuracy.add_argument("--num-train", type=int, default=128)
    accuracy.add_argument("--num-val", type=int, default=32)
    accuracy.add_argument("--float-epochs", type=int, default=40)
    accuracy.add_argument("--qat-epochs", type=int, default=4)
    accuracy.add_argument("--seed", type=int, default=0, help="data and training seed")
    accuracy.add_argument("--ptq-images", type=int, default=64,
                          help="training images that calibrate and reconstruct the PTQ recipes (-ptq, -taskq; whole "
                               "batches, rounded up), as many as bench_ptq*.py give; QAT recipes calibrate on the "
                               "example's 4 batches")
    accuracy.add_argument("--out", default="/tmp/detq_bench_lightning_accuracy")
    args = p.parse_args(argv)
    if args.accuracy:
        return accuracy_rows(args)
    configs = [None, *args.recipes]
    times = {c: [] for c in configs}
    memory = {}
    for _ in range(args.rounds):
        for c in configs:
            t, memory[c] = time_steps(c, args)
            times[c].append(t)
    med = {c: statistics.median(v) for c, v in times.items()}
    print(f"\nLightning FCOS-{args.backbone} train step, {args.imgsz}px, batch {args.batch_size}, "
          f"{args.steps} timed steps x {args.rounds} rounds, torch threads {torch.get_num_threads()}, {args.precision}")
    print(f"{'config':<8} {'step ms':>9} {'ratio':>7} {'per-round ratios':>18} {'memory MB':>10} {'mem ratio':>9}"
          "   per-round medians (ms)")
    for c in configs:
        rounds = " ".join(f"{t:.0f}" for t in times[c])
        per_round = " ".join(f"{t / b:.2f}" for t, b in zip(times[c], times[None]))
        print(f"{c or 'float':<8} {med[c]:>9.1f} {med[c] / med[None]:>7.2f} {per_round:>18} {memory[c] / 2**20:>10.1f} "
              f"{memory[c] / memory[None]:>9.3f}   {rounds}")
    if args.json:
        save_json(args.json, args, [
            {"config": c or "float", "step_ms": med[c], "step_ratio": med[c] / med[None],
             "step_ratio_per_round": [t / b for t, b in zip(times[c], times[None])], "memory_bytes": memory[c],
             "memory_ratio": memory[c] / memory[None]} for c in configs])
    return med


def accuracy_rows(args) -> list[dict]:
    from lightning_fcos import main as train_and_evaluate

    runs = train_and_evaluate(["--num-train", str(args.num_train), "--num-val", str(args.num_val), "--imgsz",
                               str(args.imgsz), "--batch-size", str(args.batch_size), "--backbone", args.backbone,
                               "--fpn-channels", str(args.fpn_channels), "--float-epochs", str(args.float_epochs),
                               "--qat-epochs", str(args.qat_epochs), "--seed", str(args.seed), "--out", args.out,
                               "--ptq-calibration-batches", str(-(-args.ptq_images // args.batch_size)),
                               "--root", f"{args.out}/data", "--recipes", *args.recipes])
    float_map = runs[0]["mAP"]
    rows = [{"recipe": r["recipe"], "seed": args.seed, "map50_95": r["mAP"], "map50": r["mAP50"],
             "kept": r["mAP"] / float_map if float_map > 0 else float("nan"), "step_ms": r["step_ms"]} for r in runs]
    if args.json:
        save_json(args.json, args, rows, float_map50_95=float_map)
    return rows


if __name__ == "__main__":
    main()
