"""PTQ of a trained float RTMDet-tiny (or another ``--config``) through MMDetection's own ``Runner.test()`` with
``DetQHook`` and a post-training recipe: calibration (min-max, percentile, MSE) vs block reconstruction (AdaRound,
QDrop) vs TASKQ, at W8A8 / W4A8 / W4A4 — the MMDetection row of ``bench_ptq.py``.

    python benchmarks/bench_ptq_mmdet.py [--config rtmdet_tiny_synthetic --bits w8a8,w4a8,w4a4 --images 64
        --iterations 150 --threads 1 --out benchmarks/results/ptq_mmdet]

Float model: ``integrations/mmdet/<config>.py`` trained ``--float-epochs`` on the synthetic data (160 px, 256 train /
64 val images; cached like ``bench_crqat_mmdet.py``'s): RTMDet-tiny 40 epochs from scratch; the slim DINO
(``dino_cspnext_synthetic``) 30 epochs from RTMDet-tiny's backbone, the same float model as
``bench_fisher_mmdet.py``'s. Every variant runs in its own
process; "wall s" is the time ``DetQHook`` spends before the first test batch (calibration and reconstruction on
the first ``--images`` training images), peak RSS that of the process. mAP50-95 is MMDetection's CocoMetric on
the val split. Results: ``<out>/ptq.json``, ``ptq.md``, ``ptq.png``.
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _mmdet import BACKBONE_FROM_RTMDET, cached_float_model, mmdet_cfg, synthetic_mmdet_data  # noqa: E402
from bench_ptq import logged_rows, ptq_arguments, recipe_for, run_jobs, write_results  # noqa: E402

MODEL_NAMES = {"rtmdet_tiny_synthetic": "RTMDet-tiny", "dino_cspnext_synthetic": "DINO (CSPNeXt-tiny)"}


def float_epochs(a) -> int:
    """``--float-epochs``, else RTMDet-tiny's 40 from scratch or a DETR's 30 from RTMDet-tiny's backbone."""
    if a.float_epochs is not None:
        return a.float_epochs
    return 30 if a.config in BACKBONE_FROM_RTMDET else 40


def run_one(a) -> dict:
    import torch
    from mmengine.hooks import Hook
    from mmengine.runner import Runner

    from detq_hooks.mmengine import DetQHook

    torch.set_num_threads(a.threads)
    ds = synthetic_mmdet_data(160, a.num_train, a.num_val)
    float_ckpt = cached_float_model(a.config, 160, 8, float_epochs(a), ds)
    bits, variant = a.one
    row = {"bits": bits, "variant": variant, "seed": a.seed}
    cfg = mmdet_cfg(a.config, tempfile.mkdtemp(prefix="detq_ptq_"), 160, a.batch, load_from=str(float_ckpt))
    if variant != "float":
        recipe = recipe_for(bits, variant, a.images // a.batch, a.iterations, a.batch, a.seed)
        cfg.custom_imports = dict(imports=["detq_hooks.mmengine"], allow_failed_imports=False)
        cfg.custom_hooks = list(cfg.get("custom_hooks", [])) + [dict(type="DetQHook", recipe=recipe)]
    runner = Runner.from_cfg(cfg)

    class PTQTimer(Hook):  # before_test (DetQHook: calibration + reconstruction) up to the first test batch
        def before_test(self, runner):
            self.start = time.perf_counter()

        def before_test_iter(self, runner, batch_idx, data_batch=None):
            if batch_idx == 0:
                row["seconds"] = time.perf_counter() - self.start

    runner.register_hook(PTQTimer(), priority="HIGHEST")
    results = []
    for hook in runner.hooks:
        if isinstance(hook, DetQHook):
            run_ptq = hook.session.run_ptq
            hook.session.run_ptq = lambda *args, **kw: results.append(run_ptq(*args, **kw)) or results[-1]
    metrics = runner.test()
    # CocoMetric returns no metrics at all when the model detects nothing (a barely trained float model): mAP 0
    row["map50_95"] = metrics["coco/bbox_mAP"] if metrics else 0.0
    if variant == "float":
        row.pop("seconds", None)
    rec = results[0].reconstruction if results else None
    if rec is not None:
        row["cached_kib_per_image"] = rec.cached_bytes_per_image / 1024
        row["blocks_improved"] = sum(b.loss_after < b.loss_before for b in rec.blocks if b.skipped is None)
        row["blocks"] = sum(b.skipped is None for b in rec.blocks)
    row["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("ROW " + json.dumps(row), flush=True)
    return row


def main(argv=None) -> int:
    p = ptq_arguments(__doc__, Path("benchmarks/results/ptq_mmdet"))
    p.add_argument("--config", default="rtmdet_tiny_synthetic", help="float config under integrations/mmdet")
    p.add_argument("--float-epochs", type=int, default=None,
                   help="float training epochs (default: 40 for RTMDet-tiny, 30 for a DETR from its backbone)")
    p.add_argument("--num-train", type=int, default=256, help="synthetic training images (float training, calibration)")
    p.add_argument("--num-val", type=int, default=64, help="synthetic validation images (mAP)")
    a = p.parse_args(argv)
    if a.one:
        run_one(a)
        return 0
    jobs = [("float", "float")] + [(bits, v) for bits in a.bits.split(",") for v in a.variants.split(",")]
    rows = logged_rows(a.out) if a.table_only else run_jobs(__file__, jobs, ["--images", str(a.images), "--batch", str(a.batch), "--iterations",
                                      str(a.iterations), "--threads", str(a.threads), "--out", str(a.out),
                                      "--seed", str(a.seed), "--float-epochs", str(float_epochs(a)), "--config", a.config,
                                      "--num-train", str(a.num_train), "--num-val", str(a.num_val)], a.out)
    write_results(rows, a.out, vars(a), f"float {MODEL_NAMES.get(a.config, a.config)} mAP50-95 {{float}}; {a.images} calibration images, "
                  f"{a.iterations} iterations per block, {a.threads} thread(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
