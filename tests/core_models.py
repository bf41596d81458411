"""Small float models shared by the core tests (importable, so pickling works)."""

from torch import nn


class TinyDetector(nn.Module):
    """A YOLO-shaped toy: conv/BN/SiLU backbone, an upsampling neck and a two-branch 1x1 head."""

    def __init__(self, num_classes: int = 3, width: int = 16) -> None:
        super().__init__()
        w = width
        self.backbone = nn.Sequential(
            nn.Conv2d(3, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w), nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, 2, 1, bias=False), nn.BatchNorm2d(2 * w), nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, 1, 1, groups=2, bias=False), nn.BatchNorm2d(2 * w), nn.SiLU(),
        )
        self.neck = nn.Sequential(nn.ConvTranspose2d(2 * w, w, 2, 2), nn.SiLU(), nn.Conv2d(w, w, 3, 1, 1), nn.SiLU())
        self.cls_head = nn.Conv2d(w, num_classes, 1)
        self.box_head = nn.Conv2d(w, 4, 1)
        self.pool_fc = nn.Linear(w, num_classes)

    def forward(self, x):
        f = self.neck(self.backbone(x))
        return self.cls_head(f), self.box_head(f), self.pool_fc(f.mean((2, 3)))


class AttentionModel(nn.Module):
    """A DETR-flavoured block: nn.MultiheadAttention reads out_proj.weight directly."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.inp = nn.Linear(8, d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.out = nn.Linear(d, 4)

    def forward(self, x):
        h = self.inp(x)
        h, _ = self.attn(h, h, h)
        return self.out(h)
