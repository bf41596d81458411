"""Train (once) the float reference detector that the quantization benchmarks start from.

    python benchmarks/train_float_reference.py [--model yolo11n.yaml] [--epochs 60 | --minutes 15]
        [--num-train 512] [--num-val 96] [--imgsz 160] [--data-root ~/.cache/detq-hooks/synth]

The checkpoint lands in ``~/.cache/detq-hooks/float_refs/<key>/best.pt`` (key: data parameters, model,
budget, versions); a second run with the same arguments prints the cached figures without training. The
defaults are the reference of the README's Ultralytics benchmarks: YOLO11n, 60 epochs on 512 images at
160 px, about 14 minutes on 2 CPU cores, mAP50-95 about 0.5.
Benchmarks get the same checkpoint in code with ``detq_hooks.tools.zoo.cached_float_checkpoint``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")

from detq_hooks.tools.data import make_synthetic_dataset  # noqa: E402
from detq_hooks.tools.zoo import cached_float_checkpoint, synthetic_data_dir  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="yolo11n.yaml", help="Ultralytics model yaml (random init) or .pt")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--minutes", type=float, default=None, help="wall-clock budget instead of --epochs")
    parser.add_argument("--imgsz", type=int, default=160)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--num-train", type=int, default=512)
    parser.add_argument("--num-val", type=int, default=96)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--data-root", type=Path, default=None,
                        help="parent folder of the data set (default: next to the float references)")
    parser.add_argument("--force", action="store_true", help="retrain even if a cached checkpoint exists")
    parser.add_argument("--quiet", action="store_true", help="hide Ultralytics' training output")
    args = parser.parse_args(argv)

    data_root = synthetic_data_dir(args.num_train, args.num_val, args.imgsz, args.data_seed)
    if args.data_root is not None:
        data_root = args.data_root / data_root.name
    dataset = make_synthetic_dataset(data_root, num_train=args.num_train, num_val=args.num_val, imgsz=args.imgsz,
                                     seed=args.data_seed)
    ref = cached_float_checkpoint(dataset, args.model, epochs=args.epochs, minutes=args.minutes, imgsz=args.imgsz,
                                  batch=args.batch, seed=args.seed, force=args.force, verbose=not args.quiet)
    m = ref.metrics
    print(f"{'cached' if ref.cached else 'trained'} float reference {args.model}: {ref.checkpoint}")
    print(f"  COCO (pycocotools) on {dataset.num_val} val images: mAP50-95 {m['map50_95']:.4f}  "
          f"mAP50 {m['map50']:.4f}  ({m['epochs_run']} epochs, {m['train_seconds'] / 60:.1f} min)")
    for name, ap in m["per_category"].items():
        print(f"    {name:<15} AP50-95 {ap:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
