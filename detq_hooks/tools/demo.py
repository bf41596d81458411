"""``detq demo``: float YOLO -> PTQ W8A8 and QAT W4A8 on synthetic data, COCO mAP, ONNX QDQ latency.

Steps (each with a progress bar or Ultralytics' own epoch bars):

1. generate the synthetic data set (:func:`detq_hooks.tools.data.make_synthetic_dataset`);
2. train YOLO11n (from its yaml, random init) in float for ``epochs`` epochs;
3. PTQ W8A8 from the float ``best.pt`` (``DetQTrainer``, recipe ``w8a8-ptq``: calibration only);
4. QAT W4A8 from the float ``best.pt`` for ``qat_epochs`` epochs (``DetQTrainer``, recipe ``w4a8``);
5. COCO mAP of all three with one pre/postprocessing (:mod:`detq_hooks.ultralytics.evaluate`);
6. each model exported as deployed (:mod:`detq_hooks.ultralytics.deploy`: float ONNX/IR; quantized ones as
   integer ONNX for onnxruntime and int8 OpenVINO IR), its file size, latency in onnxruntime and OpenVINO
   (default and f32 precision, timed side by side) and the exported model's mAP;
7. one table, also written to ``<out>/results.json``;
8. pictures: the per-layer quantization report of each quantized model (``<out>/reports/<name>.json``, ``.md``
   table, ``_sqnr.png``; :func:`detq_hooks.quantization_report` on a few validation images) and
   ``<out>/map_vs_latency.png`` (mAP50-95 against deployed latency, one point per model and runtime).
"""

from __future__ import annotations

import json
import math
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
    deployed_mb: float = float("nan")  # the OpenVINO IR (.xml + .bin) a user ships
    onnx_mb: float = float("nan")  # the ONNX file run in onnxruntime
    ort_ms: float = float("nan")
    ov_ms: float = float("nan")  # OpenVINO, default precision (bf16 float parts on CPUs with AVX512-BF16)
    ov_f32_ms: float = float("nan")
    ort_map50_95: float = float("nan")
    ov_map50_95: float = float("nan")
    extra: dict = field(default_factory=dict)


# the per-layer report runs the PyTorch models on this many validation images: enough for activation SQNR,
# negligible next to the demo's training and timing
REPORT_IMAGES = 4


def file_stem(model_name: str) -> str:
    """``"QAT W4A8"`` -> ``"qat_w4a8"``: the model's name in file and folder names."""
    return model_name.lower().replace(" ", "_")


def run_demo(cfg: DemoConfig, console=None) -> list[Row]:
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "false")
    from rich.console import Console
    from rich.progress import track

    from ultralytics import YOLO
    from ultralytics.nn.tasks import load_checkpoint

    from .data import make_synthetic_dataset
    from ..ultralytics import DetQTrainer
    from ..deploy import file_bytes
    from ..ultralytics.deploy import deployed_latency, export_deployed
    from ..ultralytics.evaluate import evaluate, load_images
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
        rows.append(Row(name, res.map50_95, res.map50, Path(path).stat().st_size / 1e6, extra={"torch_ms": ms}))

    console.rule("[bold]6/6 deployed models: onnxruntime and OpenVINO")
    calib = [a for _, a, _ in load_images(ds.train_images, cfg.imgsz)][:32]
    files = {}
    for row in track(rows, description="exporting + evaluating", console=console):
        f = files[row.name] = export_deployed(models[row.name], out / "deploy" / file_stem(row.name), cfg.imgsz, calib)
        row.onnx_mb, row.deployed_mb = file_bytes(f["onnxruntime"]) / 1e6, file_bytes(f["openvino"]) / 1e6
        for rt in ("onnxruntime", "openvino"):
            ores, _ = evaluate(str(f[rt]), ds.val_images, ds.coco_val_json, cfg.imgsz, head_type="Detect",
                               images=images, batch=1)
            setattr(row, "ort_map50_95" if rt == "onnxruntime" else "ov_map50_95", ores.map50_95)
    lat = deployed_latency(files, cfg.imgsz, cfg.threads, reps=cfg.timing_runs)
    for row in rows:
        row.ort_ms, row.ov_ms, row.ov_f32_ms = (lat[row.name][k] for k in ("onnxruntime", "openvino", "openvino_f32"))

    print_table(rows, console, title=f"detq demo: {cfg.model} on synthetic data ({cfg.imgsz}px, {time.time() - t0:.0f}s)")
    (out / "results.json").write_text(json.dumps({"config": asdict(cfg), "rows": [asdict(r) for r in rows]}, indent=2))
    pictures = save_quantization_reports(models, images[:REPORT_IMAGES], out / "reports")
    pictures.append(save_map_vs_latency_plot(rows, out / "map_vs_latency.png", title=f"{cfg.model}, {cfg.imgsz}px"))
    console.print(f"results: {out / 'results.json'}; checkpoints under {out / 'runs'}; deployed files under {out / 'deploy'}")
    console.print("pictures:\n" + "\n".join(f"  {p}" for p in pictures), soft_wrap=True)  # paths unbroken, to copy
    return rows


def save_quantization_reports(models: dict, images: list, out_dir: Path) -> list[Path]:
    """The per-layer quantization report of each quantized model on ``images`` (``load_images`` tuples):
    ``<name>.json``, ``<name>.md`` (table) and ``<name>_sqnr.png`` under ``out_dir``; returns the paths."""
    import numpy as np
    import torch

    from .. import is_quantized
    from ..report import quantization_report

    batch = torch.from_numpy(np.stack([im for _, im, _ in images]))
    paths = []
    for name, model in models.items():
        if not is_quantized(model):
            continue
        report = quantization_report(model, [batch])
        stem = file_stem(name)
        paths += [report.save_json(out_dir / f"{stem}.json"), report.save_markdown(out_dir / f"{stem}.md"),
                  report.save_plot(out_dir / f"{stem}_sqnr.png")]
    return paths


# (legend label, latency field, mAP field, marker). The demo measures OpenVINO's mAP at its default precision only
# (f32 on CPUs without bf16), so the f32 point shows that mAP at the f32 latency.
LATENCY_POINTS = (("onnxruntime", "ort_ms", "ort_map50_95", "o"),
                  ("OpenVINO", "ov_ms", "ov_map50_95", "s"),
                  ("OpenVINO f32", "ov_f32_ms", "ov_map50_95", "^"))


def _exported_map_or_pytorch(row: Row, map_field: str) -> float:
    exported = getattr(row, map_field)
    return exported if math.isfinite(exported) else row.map50_95


def save_map_vs_latency_plot(rows: list[Row], path: Path, title: str = "") -> Path:
    """mAP50-95 against deployed latency: one point per model and runtime, a colour per model (named once, at
    its fastest point), a marker per runtime; the exported model's mAP where it was measured, else the PyTorch one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(7.0, 4.5))
    colours = plt.get_cmap("tab10").colors
    for i, row in enumerate(rows):
        colour = colours[i % len(colours)]
        points = [(getattr(row, ms_field), _exported_map_or_pytorch(row, map_field), marker)
                  for _, ms_field, map_field, marker in LATENCY_POINTS if math.isfinite(getattr(row, ms_field))]
        for ms, m, marker in points:
            ax.scatter(ms, m, marker=marker, color=colour, s=45)
        if points:
            ms, m, _ = min(points)
            ax.annotate(row.name, (ms, m), textcoords="offset points", xytext=(4, 6), fontsize=8, color=colour)
    ax.legend(handles=[Line2D([], [], marker=marker, ls="none", color="0.4", label=label)
                       for label, _, _, marker in LATENCY_POINTS], fontsize=8)
    ax.margins(x=0.1, y=0.1)  # room for the names
    ax.set_xlabel("deployed latency [ms] (batch 1, median)")
    ax.set_ylabel("mAP50-95 (exported model)")
    ax.set_title(f"detq demo: mAP against deployed latency{' — ' + title if title else ''}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_table(rows: list[Row], console, title: str = "") -> None:
    from rich.table import Table

    table = Table(title=title, caption="latency: batch 1, median, onnxruntime and OpenVINO timed side by side; "
                                         "OpenVINO default = its default precision (bf16 float parts on AVX512-BF16 CPUs)")
    cols = ("model", "mAP50-95 PyTorch", "ckpt MB", "deployed MB (IR)", "onnxruntime ms", "OpenVINO ms",
            "OpenVINO f32 ms", "mAP50-95 onnxruntime", "mAP50-95 OpenVINO")
    for col in cols:
        table.add_column(col, justify="right" if col != "model" else "left")
    for r in rows:
        table.add_row(r.name, f"{r.map50_95:.4f}", f"{r.checkpoint_mb:.2f}", f"{r.deployed_mb:.2f}", f"{r.ort_ms:.2f}",
                      f"{r.ov_ms:.2f}", f"{r.ov_f32_ms:.2f}", f"{r.ort_map50_95:.4f}", f"{r.ov_map50_95:.4f}")
    console.print(table)


__all__ = ["DemoConfig", "Row", "run_demo", "print_table", "save_quantization_reports", "save_map_vs_latency_plot"]
