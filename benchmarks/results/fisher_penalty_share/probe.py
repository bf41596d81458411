"""How large the Fisher regulariser's penalty is against the task loss: one run of the Fisher benchmarks' recipe
(same float start, data and schedule as bench_fisher.py / bench_fisher_mmdet.py, seed 0) printing, at every
regulariser step, λ, tr F, the penalty λ·tr F, the task loss the adapter passes to the term (Ultralytics: per image;
MMEngine: parse_losses' sum) and the cap's factor (1: not capped).

    python benchmarks/results/fisher_penalty_share/probe.py ultralytics yolo11n w4a4 both
    python benchmarks/results/fisher_penalty_share/probe.py mmdet rtmdet_tiny_synthetic w4a4 both
    python benchmarks/results/fisher_penalty_share/probe.py mmdet dino_cspnext_synthetic w4a4 both
"""
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402
from bench_fisher import variant_recipe  # noqa: E402

trainer, model_name, bits, variant = sys.argv[1:5]
CRITICAL, LAMBDA, EVERY = ["star", "checker"], 0.01, 12
last = {}


def report(term, where: str) -> None:
    if term.last_trace is None or last.get("trace") == term.last_trace:
        return  # no regulariser step since the last report
    last["trace"] = term.last_trace
    pen = term.current_weight() * term.last_trace
    print(f"{where} lam {term.current_weight():.4g} trace {term.last_trace:.4g} penalty {pen:.4g} "
          f"task {term.last_task_loss:.4g} share {pen / term.last_task_loss:.3f} scale {term.last_scale:.4g}", flush=True)


def ultralytics(epochs: int = 6) -> None:
    import bench_fisher as B
    from ultralytics import YOLO

    from detq_hooks.tools.data import make_synthetic_dataset
    from detq_hooks.tools.zoo import cached_float_checkpoint, synthetic_data_dir
    from detq_hooks.ultralytics import DetQTrainer

    ds = make_synthetic_dataset(synthetic_data_dir(256, 64, 160), num_train=256, num_val=64, imgsz=160, seed=0)
    ref = cached_float_checkpoint(ds, f"{model_name}.yaml", epochs=20, imgsz=160, verbose=False)
    recipe = variant_recipe(bits, variant, CRITICAL, B.plain_average_bits(ref.checkpoint, bits), LAMBDA, EVERY)
    model = YOLO(str(ref.checkpoint))
    model.add_callback("on_train_batch_end", lambda t: report(t.detq_session.terms[-1], f"step {t.detq_session.terms[-1].calls}"))
    model.train(data=str(ds.yolo_yaml), trainer=DetQTrainer, detq=recipe, imgsz=160, epochs=epochs, batch=16,
                amp=False, plots=False, workers=0, device="cpu", exist_ok=True, project=tempfile.mkdtemp(), name="probe",
                seed=0, deterministic=True, verbose=False, optimizer="AdamW", lr0=0.0005, nbs=16, warmup_epochs=0,
                close_mosaic=epochs, val=False)


def mmdet(iters: int = 240) -> None:
    from _mmdet import cached_float_model, mmdet_cfg, synthetic_mmdet_data
    from bench_fisher_mmdet import plain_average_bits
    from mmengine.hooks import Hook
    from mmengine.runner import Runner

    from detq_hooks.mmengine import DetQHook

    ds = synthetic_mmdet_data(160, 256, 64)
    float_ckpt = cached_float_model(model_name, 160, 8, 40 if "rtmdet" in model_name else 30, ds, 40)
    recipe = variant_recipe(bits, variant, CRITICAL, plain_average_bits(model_name, float_ckpt, bits), LAMBDA, EVERY)
    cfg = mmdet_cfg(f"{model_name}_w4a8", Path(tempfile.mkdtemp()), 160, 8, load_from=str(float_ckpt))
    for h in cfg.get("custom_hooks", []):
        if h["type"] == "DetQHook":
            h.update(recipe=recipe, calibration_batches=4)
    cfg.randomness = dict(seed=0)
    cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=iters, val_interval=100000)
    cfg.optim_wrapper.optimizer.lr = cfg.optim_wrapper.optimizer.lr * 0.1
    cfg.param_scheduler = [dict(type="CosineAnnealingLR", by_epoch=False, begin=0, end=iters, T_max=iters,
                                eta_min_ratio=0.05)]
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=100000, by_epoch=False)

    class Watch(Hook):
        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            report(next(h for h in runner.hooks if isinstance(h, DetQHook)).session.terms[-1], f"iter {runner.iter}")

    runner = Runner.from_cfg(cfg)
    runner.register_hook(Watch(), priority="LOWEST")
    runner.train()


torch.set_num_threads(1)
{"ultralytics": ultralytics, "mmdet": mmdet}[trainer]()
