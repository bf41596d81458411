import copy
import io
import pickle

import pytest
import torch
from torch import nn

import detq_hooks as dq
from detq_hooks.modules import QuantConv2d, QuantConvTranspose2d, QuantLinear
from detq_hooks.recipe import RecipeError
from detq_hooks.surgery import QuantizationError

from core_models import AttentionModel, TinyDetector

HEADS = ["cls_head", "box_head", "pool_fc"]


def _model(seed=0):
    torch.manual_seed(seed)
    m = TinyDetector()
    for bn in m.modules():  # non-trivial BN statistics, some negative gammas
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(-1.5, 1.5)
            bn.bias.data.uniform_(-0.2, 0.2)
    return m.eval()


def _x(seed=1, n=2):
    torch.manual_seed(seed)
    return torch.randn(n, 3, 32, 32)


def _quantized(preset="w4a4", seed=0):
    m = dq.quantize(_model(seed), preset, prediction_layers=HEADS)
    dq.calibrate(m, [_x(s) for s in range(3)])
    return m


def _outputs_equal(a, b, atol=0.0):
    return all(torch.allclose(p, q, atol=atol, rtol=0) for p, q in zip(a, b))


def test_swaps_every_layer_with_default_exceptions():
    m = dq.quantize(_model(), "w4a4", prediction_layers=HEADS)
    assert isinstance(m.backbone[0], QuantConv2d) and isinstance(m.neck[0], QuantConvTranspose2d)
    assert isinstance(m.pool_fc, QuantLinear) and isinstance(m.backbone[0], nn.Conv2d)
    # first layer and prediction layers (and their inputs) at 8 bits, the rest at 4
    assert m.backbone[0].weight_quantizer.bits == 8 and m.backbone[0].input_quantizer.bits == 8
    for name in HEADS:
        layer = m.get_submodule(name)
        assert layer.weight_quantizer.bits == 8 and layer.input_quantizer.bits == 8
    assert m.backbone[3].weight_quantizer.bits == 4 and m.neck[2].input_quantizer.bits == 4
    assert dq.recipe_of(m).name == "w4a4"
    assert len(dq.quantized_layers(m)) == 8


def test_rules_exclude_and_override_bits():
    recipe = {"preset": "w4a8", "quantization": {"rules": [
        {"name": "neck.*", "quantize": False},
        {"name": "re:backbone\\.[36]", "weight_bits": 2},
        {"types": ["Linear"], "quantize_input": False},
    ]}}
    m = dq.quantize(_model(), recipe, prediction_layers=HEADS)
    assert type(m.neck[0]) is nn.ConvTranspose2d and type(m.neck[2]) is nn.Conv2d
    assert m.backbone[3].weight_quantizer.bits == 2 and m.backbone[6].weight_quantizer.bits == 2
    assert m.pool_fc.input_quantizer is None


def test_rule_matching_nothing_leaves_model_untouched():
    m = _model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(RecipeError, match=r"rules\[0\].*matches no quantizable module"):
        dq.quantize(m, {"preset": "w4a8", "quantization": {"rules": [{"name": "backbone.99"}]}})
    assert not dq.is_quantized(m) and set(m.state_dict()) == set(before)
    with pytest.raises(QuantizationError, match="`prediction_layers` names \\['head.nope'\\]"):
        dq.quantize(m, "w8a8", prediction_layers=["head.nope"])
    assert not dq.is_quantized(m)


def test_failure_mid_conversion_reverts_everything(monkeypatch):
    m = _model()
    types_before = [type(x) for x in m.modules()]

    def boom(*a, **k):
        raise RuntimeError("simulated failure while building a replacement")

    monkeypatch.setattr(QuantLinear, "from_float", classmethod(lambda cls, *a, **k: boom()))
    with pytest.raises(RuntimeError, match="simulated failure"):
        dq.quantize(m, "w8a8")
    assert [type(x) for x in m.modules()] == types_before
    assert not hasattr(m, "_detq_meta")


def test_already_quantized_is_an_error():
    m = dq.quantize(_model(), "w8a8")
    with pytest.raises(QuantizationError, match="already quantized"):
        dq.quantize(m, "w8a8")


def test_copy_pickle_dtype_and_state_dict_roundtrips():
    m = _quantized()
    x = _x(7)
    ref = m(x)
    assert _outputs_equal(copy.deepcopy(m)(x), ref)
    assert _outputs_equal(pickle.loads(pickle.dumps(m))(x), ref)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    assert _outputs_equal(torch.load(buf, weights_only=False)(x), ref)
    back = copy.deepcopy(m).half().float()
    assert _outputs_equal(back(x), ref, atol=0.05)
    fresh = dq.quantize(_model(seed=3), "w4a4", prediction_layers=HEADS)
    fresh.load_state_dict(m.state_dict())
    assert _outputs_equal(fresh(x), ref)


def test_quantized_function_is_close_to_float_and_changes_with_bits():
    x = _x(9)
    ref = _model()(x)
    err = {}
    for preset in ("w8a8", "w4a4"):
        out = _quantized(preset)(x)
        err[preset] = sum((o - r).abs().mean().item() / r.abs().mean().item() for o, r in zip(out, ref)) / 3
    assert err["w8a8"] < 0.03
    assert err["w8a8"] < err["w4a4"] < 0.6


def test_enable_disable_and_dequantize():
    m = _quantized()
    x = _x(5)
    float_out = _model()(x)
    assert dq.set_quantization_enabled(m, weights=False, activations=False) == 8
    assert _outputs_equal(m(x), float_out, atol=1e-6)
    dq.set_quantization_enabled(m, weights=True, activations=True, where=lambda n: n.startswith("backbone"))
    assert m.backbone[0].weight_quantizer.enabled and not m.cls_head.weight_quantizer.enabled
    dq.dequantize(m)
    assert not dq.is_quantized(m) and type(m.backbone[0]) is nn.Conv2d
    assert _outputs_equal(m(x), float_out, atol=1e-6)


def test_bn_folding_keeps_the_quantized_function():
    m = _quantized("w4a4")
    x = _x(11)
    conv, bn = m.backbone[3], m.backbone[4]
    ref = bn(conv(x_mid := m.backbone[:3](x)))
    dq.fold_batchnorm(conv, bn)
    assert torch.allclose(conv(x_mid), ref, atol=1e-5)
    # Ultralytics' fuse_conv_and_bn path: it rescales `weight_quantizer.amax` by the BN factor.
    m2 = _quantized("w4a4")
    conv2, bn2 = m2.backbone[6], m2.backbone[7]
    ref2 = bn2(conv2(x_mid2 := m2.backbone[:6](x)))
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    conv2.weight, conv2.bias = fuse_conv_bn_weights(conv2.weight, conv2.bias, bn2.running_mean, bn2.running_var,
                                                    bn2.eps, bn2.weight, bn2.bias)
    q = conv2.weight_quantizer
    q.amax = q.amax * (bn2.weight / torch.sqrt(bn2.running_var + bn2.eps)).abs().view_as(q.amax)
    assert torch.allclose(conv2(x_mid2), ref2, atol=1e-5)


def test_multihead_attention_out_proj_stays_float_and_is_reported():
    torch.manual_seed(0)
    m = AttentionModel()
    x = torch.randn(2, 5, 8)
    plan = dq.plan_quantization(m, dq.load_recipe("w8a8"))
    assert ("attn.out_proj", "read directly by nn.MultiheadAttention (out_proj.weight); kept float") in plan.skipped
    dq.quantize(m, "w8a8")
    assert isinstance(m.inp, QuantLinear) and not isinstance(m.attn.out_proj, QuantLinear)
    dq.calibrate(m, [x])
    from detq_hooks.report import quantization_report

    rep = quantization_report(m, [x])
    assert any(n == "attn.out_proj" for n, _ in rep.kept_float)


def test_module_swap_keeps_device_dtype_and_shares_parameters():
    conv = nn.Conv2d(3, 4, 3).double()
    q = QuantConv2d.from_float(conv, weight_spec={"bits": 8, "symmetric": True}, input_spec={"bits": 8, "symmetric": False})
    assert q.weight is conv.weight and q.weight.dtype == torch.float64
    back = q.to_float()
    assert type(back) is nn.Conv2d and back.weight is conv.weight and not hasattr(back, "weight_quantizer")
    with pytest.raises(TypeError, match="expects exactly Conv2d"):
        QuantConv2d.from_float(nn.Linear(2, 2), weight_spec={"bits": 8, "symmetric": True}, input_spec=None)


def test_shared_module_is_swapped_everywhere():
    shared = nn.Conv2d(3, 3, 1)
    m = nn.Sequential(shared, nn.ReLU(), shared)
    dq.quantize(m, "w8a8")
    assert m[0] is m[2] and isinstance(m[0], QuantConv2d)
