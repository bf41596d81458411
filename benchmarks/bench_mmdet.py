"""Training step time of a quantized MMDetection model as a ratio to the float model (CPU), side by side.

    python benchmarks/bench_mmdet.py [--config rtmdet_tiny_synthetic.py] [--imgsz 320] [--batch 8] [--reps 6]
        [--json PATH]

Builds the model from `integrations/mmdet/<config>` (random weights), takes one batch of the synthetic COCO
data through the config's own pipeline and data preprocessor, and times `train_step` (forward, loss,
backward, optimizer step) and `val_step` (eval, no_grad: predict mode with its post-processing) for float, W8A8
and W4A8 (interleaved repetitions; per-repetition ratios to float, median and min-max), and the memory one step holds for backward (every saved tensor's storage once) plus
parameters, gradients and optimizer state, as a ratio to float.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _measure import clock, fmt_ratio, model_state_bytes, ratio_stats, save_json, saved_for_backward_bytes  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "integrations" / "mmdet"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="rtmdet_tiny_synthetic.py")
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--recipes", default="w8a8,w4a8")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from mmengine.config import Config
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import DATASETS, MODELS, init_default_scope
    from torch.utils.data import DataLoader
    from mmengine.dataset import pseudo_collate

    import detq_hooks as dq
    from detq_hooks.tools.data import make_synthetic_dataset
    from detq_hooks.mmengine import mmdet_forward, mmdet_prediction_layers
    from detq_hooks.optim import add_quantizer_param_group

    root = Path(tempfile.gettempdir()) / f"detq_bench_synth_{args.imgsz}"
    make_synthetic_dataset(root, num_train=max(16, args.batch), num_val=4, imgsz=args.imgsz, seed=0)
    os.environ["DETQ_SYNTH_ROOT"] = str(root) + "/"
    cfg = Config.fromfile(str(CONFIGS / args.config))
    init_default_scope("mmdet")
    dataset = DATASETS.build(cfg.train_dataloader.dataset)
    batch = next(iter(DataLoader(dataset, batch_size=args.batch, collate_fn=pseudo_collate)))

    def build(recipe):
        torch.manual_seed(0)
        model = MODELS.build(cfg.model)
        model.init_weights()
        model.train()
        if recipe:
            dq.quantize(model, recipe, prediction_layers=mmdet_prediction_layers(model))
            dq.calibrate(model, [batch], forward_fn=mmdet_forward, num_batches=1)
            model.train()
        wrapper = build_optim_wrapper(model, copy.deepcopy(cfg.optim_wrapper))
        if recipe:
            add_quantizer_param_group(wrapper.optimizer, model, 0.1)
        return model, wrapper

    variants = {"float": build(None)}
    for r in args.recipes.split(","):
        variants[r] = build(r)
    times = {k: [] for k in variants}
    vals = {k: [] for k in variants}
    firsts = {k: [] for k in variants}
    for rep in range(args.reps + 1):
        for name, (model, wrapper) in variants.items():
            t = clock()
            model.train_step(copy.copy(batch), wrapper)
            if rep:  # the first round warms up
                times[name].append(clock() - t)
        # validation: val_step (predict mode, with NMS), eval, no_grad; the first call after the step (new weights)
        # and the third, as the rest of a validation pass runs (the second packs integer weights, once per pass)
        for name, (model, wrapper) in variants.items():
            model.eval()
            with torch.no_grad():
                for calls in (firsts, None, vals):
                    t = clock()
                    model.val_step(copy.copy(batch))
                    if rep and calls is not None:
                        calls[name].append(clock() - t)
            model.train()
    memory = {}
    for name, (model, wrapper) in variants.items():
        data = model.data_preprocessor(copy.copy(batch), True)

        def loss_fn(model=model, data=data):
            parsed, _ = model.parse_losses(model._run_forward(data, mode="loss"))
            return parsed

        loss, saved = saved_for_backward_bytes(loss_fn, model)
        loss.backward()
        wrapper.zero_grad()
        memory[name] = saved + model_state_bytes(model, wrapper.optimizer)
    stats, val_stats, first_stats = ratio_stats(times), ratio_stats(vals), ratio_stats(firsts)
    print(f"{args.config}: train_step, batch {args.batch}x3x{args.imgsz}x{args.imgsz}, {args.threads} threads, "
          f"median of {args.reps}, "
          f"clock {os.environ.get('DETQ_BENCH_CLOCK', 'wall')}")
    for name in times:
        st = stats[name]
        print(f"  {name:6s} {st['median_s'] * 1000:8.1f} ms   {fmt_ratio(st)} x float (per-rep median, min-max)   "
              f"validation {fmt_ratio(val_stats[name])} (first after the step {fmt_ratio(first_stats[name])}) x float   "
              f"memory {memory[name] / 2**20:7.1f} MB = {memory[name] / memory['float']:.3f} x float")
    if args.json:
        save_json(args.json, args, [{"variant": k, "train": stats[k], "val": val_stats[k], "val_first": first_stats[k],
                                     "memory_bytes": memory[k],
                                     "memory_ratio": memory[k] / memory["float"]} for k in times],
                  clock=os.environ.get("DETQ_BENCH_CLOCK", "wall"))


if __name__ == "__main__":
    main()
