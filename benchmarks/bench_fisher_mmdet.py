"""Fisher-aware quantization in MMDetection, on a DETR-family model (a slim DINO): plain QAT vs
+ Fisher mixed precision vs + Fisher-trace regulariser vs both, from one cached float checkpoint with the same
iteration budget, the synthetic data's rarest classes as the critical set — the MMDetection row of
``bench_fisher.py``.

    python benchmarks/bench_fisher_mmdet.py [--config dino_cspnext_synthetic --backbone-epochs 40
        --float-epochs 30 --imgsz 160 --qat-iters 240 --bits w4a8,w4a4 --variants plain,mp,reg,both --critical star,checker
        --seeds 0 --reg-every 12 --threads 2 --out benchmarks/results/fisher_mmdet]

``--config`` is any float config under ``integrations/mmdet`` that has a ``<config>_w4a8.py`` twin; the slim
Conditional DETR (``conditional_detr_cspnext_synthetic``) runs too, but does not train to a usable float mAP on
this CPU.

The float model is trained once and cached (``_mmdet.cached_float_model``), its backbone initialised from
RTMDet-tiny trained ``--backbone-epochs`` on the same data (DETRs need a pretrained backbone; nothing can be
downloaded here). Every QAT run is
MMDetection's own ``Runner.train()`` with ``DetQHook`` (``integrations/mmdet/<config>_w4a8.py``, its recipe
replaced by the variant's), lr × 0.1 with a cosine decay, ``--qat-iters`` iterations; fractions kept are of the
better of the float start and the float model fine-tuned with the same budget. Mixed precision gets the
*measured* average weight bits of a plain conversion (first and prediction layers at 8 bits included), so every
variant of one preset has the same file size. mAP50-95 is MMDetection's CocoMetric on the val split; critical
mAP is pycocotools over the critical categories (``coco/critical_bbox_mAP``, added by detq to the evaluator);
per-class AP is CocoMetric's ``classwise`` output. "step ÷ plain" is the mean training iteration time (the
regulariser's amortised cost, Fisher estimation at the start included) over plain QAT's of the same bits.
Results: ``<out>/results.json``, ``<out>/fisher.md``, ``<out>/fisher.png``, per run ``bits_<run>.png`` and
``ap_drop_<run>.png``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).parent))
from _mmdet import StepTimer, cached_float_model, mmdet_cfg, synthetic_mmdet_data  # noqa: E402
from bench_fisher import add_study_arguments, record_run, variant_recipe, write_outputs  # noqa: E402


def plain_average_bits(config: str, float_ckpt: Path, preset: str) -> float:
    """Average weight bits of a plain ``preset`` conversion of the float model (every quantized weight)."""
    from mmdet.registry import MODELS
    from mmengine.runner import load_checkpoint

    from detq_hooks.fisher import average_weight_bits
    from detq_hooks.session import QuantSession

    cfg = mmdet_cfg(config, tempfile.mkdtemp(), 160, 1)
    model = MODELS.build(cfg.model)
    load_checkpoint(model, str(float_ckpt), map_location="cpu", logger="silent")
    QuantSession(preset).convert(model, training=False)
    return round(average_weight_bits(model), 4)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="dino_cspnext_synthetic", help="float config under integrations/mmdet")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--backbone-epochs", type=int, default=40, help="RTMDet-tiny float epochs (its backbone starts the DETR)")
    p.add_argument("--float-epochs", type=int, default=30)
    p.add_argument("--qat-iters", type=int, default=240)
    add_study_arguments(p)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/fisher_mmdet"))
    a = p.parse_args(argv)

    import torch
    from mmengine.hooks import Hook
    from mmengine.runner import Runner

    from detq_hooks.mmengine import DetQHook
    from detq_hooks.mmengine.metrics import add_critical_metrics

    torch.set_num_threads(a.threads)
    critical = [c for c in a.critical.split(",") if c]
    a.out.mkdir(parents=True, exist_ok=True)
    ds = synthetic_mmdet_data(a.imgsz, a.num_train, a.num_val)
    unknown = [c for c in critical if c not in ds.classes]
    if unknown:
        raise SystemExit(f"--critical {unknown} are not classes of the synthetic data {ds.classes}")
    critical_labels = [ds.classes.index(c) for c in critical]
    float_ckpt = cached_float_model(a.config, a.imgsz, a.batch, a.float_epochs, ds, a.backbone_epochs)

    class CriticalMetrics(Hook):  # the float runs have no DetQHook: add the same critical AP to their evaluator
        def before_val(self, runner):
            add_critical_metrics(runner.val_loop.evaluator, critical_labels)

        def before_test(self, runner):
            add_critical_metrics(runner.test_loop.evaluator, critical_labels)

    def result_of(metrics: dict) -> SimpleNamespace:
        per_category = {c: float(metrics[f"coco/{c}_precision"]) for c in ds.classes if f"coco/{c}_precision" in metrics}
        return SimpleNamespace(map50_95=metrics["coco/bbox_mAP"], map50=metrics["coco/bbox_mAP_50"],
                               critical=metrics["coco/critical_bbox_mAP"], critical50=metrics["coco/critical_bbox_mAP_50"],
                               per_category=per_category)

    def config(name: str, work: Path, **options):
        cfg = mmdet_cfg(name, work, a.imgsz, a.batch, **options)
        for key in ("val_evaluator", "test_evaluator"):
            cfg[key]["classwise"] = True
        return cfg

    float_cfg = config(a.config, Path(tempfile.mkdtemp()), load_from=str(float_ckpt))
    runner = Runner.from_cfg(float_cfg)
    runner.register_hook(CriticalMetrics())
    float_res = result_of(runner.test())
    print(f"float {a.config}: mAP50-95 {float_res.map50_95:.4f}, critical {critical} {float_res.critical:.4f} ({float_ckpt})", flush=True)

    def fine_tune(label: str, recipe, seed: int) -> dict:
        work = a.out.resolve() / "runs" / label
        cfg = config(a.config if recipe is None else f"{a.config}_w4a8", work, load_from=str(float_ckpt))
        cfg.randomness = dict(seed=seed)
        for h in cfg.get("custom_hooks", []):
            if h["type"] == "DetQHook":
                h.update(recipe=recipe, calibration_batches=4)
        cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=a.qat_iters, val_interval=a.qat_iters)
        cfg.optim_wrapper.optimizer.lr = cfg.optim_wrapper.optimizer.lr * 0.1  # fine-tuning from float weights
        cfg.param_scheduler = [dict(type="CosineAnnealingLR", by_epoch=False, begin=0, end=a.qat_iters,
                                    T_max=a.qat_iters, eta_min_ratio=0.05)]
        cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=a.qat_iters, by_epoch=False, max_keep_ckpts=1)
        runner = Runner.from_cfg(cfg)
        timer = StepTimer()
        runner.register_hook(timer, priority="LOWEST")
        runner.register_hook(CriticalMetrics())
        runner.train()
        res = result_of(runner.val())
        plan = next((h.session.last_mixed_precision for h in runner.hooks if isinstance(h, DetQHook)), None)
        return {"run": label, "seed": seed, "eval": res, "plan": plan,
                "s_per_step": statistics.fmean(timer.times[5:] or timer.times)}

    # The fair reference: the float model trained on with QAT's budget (else QAT gets credit for training the
    # float model did not get).
    tuned = fine_tune("float_finetune", None, 0)
    tuned_res = tuned.pop("eval")
    print(f"float fine-tuned {a.qat_iters} iterations: mAP50-95 {tuned_res.map50_95:.4f}, critical {tuned_res.critical:.4f}", flush=True)
    if tuned_res.map50_95 > float_res.map50_95:
        float_res = tuned_res
    header = (f"{a.config}: float (the better of the start and its {a.qat_iters}-iteration fine-tune) mAP50-95 "
              f"{float_res.map50_95:.4f}, critical ({', '.join(critical)}) {float_res.critical:.4f}; QAT {a.qat_iters} "
              f"iterations (batch {a.batch}) from it, imgsz {a.imgsz}, {a.num_train} train / {a.num_val} val images; "
              f"seeds {a.seeds}; regulariser λ={a.reg_weight}, every {a.reg_every} steps")
    rows = []
    for bits in a.bits.split(","):
        avg = plain_average_bits(a.config, float_ckpt, bits)
        for variant in a.variants.split(","):
            for seed in [int(s) for s in a.seeds.split(",")]:
                recipe = variant_recipe(bits, variant, critical, avg, a.reg_weight, a.reg_every)
                label = f"{bits}_{variant}_s{seed}"
                r = fine_tune(label, recipe, seed)
                res, plan = r.pop("eval"), r.pop("plan")
                r.update(bits=bits, variant=variant)
                rows.append(record_run(a.out, r, res, res.critical, res.critical50, plan, float_res, float_res.critical,
                                       critical, avg))
                # after every run, so a study cut off half-way still leaves the rows it measured
                write_outputs(a.out, header, rows, "s_per_step", "step ÷ plain", float_res, float_res.critical,
                              float_res.critical50, critical, vars(a))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
