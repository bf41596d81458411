"""Integer convolutions of a fake-quant layer's inference pass (detq_hooks/integer_inference.py): the oneDNN int8 result
against the layer's float fake-quant path, the layouts it returns, the codes kernel, and every case that must keep
the float path."""

import pytest
import torch
from torch import nn

import detq_hooks as dq
from detq_hooks import integer_inference, kernels
from detq_hooks import quantizers as Q
from detq_hooks.modules import quantized_layers

pytestmark = pytest.mark.skipif(not integer_inference.available(),
                                reason="no int8 convolutions on this CPU (needs AVX512-VNNI, AVX-VNNI or AMX)")


@pytest.fixture(autouse=True)
def _every_size(monkeypatch):
    monkeypatch.setattr(integer_inference, "MIN_MACS_PER_THREAD", 0)  # small test layers take the integer path too


def _layer(ci=8, co=12, k=3, stride=1, padding=1, dilation=1, groups=1, bias=True, recipe="w8a8", seed=0,
           calibrate_shape=(2, 8, 11, 13)):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(ci, co, k, stride, padding, dilation, groups, bias=bias))
    dq.quantize(model, recipe)
    dq.calibrate(model, [torch.randn(calibrate_shape[0], ci, *calibrate_shape[2:]) * 2 + 0.5], progress=False)
    return model.eval(), model[0]


def _conv(layer, x):
    """The integer result of a weight's second call (the first keeps the float path: integer_inference packs a
    weight when it comes back)."""
    integer_inference.conv2d(layer, x)
    return integer_inference.conv2d(layer, x)


def _linear(layer, x):
    integer_inference.linear(layer, x)
    return integer_inference.linear(layer, x)


def _float_path(layer, x):
    with torch.no_grad():
        return layer._conv_forward(layer._quantize_input(x), layer.quantized_weight(), layer.bias)


def _agree(out, ref):
    assert out.shape == ref.shape
    err = (out - ref).abs().max().item()
    assert err <= 2e-6 * max(1.0, ref.abs().max().item()), err


W2A3 = {"quantization": {"weight": {"bits": 2}, "activation": {"bits": 3}}}


@pytest.mark.parametrize("recipe", ["w8a8", "w4a4", "w4a8", W2A3], ids=["w8a8", "w4a4", "w4a8", "w2a3"])
@pytest.mark.parametrize("conv", [dict(), dict(k=1, padding=0), dict(stride=2), dict(dilation=2, padding=2),
                                  dict(groups=4, ci=8, co=8), dict(bias=False, k=5, padding=2)])
def test_integer_inferenceolution_agrees_with_the_fake_quant_float_path(recipe, conv):
    _, layer = _layer(recipe=recipe, **conv)
    x = torch.randn(3, layer.in_channels, 11, 13) * 2 + 0.5
    with torch.no_grad():
        out = _conv(layer, x)
    assert out is not None
    _agree(out, _float_path(layer, x))
    assert out.is_contiguous()  # an NCHW input gives NCHW, as the float convolution does


def test_symmetric_activations_and_per_tensor_weights():
    recipe = {"quantization": {"weight": {"bits": 8, "per_channel": False},
                               "activation": {"bits": 8, "symmetric": True}}}
    _, layer = _layer(recipe=recipe)
    assert not layer.weight_quantizer.per_channel and layer.input_quantizer.symmetric
    x = torch.randn(2, 8, 9, 9) * 3
    with torch.no_grad():
        out = _conv(layer, x)
    assert out is not None
    _agree(out, _float_path(layer, x))


def test_layouts_channels_last_and_channel_slices():
    _, layer = _layer(ci=8)
    base = torch.randn(2, 16, 10, 12) * 2
    cl = base[:, :8].contiguous(memory_format=torch.channels_last)
    cl_slice = base.contiguous(memory_format=torch.channels_last).chunk(2, 1)[1]  # chunk of a channels-last map
    nchw_slice = base.chunk(2, 1)[1]  # chunk of an NCHW map (C3k2's split)
    strided = base[:, :8].transpose(2, 3)  # neither layout
    with torch.no_grad():
        for x, channels_last in ((cl, True), (cl_slice, True), (nchw_slice, False), (strided, False)):
            out = _conv(layer, x)
            assert out is not None
            _agree(out, _float_path(layer, x.contiguous()))
            ref_layout = nn.functional.conv2d(x, layer.weight, layer.bias, 1, 1)
            assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
            assert out.is_contiguous() == ref_layout.is_contiguous()


def test_codes_kernel_matches_the_quantizer_formula():
    ops = kernels.load()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 40, 6, 7, generator=g) * 4
    for s, lo, hi in ((0.03, -128.0, 127.0), (0.11, -20.0, 235.0), (0.5, -8.0, 7.0)):
        expected = torch.clamp(torch.round(x / torch.tensor(s)), lo, hi) - lo
        for layout in (x, x.contiguous(memory_format=torch.channels_last), x[:, ::2]):
            codes, has_nan = ops.per_tensor_codes_nhwc(layout, s, lo, hi)
            assert codes.dtype == torch.uint8 and codes.is_contiguous(memory_format=torch.channels_last)
            assert not bool(has_nan)
            ref = expected if layout.shape[1] == 40 else expected[:, ::2]
            assert torch.equal(codes.to(torch.float32), ref)
    y = x.clone()
    y[1, 3, 2, 2] = float("nan")
    assert bool(ops.per_tensor_codes_nhwc(y, 0.03, -128.0, 127.0)[1])
    with pytest.raises(RuntimeError, match="at most 256 values"):
        ops.per_tensor_codes_nhwc(x, 0.03, -300.0, 127.0)
    cl = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(ops.channels_last_to_contiguous(cl), x)


def test_cases_that_keep_the_float_path(monkeypatch):
    model, layer = _layer()
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        assert _conv(layer, x) is not None  # the weight is packed: each None below is the case's own
        nan = x.clone()
        nan[0, 0, 0, 0] = float("nan")
        assert _conv(layer, nan) is None  # no code for a NaN
        assert torch.isnan(layer(nan)).any()
        handle = layer.input_quantizer.register_forward_hook(lambda *a: None)  # someone watches the input
        assert integer_inference.conv2d(layer, x) is None
        handle.remove()
        assert _conv(layer, x.double()) is None
        monkeypatch.setenv("DETQ_NO_INT8_CONV", "1")
        assert integer_inference.conv2d(layer, x) is None
        monkeypatch.delenv("DETQ_NO_INT8_CONV")
        with Q.quantizer_mode("reference"):
            assert integer_inference.conv2d(layer, x) is None
    out = layer(x.requires_grad_())  # autograd on: the float path, with its graph
    assert out.requires_grad
    _, reflect = _layer()
    reflect.padding_mode = "reflect"
    _, asym = _layer(recipe={"quantization": {"weight": {"bits": 8, "symmetric": False, "kind": "fixed"}}})
    with torch.no_grad():
        assert _conv(reflect, x) is None
        assert _conv(asym, x) is None
    with torch.no_grad():  # broken ranges: the float path computes (and shows) what the fake-quant model does
        broken, layer_b = _layer()
        layer_b.input_quantizer.scale.fill_(float("inf"))
        assert _conv(layer_b, x) is None
        broken, layer_b = _layer()
        layer_b.weight_quantizer.scale[0] = float("nan")
        assert _conv(layer_b, x) is None
    monkeypatch.setattr(integer_inference, "MIN_MACS_PER_THREAD", 10**12)
    with torch.no_grad():
        assert integer_inference.conv2d(layer, x) is None  # too small to be worth a oneDNN call


def test_prepacked_weight_follows_weight_and_input_scale_updates():
    model, layer = _layer()
    x = torch.randn(2, 8, 9, 9) * 2
    with torch.no_grad():
        assert integer_inference.conv2d(layer, x) is None  # a weight seen once keeps the float path ...
        first = integer_inference.conv2d(layer, x)  # ... and is packed when it comes back
        assert first is not None
        _agree(first, _float_path(layer, x))
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    layer(x).square().mean().backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        assert integer_inference.conv2d(layer, x) is None  # a new weight: seen once again
        second = integer_inference.conv2d(layer, x)
        assert second is not None and not torch.allclose(first, second)
        _agree(second, _float_path(layer, x))
        layer.input_quantizer.scale.mul_(1.5)  # a new activation scale: new codes and a new packed weight
        third = _conv(layer, x)
        _agree(third, _float_path(layer, x))
        assert not torch.allclose(second, third)
        assert torch.equal(layer(x), third)  # the layer's own forward takes the integer path


def test_whole_yolo_model_matches_the_float_path(monkeypatch):
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    model = DetectionModel("yolo11n.yaml", nc=4, verbose=False).eval()
    dq.quantize(model, "w4a8")
    dq.calibrate(model, [torch.rand(2, 3, 96, 96)], progress=False)
    model.eval()
    x = torch.rand(2, 3, 96, 96)
    calls = []
    real = integer_inference.conv2d
    monkeypatch.setattr(integer_inference, "conv2d", lambda layer, t: calls.append(real(layer, t)) or calls[-1])
    layers = len(quantized_layers(model))
    with torch.no_grad():
        model(x)  # the first pass packs nothing (each weight seen once), the second runs every layer in int8
        ours = model(x)[0]
        monkeypatch.setenv("DETQ_NO_INT8_CONV", "1")
        ref = model(x)[0]
    assert calls[:layers] == [None] * layers
    assert sum(c is not None for c in calls[layers:2 * layers]) == layers
    assert (ours - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


@pytest.mark.parametrize("recipe", ["w8a8", "w4a4"])
def test_integer_linear_agrees_with_the_fake_quant_float_path(recipe):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(24, 40))
    dq.quantize(model, recipe)
    dq.calibrate(model, [torch.randn(16, 24) * 2 + 0.3], progress=False)
    model.eval()
    layer = model[0]
    for x in (torch.randn(7, 24) * 2, torch.randn(3, 5, 24) * 2, (torch.randn(24, 5, 3) * 2).permute(2, 1, 0)):
        with torch.no_grad():
            out = _linear(layer, x)
            ref = nn.functional.linear(layer._quantize_input(x), layer.quantized_weight(), layer.bias)
        assert out is not None and out.shape == ref.shape == (*x.shape[:-1], 40)
        _agree(out, ref)
