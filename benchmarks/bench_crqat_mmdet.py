"""CR-QAT ablation in MMDetection: plain LSQ QAT vs curriculum only vs distillation only vs both, W4A4 and W4A8,
from the same float checkpoint with the same iteration budget, on the synthetic COCO data.

    python benchmarks/bench_crqat_mmdet.py [--config rtmdet_tiny_synthetic] [--float-epochs 40] [--qat-iters 200]
        [--seed 0] [--json results.json]

The float model is trained once and cached in ~/.cache/detq-hooks/float_refs/mmdet/<key>/ (delete it to retrain).
Prints mAP50-95, the fraction of float mAP retained (against the float model fine-tuned for the same
iterations), and the median training step time relative to plain QAT (the teacher's cost). ``--variants ""``
runs the float fine-tune only.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from _measure import save_json
from _mmdet import cached_float_mmdet, mmdet_cfg as _cfg, synthetic_mmdet_data


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="rtmdet_tiny_synthetic", help="float config under integrations/mmdet")
    ap.add_argument("--imgsz", type=int, default=160)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--num-train", type=int, default=256)
    ap.add_argument("--num-val", type=int, default=64)
    ap.add_argument("--float-epochs", type=int, default=40)
    ap.add_argument("--qat-iters", type=int, default=200)
    ap.add_argument("--bits", default="w4a4,w4a8")
    ap.add_argument("--variants", default="plain,curriculum,distillation,both")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="training seed of the fine-tunes (the float model: seed 0)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)

    import torch
    from mmengine.hooks import Hook
    from mmengine.runner import Runner

    torch.set_num_threads(args.threads)
    ds = synthetic_mmdet_data(args.imgsz, args.num_train, args.num_val)
    float_ckpt = cached_float_mmdet(args.config, args.imgsz, args.batch, args.float_epochs, ds)

    class StepTimer(Hook):
        def __init__(self):
            self.times, self._t = [], 0.0

        def before_train_iter(self, runner, batch_idx, data_batch=None):
            self._t = time.perf_counter()

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            self.times.append(time.perf_counter() - self._t)

    def evaluate(cfg):
        return Runner.from_cfg(cfg).test()["coco/bbox_mAP"]

    float_map = evaluate(_cfg(args.config, tempfile.mkdtemp(), args.imgsz, args.batch, load_from=str(float_ckpt)))
    def fine_tune(config, label, recipe=None):
        """Train ``args.qat_iters`` iterations from the float checkpoint (lr x 0.1, cosine); (mAP, median step)."""
        work = Path(tempfile.mkdtemp(prefix=f"detq_{label}_"))
        cfg = _cfg(config, work, args.imgsz, args.batch, load_from=str(float_ckpt))
        cfg.randomness = dict(seed=args.seed)
        for h in cfg.custom_hooks:
            if h["type"] == "DetQHook":
                h.update(recipe=recipe, calibration_batches=4)
        cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=args.qat_iters, val_interval=args.qat_iters)
        cfg.optim_wrapper.optimizer.lr = cfg.optim_wrapper.optimizer.lr * 0.1  # fine-tuning from float weights
        cfg.param_scheduler = [dict(type="CosineAnnealingLR", by_epoch=False, begin=0, end=args.qat_iters,
                                    T_max=args.qat_iters, eta_min_ratio=0.05)]
        cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=args.qat_iters, by_epoch=False)
        runner = Runner.from_cfg(cfg)
        timer = StepTimer()
        runner.register_hook(timer, priority="LOWEST")
        runner.train()
        m = runner.val()["coco/bbox_mAP"]
        step = statistics.median(timer.times[5:] or timer.times)
        print(f"{label}: mAP50-95 {m:.3f} step {step * 1000:.0f} ms", flush=True)
        return m, step

    # The fair reference: the float model trained for the same extra budget (a short-trained float model
    # keeps improving, so "% of the float start" flatters QAT).
    float_ft_map, float_step = fine_tune(args.config, "float_finetune")
    rows = []
    for bits in args.bits.split(","):
        for variant in filter(None, args.variants.split(",")):
            recipe = {"preset": bits,
                      "curriculum": {"enabled": variant in ("curriculum", "both")},
                      "distillation": {"enabled": variant in ("distillation", "both")}}
            m, step = fine_tune(f"{args.config}_w4a8", f"{bits} {variant}", recipe)
            rows.append((bits, variant, m, step))

    print(f"\n{args.config} at {args.imgsz}px, float start mAP50-95 {float_map:.3f}; after the same "
          f"{args.qat_iters} iterations (batch {args.batch}) in float: {float_ft_map:.3f} (step {float_step * 1000:.0f} ms)")
    print("| recipe | variant | mAP50-95 | % of float fine-tune | step time vs plain |")
    print("|---|---|---|---|---|")
    for bits, variant, m, step in rows:
        plain = next((s for b, v, _, s in rows if b == bits and v == "plain"), step)
        print(f"| {bits} | {variant} | {m:.3f} | {100 * m / max(float_ft_map, 1e-9):.0f}% | {step / plain:.2f}x |")
    if args.json:
        save_json(args.json, args, [{"bits": b, "variant": v, "seed": args.seed, "map50_95": m,
                                     "kept": m / max(float_ft_map, 1e-9), "step_s": s} for b, v, m, s in rows],
                  float_map50_95=float_map, float_finetune_map50_95=float_ft_map, float_finetune_step_s=float_step)


if __name__ == "__main__":
    main()
