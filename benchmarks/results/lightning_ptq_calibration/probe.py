"""PTQ of the Lightning FCOS from a saved float checkpoint, printing mAP and each block's reconstruction loss.

The ``ptq-lightning`` accuracy unit calibrates on 4 batches of ``bench_lightning.py``'s batch size (4), i.e. 16
training images; this probe runs the same recipes from the same float checkpoint with another batch size, to see
how much the PTQ rows depend on the calibration set's size::

    python benchmarks/results/lightning_ptq_calibration/probe.py \
        --run benchmarks/results/suite/accuracy/raw/ptq-lightning/seed0 --batch-size 8 w4a4-ptq+adaround w4a4-ptq+qdrop

(``--run``: a unit's output folder, holding ``data/`` and ``fcos_float.ckpt``; one thread.)
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "examples"))
import lightning.pytorch as pl  # noqa: E402
from lightning_fcos import FCOSModule, SynthCocoData, recipe_spec  # noqa: E402

from detq_hooks.lightning import DetQCallback  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--run", required=True, help="the unit's output folder (data/ and fcos_float.ckpt)")
p.add_argument("--batch-size", type=int, default=4)
p.add_argument("--seed", type=int, default=0, help="the unit's seed (its data)")
p.add_argument("recipes", nargs="+")
args = p.parse_args()
torch.set_num_threads(1)
data = SynthCocoData(f"{args.run}/data", 128, 32, 128, args.batch_size, args.seed)
data.prepare_data()
state = torch.load(f"{args.run}/fcos_float.ckpt", map_location="cpu", weights_only=False)["state_dict"]
print(f"float checkpoint {args.run}/fcos_float.ckpt; calibration: 4 batches of {args.batch_size} training images")
for name in args.recipes:
    pl.seed_everything(args.seed, workers=True, verbose=False)
    module = FCOSModule(num_classes=data.num_classes, lr=0.002, min_size=128, max_size=128, backbone="resnet18",
                        fpn_channels=64, max_epochs=4)
    module.load_state_dict(state)
    cb = DetQCallback(recipe=recipe_spec(name), target="model", calibration_batches=4)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=4, callbacks=[cb], logger=False,
                         enable_checkpointing=False, num_sanity_val_steps=0, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(module, datamodule=data)
    res = trainer.test(module, datamodule=data, verbose=False)[0]
    print(f"== {name}: mAP50-95 {res['test/mAP']:.4f}  (batch size {args.batch_size})", flush=True)
    for b in cb.last_calibration.reconstruction.blocks if cb.last_calibration.reconstruction else []:
        if b.skipped is None:
            print(f"  {b.name:<28} loss before {b.loss_before:10.4f} after {b.loss_after:10.4f} "
                  f"flipped {b.flipped_fraction:.3f}{' reverted' if b.reverted else ''}", flush=True)
