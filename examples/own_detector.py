"""Your own detector: a LightningModule that detq-hooks has never seen, made CR-QAT-ready by one small
``DetectorFamily`` (the README's "Your own detector" section walks through it).

Without the family the model still gets quantization, calibration, PTQ and export; the family adds what
needs to know the model: its prediction layers, its stages (curriculum) and how to read its head
(distillation's relational, logit and box terms).

    python examples/own_detector.py            # float, then W4A8 CR-QAT from the float weights, a few steps each
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import lightning.pytorch as pl

from detq_hooks.curriculum import Stage
from detq_hooks.detectors import DetectorFamily, Taps
from detq_hooks.distill import HeadOutputs
from detq_hooks.lightning import DetQCallback

STRIDE, NUM_CLASSES = 4, 3


class PointDetector(nn.Module):
    """Anchor-free: one point per cell of a stride-4 grid predicts class logits and (l, t, r, b) distances."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.SiLU(),
                                      nn.Conv2d(16, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.SiLU())
        self.neck = nn.Sequential(nn.Conv2d(32, 32, 3, 1, 1), nn.SiLU())
        self.head = Head()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.neck(self.backbone(images)))


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tower = nn.Sequential(nn.Conv2d(32, 32, 3, 1, 1), nn.SiLU())
        self.cls = nn.Conv2d(32, NUM_CLASSES, 1)
        self.reg = nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.tower(x)
        return self.cls(x), self.reg(x)


def grid_points(h: int, w: int, device) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return (torch.stack([xs, ys], -1).reshape(-1, 2).float() + 0.5) * STRIDE


def decode(cls: torch.Tensor, reg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, A, C) logits, (B, A, 4) xyxy boxes and the (A, 2) points."""
    b, _, h, w = cls.shape
    points = grid_points(h, w, cls.device)
    dist = F.relu(reg).flatten(2).transpose(1, 2) * STRIDE
    boxes = torch.cat([points - dist[..., :2], points + dist[..., 2:]], -1)
    return cls.flatten(2).transpose(1, 2), boxes, points


class PointDetectorFamily(DetectorFamily):
    """What detq-hooks needs to know about PointDetector (every answer is a few lines)."""

    name = "point-detector"
    reads_head = True

    def prediction_layers(self, model):
        return ["detector.head.cls", "detector.head.reg"]

    def stages(self, model):  # backbone first, then neck + head; PKD distils the backbone's output
        return [Stage("backbone", ["detector.backbone"], ["detector.backbone"]),
                Stage("neck_head", ["detector.neck", "detector.head"])]

    def head_taps(self, model):  # the head's outputs and the classifier's input (region embeddings)
        return Taps(outputs=["detector.head"], inputs=["detector.head.cls"])

    def teacher_forward(self, teacher, batch):
        teacher(batch[0])

    def head_outputs(self, model, recorded, batch):
        cls, reg = recorded.output("detector.head")
        logits, boxes, points = decode(cls, reg)
        embeddings = recorded.input("detector.head.cls").flatten(2).transpose(1, 2)
        class_anchors = model.detector.head.cls.weight.detach().flatten(1)  # (C, D): the classifier's rows
        return HeadOutputs(logits, boxes, embeddings, class_anchors, None, "sigmoid", points)

    def targets(self, model, recorded, batch):
        return [t["boxes"] for t in batch[1]], [t["labels"] for t in batch[1]]


class LitPointDetector(pl.LightningModule):
    def __init__(self, lr: float = 0.01) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.detector = PointDetector()
        self.lr = lr

    def forward(self, images):
        return self.detector(images)

    def training_step(self, batch, batch_idx):
        images, targets = batch
        cls, reg = self(images)
        logits, boxes, points = decode(cls, reg)
        cls_target = torch.zeros_like(logits)
        box_loss = logits.new_zeros(())
        for i, t in enumerate(targets):  # a point inside a box is a positive of that box
            for box, label in zip(t["boxes"], t["labels"]):
                inside = ((points[:, 0] > box[0]) & (points[:, 0] < box[2]) & (points[:, 1] > box[1]) & (points[:, 1] < box[3]))
                cls_target[i, inside, label] = 1.0
                box_loss = box_loss + F.l1_loss(boxes[i, inside], box.expand(int(inside.sum()), 4), reduction="sum") / 64
        loss = F.binary_cross_entropy_with_logits(logits, cls_target) + box_loss / len(targets)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def synthetic_batches(n: int = 16, size: int = 32, seed: int = 0):
    """Bright squares on noise, a class per size."""
    g = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(n):
        img = torch.rand(3, size, size, generator=g) * 0.2
        label = int(torch.randint(NUM_CLASSES, (1,), generator=g))
        side = 6 + 4 * label
        x, y = (int(v) for v in torch.randint(0, size - side, (2,), generator=g))
        img[:, y:y + side, x:x + side] = 1.0
        data.append((img, {"boxes": torch.tensor([[x, y, x + side, y + side]], dtype=torch.float32),
                           "labels": torch.tensor([label])}))
    return data


def loader(n: int = 16, batch_size: int = 4):
    def collate(items):
        return torch.stack([i for i, _ in items]), [t for _, t in items]

    return torch.utils.data.DataLoader(synthetic_batches(n), batch_size=batch_size, collate_fn=collate)


def main(steps: int = 6, root: str = "own-detector-runs") -> dict:
    common = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, default_root_dir=root)
    module = LitPointDetector()
    pl.Trainer(max_steps=steps, **common).fit(module, loader())  # float
    callback = DetQCallback(recipe="w4a8-crqat", family=PointDetectorFamily(), calibration_batches=2)
    pl.Trainer(max_steps=steps, callbacks=[callback], **common).fit(module, loader())  # CR-QAT from the float weights
    return dict(callback.session.last_terms)


if __name__ == "__main__":
    print(main())
