"""``detq demo``: float YOLO -> PTQ W8A8 and QAT W4A8 on synthetic data, COCO mAP, ONNX QDQ latency.

Steps (each with a progress bar or Ultralytics' own epoch bars):

1. generate the synthetic data set (:func:`detq_hooks.tools.data.make_synthetic_dataset`);
2. train YOLO11n (from its yaml, random init) in float for ``epochs`` epochs;
3. PTQ W8A8 from the float ``best.pt`` (``DetQTrainer``, recipe ``w8a8-ptq``: calibration only);
4. QAT W4A8 from the float ``best.pt`` for ``qat_epochs`` epochs (``DetQTrainer``, recipe ``w4a8``);
5. COCO mAP of all three with one pre/postprocessing (:mod:`detq_hooks.ultralytics.evaluate`);
6. ONNX export (float, and QDQ for the quantized ones), onnxruntime latency and the QDQ model's mAP;
7. one table, also written to ``<out>/results.json``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional


@dataclass
class DemoConfig:
    out: str = "detq-demo"
    epochs: int = 25
    qat_epochs: int = 6
    imgsz: int = 128
    num_train: int = 256
    num_val: int = 48
    batch: int = 16
    model: str = "yolo11n.yaml"
    seed: int = 0
    threads: Optional[int] = None
    timing_runs: int = 20


@dataclass
class Row:
    name: str
    map50_95: float
    map50: float
    checkpoint_mb: float
    packed_mb: float
    onnx_ms: float = float("nan")
    onnx_map50_95: float = float("nan")
    extra: dict = field(default_factory=dict)


def _packed_mb(model) -> float:
    """Weight storage at the quantized bit widths (float layers at 32 bits), in MB."""
    from ..modules import is_quantized_module

    bits = 0
    seen = set()
    for m in model.modules():
        if is_quantized_module(m):
            bits += m.weight.numel() * m.weight_quantizer.bits
            seen.add(id(m.weight))
    qparams = {id(p) for n, p in model.named_parameters() if "quantizer" in n}
    for p in model.parameters():
        if id(p) not in seen and id(p) not in qparams:
            bits += p.numel() * 32
    for name, b in model.named_buffers():
        if "quantizer" not in name and b.is_floating_point():
            bits += b.numel() * 32
    return bits / 8 / 1e6


def _time_onnx(path, imgsz: int, runs: int, threads: Optional[int]) -> float:
    import numpy as np

    from ..export import onnx_session

    sess = onnx_session(path, threads=threads)
    name = sess.get_inputs()[0].name
    x = np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)
    for _ in range(3):
        sess.run(None, {name: x})
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, {name: x})
        times.append(time.perf_counter() - t)
    return 1000.0 * float(np.median(times))


def run_demo(cfg: DemoConfig, console=None) -> list[Row]:
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "false")
    from rich.console import Console
    from rich.progress import track

    from ultralytics import YOLO
    from ultralytics.nn.tasks import load_checkpoint

    from .data import make_synthetic_dataset
    from ..ultralytics import DetQTrainer
    from ..ultralytics.evaluate import evaluate, export_model_onnx, load_images
    from .zoo import FROM_SCRATCH_HYPERPARAMETERS

    console = console or Console()
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    common = dict(imgsz=cfg.imgsz, batch=cfg.batch, amp=False, plots=False, workers=0, device="cpu",
                  exist_ok=True, seed=cfg.seed, deterministic=True, project=str(out / "runs"), verbose=False)

    console.rule("[bold]1/6 synthetic data")
    ds = make_synthetic_dataset(out / "data", num_train=cfg.num_train, num_val=cfg.num_val, imgsz=cfg.imgsz, seed=cfg.seed)
    console.print(f"{cfg.num_train} train / {cfg.num_val} val images at {cfg.imgsz}px in {ds.root if hasattr(ds, 'root') else out / 'data'}")

    console.rule(f"[bold]2/6 float {cfg.model} ({cfg.epochs} epochs)")
    float_model = YOLO(cfg.model)
    # the from-scratch settings of the float references (detq_hooks.tools.zoo), with the mosaic-free tail scaled to
    # the budget: AdamW, one optimizer step per batch, mild rescaling
    scratch = {**FROM_SCRATCH_HYPERPARAMETERS, "nbs": cfg.batch,
               "close_mosaic": min(FROM_SCRATCH_HYPERPARAMETERS["close_mosaic"], max(1, cfg.epochs // 3))}
    float_model.train(data=str(ds.yolo_yaml), epochs=cfg.epochs, name="float", **scratch, **common)
    float_pt = float_model.trainer.best

    console.rule("[bold]3/6 PTQ W8A8 (calibration only)")
    ptq = YOLO(str(float_pt))
    ptq.train(data=str(ds.yolo_yaml), trainer=DetQTrainer, detq="w8a8-ptq", epochs=1, name="ptq_w8a8", mosaic=0.0, **common)
    ptq_pt = ptq.trainer.best

    console.rule(f"[bold]4/6 QAT W4A8 ({cfg.qat_epochs} epochs from the float model)")
    qat = YOLO(str(float_pt))
    qat.train(data=str(ds.yolo_yaml), trainer=DetQTrainer, detq="w4a8", epochs=cfg.qat_epochs, name="qat_w4a8",
              lr0=0.001, optimizer="AdamW", nbs=cfg.batch, warmup_epochs=0, close_mosaic=cfg.qat_epochs, **common)
    qat_pt = qat.trainer.best

    console.rule("[bold]5/6 COCO evaluation")
    images = load_images(ds.val_images, cfg.imgsz)
    rows: list[Row] = []
    models = {}
    for name, path in track([("float", float_pt), ("PTQ W8A8", ptq_pt), ("QAT W4A8", qat_pt)], description="evaluating", console=console):
        model, _ = load_checkpoint(str(path))
        model.eval()
        models[name] = model
        res, ms = evaluate(model, ds.val_images, ds.coco_val_json, cfg.imgsz, images=images)
        rows.append(Row(name, res.map50_95, res.map50, Path(path).stat().st_size / 1e6, _packed_mb(model), extra={"torch_ms": ms}))

    console.rule("[bold]6/6 ONNX export and onnxruntime latency")
    for row in track(rows, description="exporting + timing", console=console):
        onnx_path = out / "onnx" / (row.name.lower().replace(" ", "_") + ".onnx")
        res = export_model_onnx(models[row.name], onnx_path, cfg.imgsz)
        row.extra["qdq_pairs"] = res.quantize_linear
        row.onnx_ms = _time_onnx(onnx_path, cfg.imgsz, cfg.timing_runs, cfg.threads)
        ores, _ = evaluate(str(onnx_path), ds.val_images, ds.coco_val_json, cfg.imgsz, head_type="Detect", images=images)
        row.onnx_map50_95 = ores.map50_95

    print_table(rows, console, title=f"detq demo: {cfg.model} on synthetic data ({cfg.imgsz}px, {time.time() - t0:.0f}s)")
    (out / "results.json").write_text(json.dumps({"config": asdict(cfg), "rows": [asdict(r) for r in rows]}, indent=2))
    console.print(f"results: {out / 'results.json'}; checkpoints under {out / 'runs'}; ONNX under {out / 'onnx'}")
    return rows


def print_table(rows: list[Row], console, title: str = "") -> None:
    from rich.table import Table

    table = Table(title=title)
    for col in ("model", "mAP50-95", "mAP50", "ckpt MB", "packed weights MB", "ONNX ms/img", "ONNX mAP50-95"):
        table.add_column(col, justify="right" if col != "model" else "left")
    for r in rows:
        table.add_row(r.name, f"{r.map50_95:.4f}", f"{r.map50:.4f}", f"{r.checkpoint_mb:.2f}", f"{r.packed_mb:.2f}",
                      f"{r.onnx_ms:.2f}", f"{r.onnx_map50_95:.4f}")
    console.print(table)


__all__ = ["DemoConfig", "Row", "run_demo", "print_table"]
