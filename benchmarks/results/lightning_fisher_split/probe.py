"""Probe of the regulariser on the Lightning FCOS example: one QAT epoch of a recipe from seed 0's saved float
checkpoint, printing the task loss and the regulariser's last trace after each step. The checkpoint and data are
the suite's lightning unit's outputs (not committed: `python benchmarks/run.py accuracy --sources lightning:0` first).

    python benchmarks/results/lightning_fisher_split/probe.py benchmarks/results/lightning_fisher_split/reg_crqat.yaml
    python benchmarks/results/lightning_fisher_split/probe.py benchmarks/results/lightning_fisher_split/reg_capped_crqat.yaml
"""
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[3]
SEED0 = REPO / "benchmarks/results/suite/accuracy/raw/lightning/seed0"
sys.path.insert(0, str(REPO / "examples"))
import lightning.pytorch as pl
import lightning_fcos as L
from detq_hooks.lightning import DetQCallback

class Watch(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        cb = next(c for c in trainer.callbacks if isinstance(c, DetQCallback))
        terms = cb.session.terms
        # the outputs from before the cap (probe_reg_*.txt) printed the trace alone; since then the tuple
        # (trace, critical loss, cap factor, max_share) of the last regulariser step
        tr = [(t.last_trace, t.last_loss, round(t.last_scale, 5), t.max_share) for t in terms if hasattr(t, "last_trace")]
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        w = sum(float(p.detach().abs().sum()) for p in pl_module.parameters())
        print(f"step {trainer.global_step:3d} loss {float(loss):9.4f} trace {tr} |w|1 {w:.4g}", flush=True)

import argparse
ns = argparse.Namespace(root=str(SEED0 / "data"), num_train=128, num_val=32,
    imgsz=128, batch_size=4, backbone="resnet18", fpn_channels=64, lr=0.01, qat_lr=0.002, calibration_batches=4,
    limit_train_batches=1.0, seed=0, progress=False)
data = L.SynthCocoData(ns.root, ns.num_train, ns.num_val, ns.imgsz, ns.batch_size, ns.seed)
data.prepare_data()
state = torch.load(SEED0 / "fcos_float.ckpt", map_location="cpu", weights_only=False)["state_dict"]
rec = sys.argv[1]
r = L.run(rec, data, 1, ns, init_state=state, out_dir=Path(sys.argv[2]) if len(sys.argv) > 2 else Path("."), extra_callbacks=[Watch()])
print("mAP", r["mAP"])
