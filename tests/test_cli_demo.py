"""`detq` console script: the demo (tiny sizes) and `detq train ultralytics`."""

from __future__ import annotations

import json
import os

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")

import pytest
import torch

pytest.importorskip("ultralytics")

from detq_hooks import is_quantized  # noqa: E402
from detq_hooks.cli import _parse_kv, main  # noqa: E402


def test_demo_smoke(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--epochs", "1", "--qat-epochs", "1", "--imgsz", "64", "--num-train", "16",
               "--num-val", "8", "--batch", "8", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    names = [r["name"] for r in res["rows"]]
    assert names == ["float", "PTQ W8A8", "QAT W4A8"]
    for r in res["rows"]:
        assert 0.0 <= r["map50_95"] <= 1.0 and min(r["ort_ms"], r["ov_ms"], r["ov_f32_ms"]) > 0
        assert abs(r["ov_map50_95"] - r["map50_95"]) <= 0.005 and abs(r["ort_map50_95"] - r["map50_95"]) <= 0.005
    fl, ptq, qat = res["rows"]
    assert ptq["deployed_mb"] < 0.35 * fl["deployed_mb"] and qat["deployed_mb"] < 0.35 * fl["deployed_mb"]
    assert (out / "deploy" / "qat_w4a8" / "model.xml").is_file() and (out / "deploy" / "float" / "model.onnx").is_file()
    printed = capsys.readouterr().out
    assert "mAP50-95" in printed and "QAT W4A8" in printed
    _check_demo_pictures(out, printed)


def _png_size(path) -> tuple[int, int]:
    from PIL import Image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size


def _check_demo_pictures(out, printed):
    from statistics import median

    reports = out / "reports"
    for stem, weight_bits in (("ptq_w8a8", {8}), ("qat_w4a8", {4, 8})):
        data = json.loads((reports / f"{stem}.json").read_text())
        layers = data["layers"]
        # YOLO11n has dozens of convolutions; each quantized one is one entry, named once
        assert len(layers) > 50 and len({l["name"] for l in layers}) == len(layers)
        assert data["summary"]["quantized_layers"] == len(layers)
        assert {l["weight_bits"] for l in layers} == weight_bits  # W4A8: first and prediction layers stay W8
        weight_sqnr = {b: [l["weight_sqnr_db"] for l in layers if l["weight_bits"] == b and l["weight_sqnr_db"] is not None]
                       for b in weight_bits}
        act_sqnr = [l["activation_sqnr_db"] for l in layers if l["activation_sqnr_db"] is not None]
        assert sum(map(len, weight_sqnr.values())) >= 0.9 * len(layers) and len(act_sqnr) >= 0.8 * len(layers)
        # about 6 dB per weight bit: W8 layers above 40 dB, W4 layers around 20-25 dB
        assert median(weight_sqnr[8]) > 40
        if 4 in weight_bits:
            assert 15 < median(weight_sqnr[4]) < 30
        # 8-bit activations: every layer of the calibrated PTQ model, and the typical layer after QAT
        assert (min(act_sqnr) if stem == "ptq_w8a8" else median(act_sqnr)) > 25
        # no layer dead after QAT (a step size one SGD step took below zero passed nothing: 0.002 dB)
        assert min(act_sqnr) > 1 and all(l["activation_scale"] > 0 for l in layers if l["activation_scale"] is not None)
        table = (reports / f"{stem}.md").read_text().splitlines()
        assert sum(line.startswith("| ") for line in table) == len(layers) + 1  # header + one row per layer
        assert all(sum(line.startswith(f"| {l['name']} |") for line in table) == 1 for l in layers)
        width, height = _png_size(reports / f"{stem}_sqnr.png")
        assert width > 1500 and height > 300  # the bar chart widens with the number of layers
    width, height = _png_size(out / "map_vs_latency.png")
    assert width >= 600 and height >= 400
    for path in (reports / "ptq_w8a8_sqnr.png", reports / "qat_w4a8.md", out / "map_vs_latency.png"):
        assert str(path) in printed


def test_parse_kv_keeps_paths_as_strings():
    kv = _parse_kv(["model=yolo11n.yaml", "data=1.yaml", "epochs=2", "amp=False", "detq=w4a8", "imgsz=64"])
    assert kv == {"model": "yolo11n.yaml", "data": "1.yaml", "epochs": 2, "amp": False, "detq": "w4a8", "imgsz": 64}


def test_cli_train_ultralytics(tmp_path, capsys):
    from detq_hooks.tools.data import make_synthetic_dataset

    ds = make_synthetic_dataset(tmp_path / "data", num_train=16, num_val=8, imgsz=64, seed=0)
    common = [f"data={ds.yolo_yaml}", "epochs=1", "imgsz=64", "batch=8", "amp=False", "plots=False", "workers=0",
              "device=cpu", f"project={tmp_path / 'runs'}", "exist_ok=True"]
    rc = main(["train", "ultralytics", "model=yolo11n.yaml", "detq=w8a8-ptq", "name=cli", *common])
    assert rc == 0
    best = tmp_path / "runs" / "cli" / "weights" / "best.pt"
    ckpt = torch.load(best, map_location="cpu", weights_only=False)
    assert is_quantized(ckpt["model"]) and ckpt["detq"]["recipe"]["mode"] == "ptq"
    rc = main(["train", "ultralytics", "model=yolo11n.yaml", "detq=w5a5", "name=bad", *common])
    assert rc == 2 and "unknown recipe preset" in capsys.readouterr().err


def test_cli_ptq_reconstructs_an_ultralytics_model(tmp_path, capsys):
    import yaml

    from detq_hooks.tools.data import make_synthetic_dataset

    ds = make_synthetic_dataset(tmp_path / "data", num_train=16, num_val=8, imgsz=64, seed=0)
    recipe = tmp_path / "qdrop.yaml"
    recipe.write_text(yaml.safe_dump({"preset": "w4a8-ptq", "calibration": {"num_batches": 2},
                                      "ptq": {"method": "qdrop", "iterations": 4, "batch_size": 4}}))
    common = [f"data={ds.yolo_yaml}", "imgsz=64", "batch=8", "amp=False", "plots=False", "workers=0", "device=cpu",
              f"project={tmp_path / 'runs'}", "exist_ok=True"]
    assert main(["ptq", "model=yolo11n.yaml", f"detq={recipe}", "name=ptq", *common]) == 0
    ckpt = torch.load(tmp_path / "runs" / "ptq" / "weights" / "best.pt", map_location="cpu", weights_only=False)
    assert is_quantized(ckpt["model"]) and ckpt["detq"]["recipe"]["name"] == "ptq-w4a8"
    assert main(["ptq", "model=yolo11n.yaml", "detq=w4a8", "name=qat", *common]) == 2
    assert "is quantization-aware training; give a PTQ recipe" in capsys.readouterr().err
