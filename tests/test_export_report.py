import json

import pytest
import torch

import detq_hooks as dq
from detq_hooks.export import compare_onnx, export_onnx
from detq_hooks.report import quantization_report

from core_models import TinyDetector

HEADS = ["cls_head", "box_head", "pool_fc"]


def _calibrated(preset):
    torch.manual_seed(0)
    m = dq.quantize(TinyDetector().eval(), preset, prediction_layers=HEADS)
    dq.calibrate(m, [torch.randn(2, 3, 32, 32) for _ in range(3)])
    return m


@pytest.mark.parametrize("preset", ["w8a8", "w4a4"])
def test_onnx_qdq_export_agrees_with_fake_quant_model(tmp_path, preset):
    m = _calibrated(preset)
    res = export_onnx(m, torch.randn(1, 3, 32, 32), tmp_path / "m.onnx", input_names=["images"],
                      dynamic_axes={"images": {0: "batch"}})
    roles = [q.role for _, q in dq.iter_quantizers(m)]
    # weights: integer codes + DequantizeLinear only; activations: a QuantizeLinear/DequantizeLinear pair, one
    # for cls_head and box_head, which read one tensor with equal (8-bit, same calibration) ranges
    assert res.quantize_linear == roles.count("activation") - 1
    assert res.dequantize_linear == len(roles) - 1
    if preset == "w4a4":
        assert res.bits_histogram[4] > 0
    x = torch.randn(3, 3, 32, 32)  # another batch size than the one traced
    diff = compare_onnx(m, res.path, x)
    # Stated tolerance: outputs agree to 1e-4 of the output range; rounding flips (when float summation order
    # moves a value across a rounding boundary) may touch at most 0.1% of the elements.
    assert diff["max_rel"] < 1e-4 or diff["mismatch_fraction"] < 1e-3, diff


def test_report_table_json_and_plot(tmp_path):
    m8, m4 = _calibrated("w8a8"), _calibrated("w4a4")
    batches = [torch.randn(2, 3, 32, 32)]
    r8, r4 = quantization_report(m8, batches), quantization_report(m4, batches)
    assert len(r8.layers) == 8 and all(l.activation_sqnr_db is not None for l in r8.layers)
    s8, s4 = r8.summary(), r4.summary()
    # 8-bit weights: ~40 dB or more; 4 bits lose roughly 6 dB per bit
    assert s8["mean_weight_sqnr_db"] > 30
    assert s8["mean_weight_sqnr_db"] - s4["mean_weight_sqnr_db"] > 10
    assert s8["mean_activation_sqnr_db"] > s4["mean_activation_sqnr_db"]
    r4.print()
    data = json.loads(r4.save_json(tmp_path / "r.json").read_text())
    assert data["recipe"] == "w4a4" and len(data["layers"]) == 8
    table = r4.save_markdown(tmp_path / "r.md").read_text().splitlines()
    rows = [line for line in table if line.startswith("| ")]
    assert len(rows) == 1 + 8 and rows[0].startswith("| layer | type | role | W bits")
    assert f"| {r4.layers[1].name} | Conv2d | body | 4 | 4 | {r4.layers[1].weight_sqnr_db:.1f} |" in rows[2]
    assert table[-1].startswith("8 quantized layers, 0 kept float")


def test_report_plot_colours_bars_by_weight_bits(tmp_path):
    import numpy as np
    from PIL import Image

    r4 = quantization_report(_calibrated("w4a4"), [torch.randn(2, 3, 32, 32)])
    assert {l.weight_bits for l in r4.layers} == {4, 8}  # W4 body, W8 first and prediction layers
    png = r4.save_plot(tmp_path / "r.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:
        assert im.width > 600 and im.height > 400
        pixels = np.asarray(im.convert("RGB")).reshape(-1, 3)
    # the bars are filled with tab10's first two colours, one per bit width (4 -> blue, 8 -> orange)
    for colour in ((31, 119, 180), (255, 127, 14)):
        assert (np.abs(pixels.astype(int) - colour).sum(axis=1) < 10).sum() > 2000, colour
