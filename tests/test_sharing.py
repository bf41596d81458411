"""One activation quantizer per tensor (``quantization.shared_activations``) and the export that quantizes each
such tensor once, where it is produced. YOLO11n from its yaml at 64 px (random BatchNorm statistics, as in
test_deploy), real onnxruntime and OpenVINO."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")

import numpy as np
import pytest
import torch

import detq_hooks as dq
from detq_hooks.checkpoint import CheckpointMismatchError, apply_plan, quantization_state, rebuild
from detq_hooks.deploy import export_openvino, make_runner, ort_op_counts, ov_compiled
from detq_hooks.export import export_onnx
from detq_hooks.onnx_graph import clean_qdq, share_activation_qdq
from detq_hooks.quantizers import learned_step_sizes
from detq_hooks.recipe import RecipeError, load_recipe
from detq_hooks.sharing import input_leaders

onnx = pytest.importorskip("onnx")
pytest.importorskip("ultralytics")
pytest.importorskip("openvino")

from test_deploy import IMGSZ, _assert_close, _float_yolo, _torch_out  # noqa: E402

SHARED = {"preset": "w8a8", "name": "w8a8-shared", "quantization": {"shared_activations": True}}


def _convert(float_model, recipe):
    from detq_hooks.ultralytics import prediction_layers

    qm = dq.quantize(copy.deepcopy(float_model), recipe, prediction_layers=prediction_layers(float_model))
    torch.manual_seed(2)
    dq.calibrate(qm, [torch.rand(2, 3, IMGSZ, IMGSZ) for _ in range(2)], method="minmax")
    return qm.eval()


@pytest.fixture(scope="module")
def models():
    float_model = _float_yolo()
    return {None: float_model, "w8a8": _convert(float_model, "w8a8"), "shared": _convert(float_model, SHARED)}


@pytest.fixture(scope="module")
def x():
    torch.manual_seed(1)
    return torch.rand(1, 3, IMGSZ, IMGSZ)


def _readers(graph):
    out = {}
    for n in graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def test_layers_reading_one_tensor_share_one_calibrated_quantizer(models):
    shared, plain = models["shared"], models["w8a8"]
    leaders = input_leaders(shared)
    layers = dict(dq.quantized_layers(shared))
    # a C3k2 block: its output conv reads the Concat of the split halves and the bottleneck, which reads one half
    assert leaders["model.2.m.0.cv1.conv"] == "model.2.cv2.conv"
    assert layers["model.2.m.0.cv1.conv"].input_quantizer is layers["model.2.cv2.conv"].input_quantizer
    # the head's box and class branches read the neck output that the next downsampling conv reads
    assert leaders["model.23.cv2.0.0.conv"] == leaders["model.23.cv3.0.0.0.conv"] == "model.17.conv"
    # SPPF's Concat of max-pooled copies, read by one conv only, and the image-reading first conv: nothing to share
    assert "model.9.cv2.conv" not in leaders and "model.0.conv" not in leaders and "model.0.conv" not in leaders.values()
    assert len(leaders) == 21 and input_leaders(plain) == {}
    # one trained step size per shared group, every one calibrated, ranges covering every reader's input
    assert len(learned_step_sizes(plain)) - len(learned_step_sizes(shared)) == 21
    assert all(q.initialized for _, q in dq.iter_quantizers(shared))


def test_session_ties_at_conversion_before_ddp_and_optimizer_see_the_model(models):
    """The detector family runs a blank image through the model at ``convert``; the same groups as the ones the
    first calibration batch gives (the data flow does not depend on the pixels)."""
    from detq_hooks.session import QuantSession

    model = copy.deepcopy(models[None]).train()
    QuantSession(SHARED).convert(model)
    assert input_leaders(model) == input_leaders(models["shared"]) and model.training
    assert not any(q.initialized for _, q in dq.iter_quantizers(model) if q.role == "activation")  # nothing observed


def test_shared_plan_survives_checkpoint_rebuild_and_apply_plan(models, x):
    shared = models["shared"]
    entry = quantization_state(shared)
    assert entry["layers"]["model.2.m.0.cv1.conv"]["input_shares"] == "model.2.cv2.conv"
    assert sum("input_shares" in p for p in entry["layers"].values()) == 21
    rebuilt = rebuild(copy.deepcopy(models[None]), entry)
    assert input_leaders(rebuilt) == input_leaders(shared)
    rebuilt.load_state_dict(shared.state_dict())
    assert np.array_equal(_torch_out(rebuilt.eval(), x), _torch_out(shared, x))
    # a trainer that converts before reading the checkpoint: the saved plan ties the fresh conversion
    fresh = dq.quantize(copy.deepcopy(models[None]), SHARED)
    assert input_leaders(fresh) == {}
    assert apply_plan(fresh, entry) >= 21 and input_leaders(fresh) == input_leaders(shared)


def test_plan_sharing_a_missing_quantizer_is_refused_and_nothing_changes(models):
    entry = copy.deepcopy(quantization_state(models["shared"]))
    entry["layers"]["model.2.m.0.cv1.conv"]["input_shares"] = "model.0.bn"
    entry["layers"]["model.4.cv1.conv"]["weight_bits"] = 6
    fresh = dq.quantize(copy.deepcopy(models[None]), SHARED)
    with pytest.raises(CheckpointMismatchError, match=r"'model.2.m.0.cv1.conv' shares the input quantizer of 'model.0.bn'"):
        apply_plan(fresh, entry)
    assert input_leaders(fresh) == {} and dict(dq.quantized_layers(fresh))["model.4.cv1.conv"].weight_quantizer.bits == 8


@pytest.mark.parametrize("section, match", [
    ({"curriculum": {"enabled": True}}, r"`curriculum.enabled` treats layers one by one"),
    ({"mode": "ptq", "ptq": {"method": "adaround"}}, r"`ptq.method` = 'adaround' treats layers one by one"),
    ({"quantization": {"shared_activations": "yes"}}, r"`quantization.shared_activations`"),
])
def test_shared_activations_with_per_layer_methods_is_refused(section, match):
    recipe = copy.deepcopy(SHARED)
    for k, v in section.items():
        recipe[k] = {**recipe.get(k, {}), **v} if isinstance(v, dict) else v
    with pytest.raises(RecipeError, match=match):
        load_recipe(recipe)


def test_export_quantizes_each_shared_tensor_once_and_computes_the_same_function(models, x, tmp_path):
    res = export_onnx(models["shared"], x, tmp_path / "shared.onnx", input_names=["images"], output_names=["output0"])
    graph = onnx.load(str(res.path)).graph
    readers = _readers(graph)
    # no tensor is quantized twice; the selections between layers run on dequantized values of one quantizer
    assert all(sum(r.op_type == "QuantizeLinear" and r.input[0] == t for r in rs) <= 1 for t, rs in readers.items())
    # SPPF: the Concat of three max-pooled copies -> one quantizer on the conv output they come from, the max
    # pools on its dequantized values
    sppf_in = [r.op_type for r in readers["/model.9/cv1/act/Mul_output_0"]]
    assert sppf_in == ["QuantizeLinear"], sppf_in
    pools = [n for n in graph.node if n.op_type == "MaxPool"]
    assert len(pools) == 3 and all(any(p.input[0] == d.output[0] for d in graph.node if d.op_type == "DequantizeLinear")
                                   for p in pools)
    # Stated tolerance: exact up to float summation order, as the plain export (test_deploy)
    _assert_close(make_runner(res.path, "onnxruntime")(x.numpy())[0], _torch_out(models["shared"], x), 0.05, 2e-3)


def test_moving_quantizers_onto_selection_inputs_is_exact(models, x, tmp_path):
    """The hoisting pass on a plain model's graph (where it adds quantizers rather than moves them) changes no value."""
    import onnxruntime as ort

    raw = tmp_path / "raw.onnx"
    with torch.no_grad():
        torch.onnx.export(models["w8a8"], (x,), str(raw), dynamo=False, opset_version=17)
    before = onnx.load(str(raw))
    clean_qdq(before)
    after = copy.deepcopy(before)
    done = share_activation_qdq(after, hoist=True)
    assert done["hoisted"] >= 5

    def run(proto):
        sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        return sess.run(None, {proto.graph.input[0].name: x.numpy()})[0]

    assert np.array_equal(run(before), run(after))


def _standalone_quantizers(xml) -> int:
    """FakeQuantize nodes the CPU plugin could not fuse into a convolution: each runs as its own Subgraph."""
    ops = [op.get_rt_info() for op in ov_compiled(xml).get_runtime_model().get_ops()]
    return sum(i["layerType"].astype(str) == "Subgraph" and "quantizer" in i["originalLayersNames"].astype(str)
               for i in ops)


def test_shared_model_fuses_more_silus_in_onnxruntime_and_leaves_fewer_float_quantizers_in_openvino(models, x, tmp_path):
    calib = [torch.rand(1, 3, IMGSZ, IMGSZ) for _ in range(4)]
    counts, standalone = {}, {}
    for name in ("w8a8", "shared"):
        res = export_onnx(models[name], x, tmp_path / f"{name}_ort.onnx", target="onnxruntime", calibration_inputs=calib,
                          input_names=["images"], output_names=["output0"], integer_adds=False)
        counts[name] = ort_op_counts(res.path)
        assert counts[name]["QLinearConv"] == res.quantized_convs == 88
        for adds in (False, True):
            ov = export_openvino(models[name], x, tmp_path / f"{name}_{adds}" / "m.xml", input_names=["images"],
                                 integer_adds=adds)
            standalone[name, adds] = _standalone_quantizers(ov.xml)
    assert counts["w8a8"]["QLinearSigmoid"] == 41  # test_deploy: 41 of 77 SiLUs feed only quantizers
    assert counts["shared"]["QLinearSigmoid"] == counts["shared"]["QLinearMul"] >= 50
    # the trained graph exactly (integer_adds=False): measured 56 and 16; with the residual adds on integers (the
    # default) the skip tensors are quantized once where they are made: measured 39 and 2
    assert standalone["w8a8", False] >= 40 and standalone["shared", False] <= 20, standalone
    assert standalone["w8a8", True] <= standalone["w8a8", False] - 10 and standalone["shared", True] <= 4, standalone
    # Stated tolerance, f32: as the QDQ graph (test_deploy); the dropped requantizers were identities
    _assert_close(make_runner(tmp_path / "shared_False" / "m.xml", "openvino", precision="f32")(x.numpy())[0],
                  _torch_out(models["shared"], x), 0.05, 2e-3)
    # Stated tolerance: the ORT target's (test_deploy), but boxes up to 2 px: the 50+ fused SiLUs add one uint8
    # rounding each that the fake-quant model does not do (the plain model has 41); measured 1.28 px
    _assert_close(make_runner(tmp_path / "shared_ort.onnx", "onnxruntime")(x.numpy())[0], _torch_out(models["shared"], x),
                  1.5, 0.03, box_max=2.0)


def test_torchvision_and_mmdetection_families_tie_at_conversion():
    """The other two families' blank-image forward: torchvision FCOS inside a LightningModule (a head shared over
    the FPN levels) and MMDetection's RTMDet-tiny (CSP blocks, a neck of upsampled Concats)."""
    pytest.importorskip("lightning.pytorch")
    pytest.importorskip("mmdet")
    from mmengine.config import Config
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from test_lightning import TinyFCOS

    from detq_hooks.session import QuantSession

    fcos = TinyFCOS()
    QuantSession(SHARED).convert(fcos)
    leaders = input_leaders(fcos)
    # a stage output that the next stage and the FPN lateral conv read; the head, called on every level, and the
    # P6 conv reading the top level: one quantizer; box and centerness layers reading one tower output
    assert leaders["model.backbone.fpn.inner_blocks.0.0"] == "model.backbone.body.layer3.0"
    assert leaders["model.head.regression_head.conv.0"] == leaders["model.head.classification_head.conv.0"] \
        == "model.backbone.fpn.extra_blocks.p6"
    assert leaders["model.head.regression_head.bbox_ctrness"] == "model.head.regression_head.bbox_reg"
    register_all_modules()
    from pathlib import Path

    cfg = Config.fromfile(str(Path(__file__).resolve().parents[1] / "integrations" / "mmdet" / "rtmdet_tiny_synthetic.py"))
    rtmdet = MODELS.build(cfg.model)
    QuantSession(SHARED).convert(rtmdet)
    leaders = input_leaders(rtmdet)
    assert leaders["backbone.stage1.1.short_conv.conv"] == "backbone.stage1.1.main_conv.conv"  # CSP split
    assert leaders["neck.top_down_blocks.0.short_conv.conv"] == "backbone.stage4.0.conv"  # upsample + Concat
    assert len(leaders) >= 12
