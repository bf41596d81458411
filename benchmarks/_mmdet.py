"""Shared MMDetection helpers of the benchmarks: a synthetic-data config at a given size, and the float model
trained once from scratch and cached."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "integrations" / "mmdet"


def mmdet_cfg(name: str, work, imgsz: int, batch: int, **options):
    """``integrations/mmdet/<name>.py`` at ``imgsz`` px and ``batch`` images per step, quiet, seeded."""
    from mmengine.config import Config

    cfg = Config.fromfile(str(CONFIGS / f"{name}.py"))
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        cfg[loader]["batch_size"] = batch
        for step in cfg[loader]["dataset"]["pipeline"]:
            for k in ("scale", "size"):
                if k in step:
                    step[k] = (imgsz, imgsz)
    cfg.work_dir = str(work)
    cfg.log_level = "WARNING"
    cfg.randomness = dict(seed=0)
    cfg.default_hooks.logger = dict(type="LoggerHook", interval=50)
    cfg.default_hooks.visualization = dict(type="DetVisualizationHook", draw=False)
    cfg.visualizer = dict(type="DetLocalVisualizer", vis_backends=[])
    cfg.merge_from_dict(options)
    return cfg


def StepTimer():
    """An MMEngine hook that records each training iteration's wall time in ``.times`` (seconds)."""
    from mmengine.hooks import Hook

    class _StepTimer(Hook):
        def __init__(self):
            self.times, self._t = [], 0.0

        def before_train_iter(self, runner, batch_idx, data_batch=None):
            self._t = time.perf_counter()

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            self.times.append(time.perf_counter() - self._t)

    return _StepTimer()


def synthetic_mmdet_data(imgsz: int, num_train: int, num_val: int):
    """The synthetic COCO data the MMDetection configs read (``DETQ_SYNTH_ROOT`` is set to it)."""
    from detq_hooks.tools.data import make_synthetic_dataset

    data_root = Path(tempfile.gettempdir()) / f"detq_crqat_synth_{imgsz}_{num_train}"
    ds = make_synthetic_dataset(data_root, num_train=num_train, num_val=num_val, imgsz=imgsz, seed=0)
    os.environ["DETQ_SYNTH_ROOT"] = str(ds.root) + "/"
    return ds


def cached_float_mmdet(config: str, imgsz: int, batch: int, epochs: int, ds, val_interval: int = 0, **options) -> Path:
    """The float ``config`` trained ``epochs`` epochs from scratch on ``ds``, cached under
    ``float_refs_dir()/mmdet/<key>/float.pth`` (delete it to retrain); ``val_interval`` > 0 also validates every
    that many epochs (to watch a slow model converge; not part of the cache key); ``options`` are merged into the
    config (dotted keys, e.g. a backbone's ``init_cfg``) and are part of the key."""
    from mmengine.runner import Runner

    import detq_hooks.mmengine  # noqa: F401  (registers DetQHook; lets torch's weights_only load MMEngine checkpoints)
    from detq_hooks.tools.zoo import float_refs_dir

    fields = json.dumps([config, imgsz, batch, epochs, ds.params()]) + (json.dumps(options, sort_keys=True) if options else "")
    key = hashlib.sha256(fields.encode()).hexdigest()[:16]
    float_ckpt = float_refs_dir() / "mmdet" / key / "float.pth"
    if float_ckpt.exists():
        return float_ckpt
    work = Path(tempfile.mkdtemp(prefix="detq_float_"))
    cfg = mmdet_cfg(config, work, imgsz, batch, **options)
    cfg.train_cfg = dict(type="EpochBasedTrainLoop", max_epochs=epochs, val_interval=val_interval or epochs)
    cfg.param_scheduler = [dict(type="LinearLR", start_factor=0.01, by_epoch=False, begin=0, end=100),
                           dict(type="CosineAnnealingLR", by_epoch=True, begin=0, end=epochs,
                                T_max=epochs, eta_min_ratio=0.05, convert_to_iter_based=True)]
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=epochs, max_keep_ckpts=1)
    t = time.time()
    Runner.from_cfg(cfg).train()
    float_ckpt.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(work / f"epoch_{epochs}.pth", float_ckpt)
    print(f"float {config} trained in {time.time() - t:.0f} s -> {float_ckpt}", flush=True)
    return float_ckpt


# DETR-family configs start from a pretrained backbone: RTMDet-tiny's (the same CSPNeXt-tiny), trained on the same
# data, stands in for the ImageNet weights nobody can download here.
BACKBONE_FROM_RTMDET = ("dino_cspnext_synthetic", "conditional_detr_cspnext_synthetic")
RTMDET = "rtmdet_tiny_synthetic"


def cached_float_model(config: str, imgsz: int, batch: int, epochs: int, ds, backbone_epochs: int = 40) -> Path:
    """The cached float ``config``: trained from scratch, or -- for a config in ``BACKBONE_FROM_RTMDET`` -- from
    the backbone of RTMDet-tiny trained ``backbone_epochs`` epochs on ``ds`` (validated every 10 epochs: DETRs
    converge slowly)."""
    if config not in BACKBONE_FROM_RTMDET:
        return cached_float_mmdet(config, imgsz, batch, epochs, ds)
    backbone = cached_float_mmdet(RTMDET, imgsz, batch, backbone_epochs, ds)
    init = {"model.backbone.init_cfg": dict(_delete_=True, type="Pretrained", prefix="backbone.", checkpoint=str(backbone))}
    return cached_float_mmdet(config, imgsz, batch, epochs, ds, val_interval=10, **init)
