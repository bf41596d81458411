"""Deployable integer exports (issue 10): clean QDQ ONNX, onnxruntime QLinearConv units, OpenVINO int8 IR.

A YOLO11n built from its yaml at 64 px with randomised BatchNorm statistics (so activations have real
ranges without training), quantized and calibrated on random images. Real onnxruntime and OpenVINO.
"""

from __future__ import annotations

import copy
import os

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")

import numpy as np
import pytest
import torch

import detq_hooks as dq
from detq_hooks.deploy import export_openvino, make_runner, ort_op_counts, runtime_precisions
from detq_hooks.export import ExportError, export_onnx
from detq_hooks.onnx_graph import graph_summary

onnx = pytest.importorskip("onnx")
pytest.importorskip("ultralytics")
pytest.importorskip("openvino")

IMGSZ = 64


def _float_yolo():
    from ultralytics import YOLO

    torch.manual_seed(0)
    model = YOLO("yolo11n.yaml").model.eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    head = model.model[-1]
    head.export, head.format = True, "onnx"  # one output tensor, as Ultralytics' exporter does
    return model


@pytest.fixture(scope="module")
def models():
    from detq_hooks.ultralytics import prediction_layers

    float_model = _float_yolo()
    out = {None: float_model}
    batches = [torch.rand(2, 3, IMGSZ, IMGSZ) for _ in range(2)]
    for preset in ("w8a8", "w4a4"):
        qm = dq.quantize(copy.deepcopy(float_model), preset, prediction_layers=prediction_layers(float_model))
        dq.calibrate(qm, batches, method="minmax")  # the MSE range search is the slow part here
        out[preset] = qm.eval()
    return out


@pytest.fixture(scope="module")
def x():
    torch.manual_seed(1)
    return torch.rand(1, 3, IMGSZ, IMGSZ)


def _torch_out(model, x):
    with torch.no_grad():
        out = model(x)
    return (out[0] if isinstance(out, (tuple, list)) else out).numpy()


def _export(model, x, path, **kw):
    return export_onnx(model, x, path, input_names=["images"], output_names=["output0"], **kw)


def _assert_close(out, ref, box_atol, cls_atol, box_flips=0.15, box_max=1.0):
    """YOLO output rows 0-3 are boxes in pixels (of a 64 px image), the rest class probabilities. A box
    coordinate is a DFL expectation times the stride (up to 32), so a rounding decision flipped upstream by a
    different float summation order moves it by a fraction of a pixel: at most ``box_flips`` of the
    coordinates may exceed ``box_atol``, none ``box_max``."""
    assert out.shape == ref.shape
    box, cls = np.abs(out[:, :4] - ref[:, :4]), np.abs(out[:, 4:] - ref[:, 4:]).max()
    assert (box > box_atol).mean() <= box_flips and box.max() <= box_max, (float((box > box_atol).mean()), float(box.max()))
    assert cls <= cls_atol, float(cls)


def test_clean_qdq_has_integer_weights_no_quantizer_arithmetic_and_a_quarter_of_the_size(models, x, tmp_path):
    fres = _export(models[None], x, tmp_path / "float.onnx")
    res = _export(models["w8a8"], x, tmp_path / "w8a8.onnx")
    proto = onnx.load(str(res.path))
    s = graph_summary(proto)
    n_convs = sum(1 for m in models["w8a8"].modules() if isinstance(m, dq.QuantConv2d))
    assert res.quantized_convs == n_convs == s["Conv"]  # dq.quantize also quantizes the fixed DFL conv
    assert (s["Round"], s["Clip"], s["Cast"], s["ops"].get("BatchNormalization", 0)) == (0, 0, 0, 0)
    inits = {t.name: t for t in proto.graph.initializer}
    # one quantizer per (tensor, constants): layers that read one tensor with equal ranges (min-max calibration of
    # the head's box and class branches) share one QuantizeLinear; weights have a DequantizeLinear only
    quantizers = {(n.input[0], inits[n.input[1]].raw_data, inits[n.input[2]].raw_data)
                  for n in proto.graph.node if n.op_type == "QuantizeLinear"}
    assert res.quantize_linear == len(quantizers) == n_convs - 8 and res.dequantize_linear == res.quantize_linear + n_convs
    for node in proto.graph.node:
        if node.op_type == "DequantizeLinear":
            assert all(i in inits for i in node.input[1:]), node.name  # constant scale and zero point
        if node.op_type == "QuantizeLinear":
            assert inits[node.input[1]].dims == [] and inits[node.input[2]].data_type == onnx.TensorProto.UINT8
    int8_weights = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert len(int8_weights) == n_convs
    ratio = res.file_bytes / fres.path.stat().st_size
    assert ratio <= 0.3, ratio  # measured 0.27 at W8A8
    # Stated tolerance: the QDQ graph computes the fake-quant function; float summation order may flip a rounding
    # decision, so boxes agree to 0.05 px and class probabilities to 2e-3.
    out = make_runner(res.path, "onnxruntime")(x.numpy())[0]
    _assert_close(out, _torch_out(models["w8a8"], x), 0.05, 2e-3)


def test_low_bit_activations_clip_and_int4_weight_storage(models, x, tmp_path):
    r8 = _export(models["w4a4"], x, tmp_path / "w4a4.onnx")
    s = graph_summary(onnx.load(str(r8.path)))
    n_a4 = sum(1 for _, q in dq.iter_quantizers(models["w4a4"]) if q.role == "activation" and q.bits == 4)
    assert 0 < n_a4 < r8.quantize_linear  # first layer and prediction layers stay 8-bit
    assert s["Clip"] == n_a4  # one constant Clip per 4-bit activation quantizer, nothing else
    assert s["Round"] == 0
    with pytest.warns(UserWarning, match="stored as INT4"):
        r4 = _export(models["w4a4"], x, tmp_path / "w4a4_int4.onnx", opset=21, weight_storage="int4")
    proto = onnx.load(str(r4.path))
    n_int4 = sum(1 for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT4 and len(t.dims) == 4)
    n_w4 = sum(1 for _, q in dq.iter_quantizers(models["w4a4"]) if q.role == "weight" and q.bits == 4)
    assert n_int4 == n_w4 == r8.quantized_convs - 7  # first layer and the six prediction layers keep 8 bits
    assert r4.file_bytes < 0.6 * r8.file_bytes  # 4-bit codes halve (measured 0.56); 8-bit layers, scales, graph stay
    ref = _torch_out(models["w4a4"], x)
    for path in (r8.path, r4.path):
        _assert_close(make_runner(path, "onnxruntime")(x.numpy())[0], ref, 0.05, 2e-3)


def test_onnxruntime_target_fuses_every_quantized_conv(models, x, tmp_path):
    calib = [torch.rand(1, 3, IMGSZ, IMGSZ) for _ in range(4)]
    # the trained graph's structure (integer_adds=False); the default's extra fusions are tested below
    res = _export(models["w8a8"], x, tmp_path / "ort.onnx", target="onnxruntime", calibration_inputs=calib,
                  integer_adds=False)
    assert res.notes == []
    ops = ort_op_counts(res.path)
    assert ops["QLinearConv"] == res.quantized_convs == 88 and ops.get("Conv", 0) == 0
    # a SiLU whose product only the next layers' quantizers read runs as QLinearSigmoid + QLinearMul (uint8 from
    # one conv to the next); one read by float ops (Concat, Split, Add, MaxPool) stays float
    clean = onnx.load(str(_export(models["w8a8"], x, tmp_path / "qdq.onnx").path)).graph
    readers = {}
    for n in clean.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    silu_muls = [m for n in clean.node if n.op_type == "Sigmoid" for m in readers[n.output[0]] if m.op_type == "Mul"]
    into_quantizers = [m for m in silu_muls if all(r.op_type == "QuantizeLinear" for r in readers[m.output[0]])]
    assert len(silu_muls) == 77 and len(into_quantizers) == 41
    assert ops["QLinearSigmoid"] == ops["QLinearMul"] == len(into_quantizers)
    assert ops["Sigmoid"] == 77 - 41 + 1  # the SiLUs read by float ops and the head's class sigmoid
    proto = onnx.load(str(res.path))
    int32 = {t.name for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT32}
    bias_dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int32]
    assert len(bias_dq) == res.quantized_convs - 1  # one int32 bias per quantized conv but the bias-free DFL
    # Stated tolerance: each Conv output is requantized to uint8 (calibrated min/max), each bias to int32 and
    # each fused sigmoid to uint8 at 1/255, which the fake-quant model does not do: boxes within 1.5 px, class
    # probabilities within 0.03.
    _assert_close(make_runner(res.path, "onnxruntime")(x.numpy())[0], _torch_out(models["w8a8"], x), 1.5, 0.03)


def test_openvino_ir_runs_quantized_convs_in_u8_and_agrees(models, x, tmp_path):
    res = export_openvino(models["w8a8"], x, tmp_path / "ov" / "m.xml", input_names=["images"])
    assert res.xml.is_file() and res.bin.is_file()
    assert res.bin.stat().st_size < 0.3 * 4 * sum(p.numel() for p in models[None].parameters())
    prec = runtime_precisions(res.xml)
    n_convs = res.onnx.quantized_convs
    assert sum(prec["Convolution"].get(p, 0) for p in ("u8", "i8")) + sum(prec.get("GroupConvolution", {}).get(p, 0) for p in ("u8", "i8")) == n_convs
    ref = _torch_out(models["w8a8"], x)
    # Stated tolerance, f32: as the QDQ graph (the residual adds' inputs rounded once more, integer_adds: at this
    # size no box moved by more than 0.05 px). Default precision (bf16 on CPUs with AVX512-BF16) runs the float
    # parts (box decode, SiLU) in bf16: boxes within 0.5 px, class probabilities within 0.01.
    _assert_close(make_runner(res.xml, "openvino", precision="f32")(x.numpy())[0], ref, 0.05, 2e-3)
    _assert_close(make_runner(res.xml, "openvino")(x.numpy())[0], ref, 0.5, 0.01)


def test_integer_adds_put_both_inputs_of_each_quantized_residual_add_on_a_grid(models, x, tmp_path):
    """YOLO11n has 13 residual adds (five C3k2 bottlenecks, three C3k blocks of two, PSA's attention and
    feed-forward) and the attention's ``v + pe(v)``; the head's box decode adds in float and stays so."""
    graphs = {}
    for adds in (False, True):
        res = _export(models["w8a8"], x, tmp_path / f"{adds}.onnx", target="openvino", integer_adds=adds)
        graphs[adds] = onnx.load(str(res.path))
    on_grid = {}
    for adds, m in graphs.items():
        g = m.graph
        producer = {o: n for n in g.node for o in n.output}
        inits = {t.name for t in g.initializer}
        constant = lambda i: i in inits or (i in producer and producer[i].op_type == "Constant")  # noqa: E731
        act_adds = [n for n in g.node if n.op_type == "Add" and "model.23" not in n.name
                    and not any(constant(i) for i in n.input)]
        on_grid[adds] = sum(all(i in producer and producer[i].op_type == "DequantizeLinear" for i in n.input)
                            for n in act_adds)
        decode = [n for n in g.node if n.op_type == "Add" and "model.23" in n.name]
        assert decode and not any(i in producer and producer[i].op_type == "DequantizeLinear"
                                  for n in decode for i in n.input)
        assert len(act_adds) == 14
    assert on_grid == {False: 0, True: 14}
    # the new quantizers reuse the trained scales: one on each block's last activation (the sum's step), the skip
    # input through the quantizer its first conv already had; no new scale constant, no Round/Clip
    scales = {adds: {t.name for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and not t.dims}
              for adds, m in graphs.items()}
    assert scales[True] <= scales[False]
    s = graph_summary(graphs[True])
    assert s["Round"] == s["Clip"] == 0
    # Stated tolerance between the two: each add input rounded once more, at most half a step each; the
    # outputs stay within the f32 tolerance of test_openvino_ir_runs_quantized_convs_in_u8_and_agrees
    runs = {adds: make_runner(tmp_path / f"{adds}.onnx", "onnxruntime")(x.numpy())[0] for adds in graphs}
    _assert_close(runs[True], runs[False], 0.05, 2e-3)
    assert not np.array_equal(runs[True], runs[False])  # the graphs do differ

    # onnxruntime: the residual adds whose SiLU inputs now feed only quantizers fuse too (QLinearAdd, and
    # QLinearSigmoid/QLinearMul for those SiLUs); nothing else of the ORT target changes
    calib = [torch.rand(1, 3, IMGSZ, IMGSZ) for _ in range(4)]
    ort = {adds: _export(models["w8a8"], x, tmp_path / f"ort_{adds}.onnx", target="onnxruntime", calibration_inputs=calib,
                         integer_adds=adds) for adds in (False, True)}
    ops = {adds: ort_op_counts(r.path) for adds, r in ort.items()}
    assert ops[False]["QLinearConv"] == ops[True]["QLinearConv"] == 88 and ops[False].get("QLinearAdd", 0) == 0
    assert ops[True]["QLinearAdd"] >= 5 and ops[True]["QLinearSigmoid"] >= ops[False]["QLinearSigmoid"] + 5, ops[True]
    # Stated tolerance: the ORT target's (test_onnxruntime_target_fuses_every_quantized_conv)
    _assert_close(make_runner(ort[True].path, "onnxruntime")(x.numpy())[0], _torch_out(models["w8a8"], x), 1.5, 0.03)


# ------------------------------------------------------------------------------------------------ bad input
def test_uncalibrated_model_is_refused_and_nothing_written(tmp_path):
    from core_models import TinyDetector

    m = dq.quantize(TinyDetector().eval(), "w8a8", prediction_layers=["cls_head", "box_head", "pool_fc"])
    with pytest.raises(ExportError, match=r"quantizer 'backbone\.0\.input_quantizer' has no calibrated range"):
        export_onnx(m, torch.randn(1, 3, 32, 32), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kw, match", [
    (dict(opset=12), r"`opset` = 12 is too old: per-channel DequantizeLinear needs opset 13"),
    (dict(weight_storage="int4"), r"'int4' needs INT4 DequantizeLinear, opset 21 or later; got `opset` = 17"),
    (dict(weight_storage="int2"), r"`weight_storage` = 'int2' is not one of \['int8', 'int4'\]"),
    (dict(target="tensorrt"), r"`target` = 'tensorrt' is not one of \['qdq', 'onnxruntime', 'openvino'\]"),
    (dict(target="onnxruntime"), r"needs `calibration_inputs`"),
])
def test_bad_export_options(models, x, tmp_path, kw, match):
    with pytest.raises(ExportError, match=match):
        _export(models["w8a8"], x, tmp_path / "m.onnx", **kw)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_path_fails_clearly_and_keeps_old_file(models, x, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ExportError, match=r"cannot create the output folder .*file"):
        _export(models["w8a8"], x, blocker / "m.onnx")
    with pytest.raises(ExportError, match=r"is a folder; give a file name"):
        _export(models["w8a8"], x, tmp_path)
    with pytest.raises(ExportError, match=r"must end in \.xml"):
        export_openvino(models["w8a8"], x, tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize("bits, symmetric, per_channel", [(8, True, True), (4, True, True), (8, False, False), (4, False, False)])
def test_traced_quantizer_is_8bit_fake_quantize_computing_the_same_function(bits, symmetric, per_channel):
    """Under torch.jit.trace (OpenVINO's PyTorch frontend, Ultralytics' format="openvino") a quantizer is one
    8-bit fake_quantize (a clamp first below 8 bits; scale arithmetic on constants is folded by OpenVINO): same
    values as the training forward."""
    from detq_hooks.quantizers import FakeQuantizer

    torch.manual_seed(0)
    q = FakeQuantizer(bits=bits, symmetric=symmetric, per_channel=per_channel, num_channels=4 if per_channel else 1,
                      role="weight" if symmetric else "activation")
    x = torch.randn(4, 3, 5, 5) * 2
    q.initialize_from(x)
    with torch.no_grad():
        ref = q(x)
        traced = torch.jit.trace(q, x)
        out = traced(x)
    ops = {n.kind() for n in traced.inlined_graph.nodes()}
    assert ("aten::fake_quantize_per_channel_affine" if per_channel else "aten::fake_quantize_per_tensor_affine") in ops
    assert not any("learnable" in k for k in ops)  # the op no exporter can read
    step = float(q.scale.max())
    d = (out - ref).abs()
    # float x/s vs x*(1/s) may flip a value sitting on a rounding boundary by one step; none here in practice
    assert (d > 1e-6).float().mean() <= 1e-3 and float(d.max()) <= step + 1e-6
