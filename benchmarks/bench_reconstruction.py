"""PTQ of a trained float YOLO: calibration only vs block reconstruction (AdaRound + LSQ + QDrop), COCO mAP on the
synthetic val split.

    YOLO_OFFLINE=1 python benchmarks/bench_reconstruction.py --checkpoint ~/.cache/detq-hooks/float_refs/<key>/best.pt \
        --data ~/.cache/detq-hooks/synth/n256_v64_s160_seed0 [--recipes w4a8-ptq --iterations 300 --images 64]

The float checkpoint is one of :func:`detq_hooks.tools.zoo.cached_float_checkpoint` (default: the first cached one),
the data its synthetic data set (default: the first cached one with the checkpoint's image size). Calibration and
reconstruction use the first ``--images`` training images; mAP50-95 (pycocotools) on the val split, evaluated by
:func:`detq_hooks.ultralytics.evaluate.evaluate` (the raw network, Ultralytics' NMS). Prints one line per recipe
and writes ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def first(pattern: str, root: Path) -> Path:
    found = sorted(root.glob(pattern))
    if not found:
        raise SystemExit(f"nothing matches {root}/{pattern}; pass the path explicitly")
    return found[0]


def main() -> None:
    cache = Path(os.environ.get("DETQ_CACHE_DIR", Path.home() / ".cache" / "detq-hooks"))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--imgsz", type=int, default=160)
    ap.add_argument("--recipes", default="w4a8-ptq")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--qdrop", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/reconstruction.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from ultralytics.nn.tasks import load_checkpoint

    from detq_hooks.detectors.ultralytics import UltralyticsFamily
    from detq_hooks.reconstruction import ReconstructionConfig, reconstruct
    from detq_hooks.session import QuantSession
    from detq_hooks.ultralytics.evaluate import evaluate, load_images
    from detq_hooks.ultralytics.trainer import calibration_forward

    checkpoint = args.checkpoint or first("float_refs/*/best.pt", cache)
    data = args.data or first(f"synth/*_s{args.imgsz}_*", cache)
    float_model, _ = load_checkpoint(str(checkpoint))  # unfused: BatchNorm stays, as in QAT/PTQ
    float_model = float_model.float().eval()
    train = load_images(data / "images" / "train", args.imgsz)[: args.images]
    batches = [torch.from_numpy(np.stack([t[1] for t in train[i:i + args.batch]]))
               for i in range(0, len(train), args.batch)]
    val_images = load_images(data / "images" / "val", args.imgsz)
    gt = data / "annotations" / "instances_val.json"

    def map_of(model) -> float:
        return evaluate(model, None, gt, args.imgsz, images=val_images)[0].map50_95

    rows = {"checkpoint": str(checkpoint), "data": str(data), "images": len(train), "args": vars(args) | {
        "checkpoint": str(checkpoint), "data": str(data), "out": str(args.out)}}
    rows["float"] = map_of(float_model)
    print(f"float: mAP50-95 {rows['float']:.4f}")
    for recipe in args.recipes.split(","):
        model = copy.deepcopy(float_model)
        session = QuantSession(recipe)
        session.convert(model, training=False)
        t = time.perf_counter()
        session.run_ptq(model, batches, calibration_forward)
        calibration_s = time.perf_counter() - t
        calibrated = map_of(model)
        config = ReconstructionConfig(iterations=args.iterations, batch_size=args.batch, lr=args.lr,
                                      qdrop_prob=args.qdrop)
        result = reconstruct(model, float_model, batches, calibration_forward,
                             blocks=UltralyticsFamily().reconstruction_blocks(model), config=config, progress=True)
        reconstructed = map_of(model)
        rows[recipe] = {
            "calibrated_map50_95": calibrated, "reconstructed_map50_95": reconstructed,
            "calibration_seconds": calibration_s, "reconstruction_seconds": result.seconds,
            "cached_bytes_per_image": result.cached_bytes_per_image,
            "blocks": {b.name: {"before": b.loss_before, "after": b.loss_after, "reverted": b.reverted,
                                "flipped": b.flipped_fraction, "seconds": b.seconds}
                       for b in result.blocks if b.skipped is None},
        }
        print(f"{recipe}: mAP50-95 calibration only {calibrated:.4f} -> reconstructed {reconstructed:.4f} "
              f"(float {rows['float']:.4f}); reconstruction {result.seconds:.0f} s for {len(train)} images, "
              f"{args.iterations} iterations/block, cache {result.cached_bytes_per_image / 1024:.0f} KiB/image")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
