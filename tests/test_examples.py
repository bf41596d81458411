"""The runnable examples stay runnable: each runs end to end at tiny sizes and prints its result."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ENV = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "false"}


def run(args, cwd):
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_lightning_fcos_example(tmp_path):
    pytest.importorskip("lightning")
    out = run([str(EXAMPLES / "lightning_fcos.py"), "--root", str(tmp_path / "data"), "--num-train", "16", "--num-val", "4", "--imgsz", "64",
               "--float-epochs", "1", "--qat-epochs", "1"], tmp_path)
    rows = [line.split()[0] for line in out.splitlines() if line.split() and line.split()[0] in ("float", "w8a8", "w4a8")]
    assert rows == ["float", "w8a8", "w4a8"], out[-2000:]


def test_ultralytics_example(tmp_path):
    pytest.importorskip("ultralytics")
    out = run([str(EXAMPLES / "ultralytics_qat.py"), "--epochs", "1", "--imgsz", "64", "--out", str(tmp_path / "run")], tmp_path)
    assert "ONNX QDQ:" in out and "QuantizeLinear" in out, out[-2000:]
