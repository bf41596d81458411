"""``detq`` command line.

    detq demo [--epochs 30 --qat-epochs 8 --imgsz 128 --num-train 192 --num-val 48 --out detq-demo]
    detq train ultralytics model=yolo11n.pt data=data.yaml detq=w4a8 epochs=50 imgsz=640
    detq ptq model=best.pt data=data.yaml detq=w4a8-taskq imgsz=640 batch=16
    detq presets
    detq bench accuracy|cost|deploy|peers|report [--quick --out DIR ...]

``detq train ultralytics`` takes Ultralytics-style ``key=value`` arguments (values parsed as YAML, as the
``yolo`` CLI does) plus ``detq=`` (preset name or recipe YAML path) and runs
``YOLO(model).train(trainer=DetQTrainer, ...)`` (``RTDETR`` for RT-DETR models). ``detq ptq`` does the same with a
post-training recipe (default ``w8a8-ptq``): calibration and, for ``*-taskq`` / ``ptq.method`` recipes, block
reconstruction on the training images of ``data``; it validates and writes ``best.pt`` without a training epoch.
``detq bench`` runs ``benchmarks/run.py`` of the checkout this package is installed from (``--help`` is its own).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence


def _parse_kv(items: Sequence[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"detq train: expected key=value arguments, got {item!r}")
        k, v = item.split("=", 1)
        k = k.lstrip("-").strip()
        try:
            out[k] = yaml.safe_load(v) if v != "" else None
        except yaml.YAMLError:
            out[k] = v
        if k in ("model", "data", "detq", "project", "name") and out[k] is not None and not isinstance(out[k], (dict, list)):
            out[k] = str(v)  # never turn a file name into a number or bool
    return out


def train_ultralytics(kv: dict):
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics import RTDETR, YOLO

    from .ultralytics import DetQTrainer

    kv = dict(kv)
    model = kv.pop("model", None)
    if not model:
        raise SystemExit("detq train ultralytics: `model=` is required (a .pt or model .yaml)")
    if "detq" not in kv and not kv.get("resume"):
        raise SystemExit("detq train ultralytics: `detq=` is required (preset name, e.g. w4a8, or a recipe YAML path)")
    cls = RTDETR if "rtdetr" in str(model).lower() else YOLO
    return cls(model).train(trainer=DetQTrainer, **kv)


def bench_script() -> Path:
    """``benchmarks/run.py`` beside the package: the benchmarks ship with the repository, not in the wheel."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"
    if not script.is_file():
        raise SystemExit(f"detq bench: {script} does not exist: the benchmarks live in the detq-hooks repository, "
                         "not in the installed package; install it from a checkout (pip install -e .) or run "
                         "`python benchmarks/run.py` there")
    return script


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # every argument, --help included, is benchmarks/run.py's
        return subprocess.call([sys.executable, str(bench_script()), *argv[1:]])
    parser = argparse.ArgumentParser(prog="detq", description="detq-hooks: quantize detectors inside their trainers")
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="float -> PTQ W8A8 / QAT W4A8 on synthetic data, COCO mAP, ONNX latency")
    from .tools.demo import DemoConfig

    defaults = DemoConfig()
    d.add_argument("--out", default=defaults.out, help="output folder (data, runs, onnx, results.json)")
    d.add_argument("--epochs", type=int, default=defaults.epochs, help="float training epochs")
    d.add_argument("--qat-epochs", type=int, default=defaults.qat_epochs, help="QAT W4A8 epochs")
    d.add_argument("--imgsz", type=int, default=defaults.imgsz)
    d.add_argument("--num-train", type=int, default=defaults.num_train)
    d.add_argument("--num-val", type=int, default=defaults.num_val)
    d.add_argument("--batch", type=int, default=defaults.batch)
    d.add_argument("--model", default=defaults.model, help="Ultralytics model yaml (random init)")
    d.add_argument("--seed", type=int, default=defaults.seed)
    d.add_argument("--threads", type=int, default=None, help="onnxruntime and OpenVINO threads (default 2)")

    t = sub.add_parser("train", help="quantized training in a host trainer")
    t.add_argument("host", choices=["ultralytics"])
    t.add_argument("args", nargs="*", help="key=value arguments (Ultralytics style) incl. detq=<preset|recipe.yaml>")

    q = sub.add_parser("ptq", help="post-training quantization of an Ultralytics model (calibration, reconstruction)")
    q.add_argument("args", nargs="*", help="key=value arguments (Ultralytics style) incl. detq=<PTQ preset|recipe.yaml>")

    sub.add_parser("presets", help="list recipe presets")
    sub.add_parser("bench", help="benchmark questions: accuracy, cost, deploy, peers, report (benchmarks/run.py)")

    ns = parser.parse_args(argv)
    if ns.command == "demo":
        from .tools.demo import run_demo

        cfg = DemoConfig(out=ns.out, epochs=ns.epochs, qat_epochs=ns.qat_epochs, imgsz=ns.imgsz, num_train=ns.num_train,
                         num_val=ns.num_val, batch=ns.batch, model=ns.model, seed=ns.seed, threads=ns.threads)
        run_demo(cfg)
        return 0
    if ns.command == "presets":
        from .recipe import PRESETS

        for name, p in PRESETS.items():
            print(f"{name:12s} mode={p.get('mode', 'qat')}")
        return 0
    if ns.command == "ptq":
        from .recipe import RecipeError, load_recipe

        kv = _parse_kv(ns.args)
        kv.setdefault("detq", "w8a8-ptq")
        try:
            if load_recipe(kv["detq"]).mode != "ptq":
                raise RecipeError(f"detq ptq: recipe {kv['detq']!r} is quantization-aware training; give a PTQ recipe "
                                  "(w8a8-ptq, w4a8-ptq, w4a4-ptq, w8a8-taskq, w4a8-taskq, w4a4-taskq or `mode: ptq`)")
            train_ultralytics(kv)
        except (RecipeError, ValueError) as e:
            print(f"detq ptq: {e}", file=sys.stderr)
            return 2
        return 0
    if ns.command == "train":
        from .recipe import RecipeError

        try:
            train_ultralytics(_parse_kv(ns.args))
        except (RecipeError, ValueError) as e:  # includes DetQConfigError
            print(f"detq train: {e}", file=sys.stderr)
            return 2
        return 0
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
