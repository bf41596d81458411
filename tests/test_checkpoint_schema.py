"""One checkpoint state in every trainer: a checkpoint saved by Lightning, MMEngine and Ultralytics carries a
`detq` entry with the same schema (same keys, same per-layer fields, version 2)."""

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")

from detq_hooks.checkpoint import STATE_KEYS  # noqa: E402

HERE = Path(__file__).resolve().parent
LAYER_KEYS = {"type", "role", "weight_bits", "input_bits", "weight_enabled", "input_enabled"}


def lightning_entry(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    sys.path.insert(0, str(HERE))
    from test_lightning import TinyDet, loader

    from detq_hooks.lightning import DetQCallback

    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
                         callbacks=[DetQCallback(recipe="w4a8", calibration_batches=1)], enable_checkpointing=False)
    trainer.fit(TinyDet(), loader())
    trainer.save_checkpoint(tmp_path / "pl.ckpt")
    return torch.load(tmp_path / "pl.ckpt", map_location="cpu", weights_only=False)["detq"]


def mmengine_entry(tmp_path):
    pytest.importorskip("mmengine")
    sys.path.insert(0, str(HERE))
    from mmengine.runner import Runner
    from mmengine_toy import toy_cfg

    runner = Runner.from_cfg(toy_cfg(tmp_path, max_iters=3))
    runner.train()
    return torch.load(tmp_path / "iter_3.pth", map_location="cpu")["meta"]["detq"]


def ultralytics_entry(tmp_path):
    pytest.importorskip("ultralytics")
    from ultralytics import YOLO

    from detq_hooks.tools.data import make_synthetic_dataset
    from detq_hooks.ultralytics import DetQTrainer

    ds = make_synthetic_dataset(tmp_path / "data", num_train=8, num_val=4, imgsz=64, seed=0)
    cfg = tmp_path / "yolo11-tiny.yaml"
    shutil.copy(HERE / "fixtures" / "legacy_0.1.0" / "yolo11-tiny.yaml", cfg)
    model = YOLO(str(cfg))
    model.train(data=str(ds.yolo_yaml), trainer=DetQTrainer, detq="w4a8", epochs=1, imgsz=64, batch=4, workers=0,
                amp=False, plots=False, device="cpu", project=str(tmp_path / "runs"), name="u", exist_ok=True,
                verbose=False, val=False)
    return torch.load(model.trainer.last, map_location="cpu", weights_only=False)["detq"]


def test_the_three_trainers_write_the_same_detq_schema(tmp_path):
    entries = {name: fn(tmp_path / name) for name, fn in
               (("lightning", lightning_entry), ("mmengine", mmengine_entry), ("ultralytics", ultralytics_entry))}
    for name, entry in entries.items():
        assert set(entry) == set(STATE_KEYS), (name, sorted(entry))
        assert entry["format"] == "detq-hooks" and entry["version"] == 2 and entry["recipe"]["name"] == "w4a8", name
        assert entry["layers"] and all(set(v) == LAYER_KEYS for v in entry["layers"].values()), name
        bits = {v["weight_bits"] for v in entry["layers"].values()}
        assert bits == {4, 8}, (name, bits)  # body at 4, first and prediction layers at 8
        roles = {v["role"] for v in entry["layers"].values()}
        assert {"first", "prediction", "body"} <= roles, (name, roles)
