"""Quantization-aware training of a torchvision FCOS detector with Lightning and ``DetQCallback``.

Trains a small FCOS (ResNet-18 + FPN, no pre-trained weights) on the synthetic COCO data, then fine-tunes
it with W8A8 and W4A8 fake quantization from the float weights, and prints COCO mAP (torchmetrics'
``MeanAveragePrecision``, pycocotools backend) for each::

    python examples/lightning_fcos.py                       # defaults: ~10 minutes on 2 CPU cores
    python examples/lightning_fcos.py --num-train 32 --num-val 8 --imgsz 96 --float-epochs 1 --qat-epochs 1

The only detq-specific line is ``callbacks=[DetQCallback(recipe=...)]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import lightning.pytorch as pl
from torchvision.models import resnet
from torchvision.models.detection import FCOS
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.fcos import FCOSHead
from torchvision.ops.feature_pyramid_network import LastLevelP6P7


# ------------------------------------------------------------------------------------------- data
class CocoDetection(Dataset):
    """Images and targets (``boxes`` xyxy in pixels, ``labels`` = COCO category ids) from a COCO json."""

    def __init__(self, images_dir, annotation_json) -> None:
        from PIL import Image  # noqa: F401  (checked early)

        data = json.loads(Path(annotation_json).read_text())
        self.images_dir = Path(images_dir)
        self.images = sorted(data["images"], key=lambda im: im["id"])
        self.anns: dict[int, list] = {im["id"]: [] for im in self.images}
        for a in data["annotations"]:
            self.anns[a["image_id"]].append(a)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from PIL import Image
        import numpy as np

        info = self.images[i]
        img = np.asarray(Image.open(self.images_dir / info["file_name"]).convert("RGB"), dtype=np.float32) / 255.0
        boxes = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in self.anns[info["id"]]]
        labels = [a["category_id"] for a in self.anns[info["id"]]]
        target = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "image_id": info["id"],
        }
        return torch.from_numpy(img).permute(2, 0, 1).contiguous(), target


def collate(batch):
    images, targets = zip(*batch)
    return list(images), list(targets)


class SynthCocoData(pl.LightningDataModule):
    def __init__(self, root: str = "/tmp/detq_synth_lightning", num_train: int = 64, num_val: int = 16,
                 imgsz: int = 128, batch_size: int = 4, seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.ds = None

    def prepare_data(self) -> None:
        self.dataset()

    def dataset(self):
        if self.ds is None:
            from detq_hooks.tools.data import make_synthetic_dataset

            h = self.hparams
            self.ds = make_synthetic_dataset(h.root, num_train=h.num_train, num_val=h.num_val, imgsz=h.imgsz, seed=h.seed)
        return self.ds

    @property
    def num_classes(self) -> int:
        return len(self.dataset().classes)

    def train_dataloader(self):
        ds = self.dataset()
        return DataLoader(CocoDetection(ds.train_images, ds.coco_train_json), batch_size=self.hparams.batch_size,
                          shuffle=True, collate_fn=collate, num_workers=self.hparams.num_workers,
                          generator=torch.Generator().manual_seed(self.hparams.seed))

    def val_dataloader(self):
        ds = self.dataset()
        return DataLoader(CocoDetection(ds.val_images, ds.coco_val_json), batch_size=self.hparams.batch_size,
                          shuffle=False, collate_fn=collate, num_workers=self.hparams.num_workers)

    test_dataloader = val_dataloader


# ------------------------------------------------------------------------------------------- model
def build_fcos(num_classes: int, min_size: int = 128, max_size: int = 128, backbone: str = "resnet18",
               fpn_channels: int = 64, head_convs: int = 2) -> FCOS:
    """A small FCOS: ResNet body (no pre-trained weights, trainable BatchNorm), FPN P3-P7, a 2-conv head.
    ``num_classes`` counts the classes without background (COCO category ids 1..K are the labels)."""
    body = getattr(resnet, backbone)(weights=None, norm_layer=nn.BatchNorm2d)
    expansion = 4 if backbone in ("resnet50", "resnet101", "resnet152") else 1
    in_channels = [128 * expansion, 256 * expansion, 512 * expansion]
    fpn = BackboneWithFPN(body, {"layer2": "0", "layer3": "1", "layer4": "2"}, in_channels, fpn_channels,
                          extra_blocks=LastLevelP6P7(fpn_channels, fpn_channels))
    head = FCOSHead(fpn_channels, 1, num_classes + 1, num_convs=head_convs)
    return FCOS(fpn, num_classes + 1, min_size=min_size, max_size=max_size, head=head, score_thresh=0.05,
                detections_per_img=50, topk_candidates=200)


class FCOSModule(pl.LightningModule):
    """FCOS as a LightningModule: losses in training, COCO mAP (torchmetrics) in validation and test.

    For detq-hooks: ``calibration_forward`` runs a training batch through the detector in eval mode
    (``DetQCallback`` calls it to calibrate activation ranges); ``distillation_outputs`` gives the head's raw
    outputs for CR-QAT distillation.
    """

    def __init__(self, num_classes: int = 8, lr: float = 0.01, weight_decay: float = 1e-4, min_size: int = 128,
                 max_size: int = 128, backbone: str = "resnet18", fpn_channels: int = 64, head_convs: int = 2,
                 max_epochs: int = 1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = build_fcos(num_classes, min_size, max_size, backbone, fpn_channels, head_convs)
        self.map = self._metric()

    @staticmethod
    def _metric():
        from torchmetrics.detection import MeanAveragePrecision

        return MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")

    def forward(self, images):
        return self.model(images)

    def training_step(self, batch, batch_idx):
        images, targets = batch
        losses = self.model(images, [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])
        loss = sum(losses.values())
        for k, v in losses.items():
            self.log(f"train/{k}", v, batch_size=len(images))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(images))
        return loss

    def _eval_step(self, batch):
        images, targets = batch
        preds = self.model(images)
        self.map.update([{"boxes": p["boxes"].float(), "scores": p["scores"].float(), "labels": p["labels"]} for p in preds],
                        [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])

    def _eval_end(self, prefix):
        r = self.map.compute()
        self.log(f"{prefix}/mAP", r["map"].float())
        self.log(f"{prefix}/mAP50", r["map_50"].float())
        self.map.reset()

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch)

    def on_validation_epoch_end(self):
        self._eval_end("val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch)

    def on_test_epoch_end(self):
        self._eval_end("test")

    def predict_step(self, batch, batch_idx):
        return self.model(batch[0])

    def calibration_forward(self, batch):
        return self.model(batch[0])

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=self.hparams.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.hparams.max_epochs))
        return {"optimizer": opt, "lr_scheduler": sched}


# ------------------------------------------------------------------------------------------- runs
class StepTimer(pl.Callback):
    def __init__(self, warmup: int = 2) -> None:
        self.warmup, self.times, self._t = warmup, [], 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx >= self.warmup:
            self.times.append(time.perf_counter() - self._t)

    @property
    def median_ms(self) -> float:
        ts = sorted(self.times)
        return 1000 * ts[len(ts) // 2] if ts else float("nan")


QAT_EXTRAS = {"crqat": (True, True), "cur": (True, False), "kd": (False, True)}


def recipe_spec(name: str):
    """``w4a8`` (a preset), ``w4a4+crqat`` (curriculum + distillation), ``+cur`` (curriculum only),
    ``+kd`` (distillation only), ``w4a4-ptq+adaround`` (a PTQ preset with another method: any calibration method
    or block reconstruction the recipe knows), or a recipe YAML path."""
    base, _, extra = name.partition("+")
    if not extra:
        return base
    if base.endswith("-ptq"):
        from detq_hooks.recipe import CALIBRATORS, PTQ_METHODS

        # a calibration method sets the activation ranges; the other PTQ methods reconstruct blocks after it
        ptq_extras = {**{m: {"calibration": {"method": m}} for m in CALIBRATORS},
                      **{m: {"ptq": {"method": m}} for m in PTQ_METHODS if m != "calibration"}}
        if extra not in ptq_extras:
            raise SystemExit(f"recipe {name!r}: after a -ptq preset, '+' takes one of {', '.join(ptq_extras)}")
        return {"preset": base, **ptq_extras[extra]}
    if extra not in QAT_EXTRAS:
        raise SystemExit(f"recipe {name!r}: '+' takes one of {', '.join(QAT_EXTRAS)} (or a PTQ method after a -ptq preset)")
    cur, kd = QAT_EXTRAS[extra]
    return {"preset": base, "curriculum": {"enabled": cur}, "distillation": {"enabled": kd}}


def calibration_batches(spec, args) -> Optional[int]:
    """``--ptq-calibration-batches`` for a post-training recipe (it calibrates and reconstructs on them), or
    ``None`` (the recipe's own ``calibration.num_batches``) when not given; ``--calibration-batches`` for QAT
    (ranges to start from)."""
    from detq_hooks.recipe import load_recipe

    if load_recipe(spec).mode == "ptq":
        return args.ptq_calibration_batches
    return args.calibration_batches


def run(recipe: Optional[str], data: SynthCocoData, epochs: int, args, init_state: Optional[dict] = None,
        out_dir: Path = Path("."), extra_callbacks=()) -> dict[str, Any]:
    from detq_hooks.lightning import DetQCallback

    pl.seed_everything(args.seed, workers=True)
    module = FCOSModule(num_classes=data.num_classes, lr=args.lr if recipe is None else args.qat_lr,
                        min_size=args.imgsz, max_size=args.imgsz, backbone=args.backbone,
                        fpn_channels=args.fpn_channels, max_epochs=epochs)
    if init_state is not None:
        module.load_state_dict(init_state)  # QAT starts from the float weights
    timer = StepTimer()
    callbacks = [timer, *extra_callbacks]
    if recipe is not None:
        spec = recipe_spec(recipe)
        callbacks.insert(0, DetQCallback(recipe=spec, target="model", calibration_batches=calibration_batches(spec, args)))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, callbacks=callbacks, logger=False,
                         enable_checkpointing=False, num_sanity_val_steps=0, check_val_every_n_epoch=max(1, epochs),
                         enable_progress_bar=args.progress, enable_model_summary=False, default_root_dir=out_dir,
                         limit_train_batches=args.limit_train_batches)
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=data)
    train_s = time.perf_counter() - t0
    ckpt = out_dir / f"fcos_{recipe or 'float'}.ckpt"
    trainer.save_checkpoint(ckpt)
    res = trainer.test(module, datamodule=data, verbose=False)[0]
    return {"recipe": recipe or "float", "mAP": res["test/mAP"], "mAP50": res["test/mAP50"], "step_ms": timer.median_ms,
            "train_s": train_s, "module": module, "ckpt": ckpt}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="/tmp/detq_synth_lightning", help="synthetic data directory (generated once)")
    p.add_argument("--num-train", type=int, default=128)
    p.add_argument("--num-val", type=int, default=32)
    p.add_argument("--imgsz", type=int, default=128, help="image size (also FCOS min/max size)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--backbone", default="resnet18", choices=["resnet18", "resnet34", "resnet50"])
    p.add_argument("--fpn-channels", type=int, default=64)
    p.add_argument("--float-epochs", type=int, default=6)
    p.add_argument("--qat-epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--qat-lr", type=float, default=0.002)
    p.add_argument("--recipes", nargs="+", default=["w8a8", "w4a8"],
                   help="presets, optionally with +crqat / +cur / +kd (e.g. w4a4+crqat) or, after a -ptq preset, a PTQ method "
                        "(e.g. w4a4-ptq+adaround), or recipe YAML paths")
    p.add_argument("--calibration-batches", type=int, default=4, help="training batches that calibrate a QAT recipe")
    p.add_argument("--ptq-calibration-batches", type=int, default=None,
                   help="training batches that calibrate (and reconstruct) a PTQ recipe (-ptq, -taskq presets); "
                        "default: the recipe's calibration.num_batches (16 in the presets)")
    p.add_argument("--limit-train-batches", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="/tmp/detq_lightning_fcos")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = SynthCocoData(args.root, args.num_train, args.num_val, args.imgsz, args.batch_size, args.seed)
    data.prepare_data()

    rows = [run(None, data, args.float_epochs, args, out_dir=out)]
    float_state = copy.deepcopy(rows[0]["module"].state_dict())
    for recipe in args.recipes:
        rows.append(run(recipe, data, args.qat_epochs, args, init_state=float_state, out_dir=out))

    fmap = rows[0]["mAP"]
    print(f"\nFCOS-{args.backbone} on synthetic COCO ({args.num_train} train / {args.num_val} val, {args.imgsz}px); "
          f"float {args.float_epochs} epochs, QAT {args.qat_epochs} epochs from float")
    width = max(8, *(len(r["recipe"]) for r in rows))
    print(f"{'model':<{width}} {'mAP50-95':>9} {'mAP50':>7} {'of float':>9} {'step ms':>8} {'train s':>8}")
    for r in rows:
        frac = r["mAP"] / fmap if fmap > 0 else float("nan")
        print(f"{r['recipe']:<{width}} {r['mAP']:>9.4f} {r['mAP50']:>7.4f} {frac:>9.2f} {r['step_ms']:>8.1f} {r['train_s']:>8.1f}")
    return rows


if __name__ == "__main__":
    main()
