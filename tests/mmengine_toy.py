"""A toy MMEngine detector (registered model, dataset and metric) for fast DetQHook life-cycle tests."""

import contextlib
import logging

import torch
from torch import nn
from mmengine.evaluator import BaseMetric
from mmengine.model import BaseModel
from mmengine.registry import DATASETS, METRICS, MODELS

import detq_hooks.mmengine  # noqa: F401  (registers DetQHook; Config.fromfile does this via custom_imports)


@MODELS.register_module(force=True)
class ToyDet(BaseModel):
    def __init__(self, num_classes=3):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.SiLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.SiLU())
        self.neck = nn.Sequential(nn.Conv2d(16, 16, 1), nn.SiLU())
        self.bbox_head = nn.Module()
        self.bbox_head.shared = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1), nn.SiLU())
        self.bbox_head.conv_cls = nn.Conv2d(16, num_classes, 1)
        self.bbox_head.conv_reg = nn.Conv2d(16, 4, 1)

    def _raw(self, inputs):
        f = self.bbox_head.shared(self.neck(self.backbone(inputs)))
        return self.bbox_head.conv_cls(f), self.bbox_head.conv_reg(f)

    def forward(self, inputs, data_samples=None, mode="tensor"):
        inputs = torch.stack(inputs) if isinstance(inputs, list) else inputs
        cls, reg = self._raw(inputs.float())
        if mode == "tensor":
            return cls, reg
        target = data_samples["target"].float()  # default_collate stacks the per-sample dicts
        if mode == "loss":
            return {"loss_cls": (cls.mean((2, 3)) - target).pow(2).mean(), "loss_reg": reg.pow(2).mean() * 0.1}
        return [{"pred": c.mean((1, 2)), "target": t} for c, t in zip(cls, target)]


@DATASETS.register_module(force=True)
class ToyDataset(torch.utils.data.Dataset):
    def __init__(self, n=16, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, 32, 32, generator=g)
        self.t = torch.randn(n, 3, generator=g)
        self.metainfo = {}

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"inputs": self.x[i], "data_samples": {"target": self.t[i]}}


@METRICS.register_module(force=True)
class ToyMSE(BaseMetric):
    def process(self, data_batch, data_samples):
        for d in data_samples:
            self.results.append(float((d["pred"] - d["target"]).pow(2).mean()))

    def compute_metrics(self, results):
        return {"mse": sum(results) / len(results)}


def toy_cfg(work_dir, max_iters=6, hooks=None, **extra):
    from mmengine.config import Config

    loader = dict(dataset=dict(type="ToyDataset", n=16), sampler=dict(type="DefaultSampler", shuffle=False),
                  batch_size=4, num_workers=0, collate_fn=dict(type="default_collate"))
    cfg = dict(
        model=dict(type="ToyDet"),
        work_dir=str(work_dir),
        train_dataloader=loader,
        val_dataloader=loader,
        test_dataloader=loader,
        train_cfg=dict(by_epoch=False, max_iters=max_iters, val_interval=max_iters),
        val_cfg=dict(), test_cfg=dict(),
        val_evaluator=dict(type="ToyMSE"), test_evaluator=dict(type="ToyMSE"),
        optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.05, momentum=0.9, weight_decay=1e-4)),
        param_scheduler=[dict(type="LinearLR", start_factor=0.5, by_epoch=False, begin=0, end=3),
                         dict(type="MultiStepLR", by_epoch=False, milestones=[4], gamma=0.5)],
        default_hooks=dict(checkpoint=dict(type="CheckpointHook", interval=3, by_epoch=False),
                           logger=dict(type="LoggerHook", interval=1)),
        custom_imports=dict(imports=["detq_hooks.mmengine"], allow_failed_imports=False),
        custom_hooks=hooks if hooks is not None else [dict(type="DetQHook", recipe="w4a8", calibration_batches=2, log_interval=1)],
        env_cfg=dict(dist_cfg=dict(backend="gloo")),
        randomness=dict(seed=0, deterministic=False),
        log_level="WARNING",
    )
    cfg.update(extra)
    return Config(cfg)


@contextlib.contextmanager
def logged_warnings(logger):
    """The messages of the warnings ``logger`` prints inside the block. (MMLogger instances are shared by runners
    built within the same second, so their log files cannot tell runners apart.)"""
    messages = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
