import copy
import io
import math

import pytest
import torch

from detq_hooks.quantizers import FakeQuantizer, fake_quantize_reference, quant_range, quantizer_mode


def _pair(bits, symmetric, per_channel, kind="lsq", c=4):
    torch.manual_seed(bits * 10 + int(symmetric) + 2 * int(per_channel))
    q = FakeQuantizer(bits=bits, symmetric=symmetric, per_channel=per_channel, num_channels=c, kind=kind,
                      role="weight" if per_channel else "activation")
    x = torch.randn(c, 3, 5, 5) * torch.linspace(0.5, 2.0, c).view(-1, 1, 1, 1)
    q.initialize_from(x)
    return q, x


def test_quant_ranges():
    assert quant_range(8, True) == (-127, 127)
    assert quant_range(4, True) == (-7, 7)
    assert quant_range(4, False) == (0, 15)
    assert quant_range(2, False) == (0, 3)


def test_known_values_and_clipping():
    q = FakeQuantizer(bits=4, symmetric=True, role="weight")
    q.set_range(torch.tensor([-1.4]), torch.tensor([1.4]))  # scale 0.2
    y = q(torch.tensor([0.31, -0.05, 5.0, -5.0]))
    assert torch.allclose(y, torch.tensor([0.4, 0.0, 1.4, -1.4]), atol=1e-6)
    a = FakeQuantizer(bits=4, symmetric=False)
    a.set_range(torch.tensor([-0.3]), torch.tensor([1.2]))  # scale 0.1, zero point 3
    assert a.zero_point.item() == 3
    assert torch.allclose(a(torch.tensor([-1.0, 0.0, 0.44, 3.0])), torch.tensor([-0.3, 0.0, 0.4, 1.2]), atol=1e-6)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric,per_channel,kind", [(True, True, "lsq"), (False, False, "lsq"), (False, False, "lsq_plus"), (True, False, "lsq")])
def test_fast_kernels_match_reference_forward_and_gradients(bits, symmetric, per_channel, kind):
    q, x = _pair(bits, symmetric, per_channel, kind)
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    g = torch.randn_like(x)
    out_fused = q(x1)
    (out_fused * g).sum().backward()
    grads_fused = (x1.grad.clone(), q.scale.grad.clone(), q.zero_point.grad.clone() if kind == "lsq_plus" else None)
    q.zero_grad()
    with quantizer_mode("reference"):
        out_ref = q(x2)
    (out_ref * g).sum().backward()
    assert torch.allclose(out_fused, out_ref, atol=1e-6)
    assert torch.allclose(x1.grad, x2.grad)
    assert torch.allclose(grads_fused[1], q.scale.grad, rtol=1e-4, atol=1e-6)
    if kind == "lsq_plus":
        assert torch.allclose(grads_fused[2], q.zero_point.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["lsq", "lsq_plus"])
def test_per_tensor_kernel_same_on_both_bound_paths(kind, monkeypatch):
    """The CPU path (zero point folded into Python-number clamp bounds) and the path other devices take
    (tensor zero point, no sync) give identical outputs, masks and gradients; NaN counts as out of range."""
    from detq_hooks import quantizers

    q, x = _pair(4, False, False, kind)
    x = torch.cat([x.reshape(-1), torch.tensor([float("nan"), 1e6, -1e6])])
    g = torch.randn_like(x)
    results = []
    for scalar in (True, False):
        monkeypatch.setattr(quantizers, "_scalar_bounds", lambda t, scalar=scalar: scalar)
        q.zero_grad()
        xi = x.clone().requires_grad_(True)
        out = q(xi)
        (out.nan_to_num() * g).sum().backward()
        results.append((out, xi.grad.clone(), q.scale.grad.clone(),
                        q.zero_point.grad.clone() if kind == "lsq_plus" else torch.zeros(1)))
    for a, b in zip(*results):
        assert torch.equal(a.nan_to_num(), b.nan_to_num())
    assert results[0][1][-3:].eq(0).all()  # NaN and the two far-out values get no input gradient


def test_lsq_scale_gradient_formula():
    # One element inside the range: d x_hat / d s = round(x/s) - x/s, times g = 1/sqrt(N * qmax).
    s, x = 0.3, torch.tensor([0.71])
    scale = torch.tensor([s], requires_grad=True)
    out = fake_quantize_reference(x, scale, torch.zeros(1), -7, 7, None, grad_factor=1.0 / math.sqrt(1 * 7))
    out.backward()
    expected = (round(0.71 / s) - 0.71 / s) / math.sqrt(7)
    assert scale.grad.item() == pytest.approx(expected, rel=1e-5)
    # Outside the range the gradient is qmax (resp. qmin) times g.
    scale.grad = None
    fake_quantize_reference(torch.tensor([9.0]), scale, torch.zeros(1), -7, 7, None, 1.0).backward()
    assert scale.grad.item() == pytest.approx(7.0)


def test_state_dict_roundtrip_and_flags():
    q, x = _pair(4, True, True)
    q.enabled = False
    sd = q.state_dict()
    assert {"scale", "zero_point", "bits_state", "enabled_state", "initialized_state"} <= set(sd)
    q2 = FakeQuantizer(bits=4, symmetric=True, per_channel=True, num_channels=4, role="weight")
    q2.load_state_dict(sd)
    assert not q2.enabled and q2.initialized and torch.equal(q2.scale, q.scale)
    assert torch.equal(q2(x), x)  # disabled quantizer passes through


def test_bits_mismatch_on_load_is_an_error():
    q8 = FakeQuantizer(bits=8, symmetric=True, role="weight")
    q4 = FakeQuantizer(bits=4, symmetric=True, role="weight")
    with pytest.raises(RuntimeError, match="quantized with 8 bits but this model has 4"):
        q4.load_state_dict(q8.state_dict())


def test_copy_pickle_half():
    q, x = _pair(4, False, False)
    y = q(x)
    assert torch.equal(copy.deepcopy(q)(x), y)
    buf = io.BytesIO()
    torch.save(q, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x), y)
    h = copy.deepcopy(q).half()
    assert h.bits == 4 and h.scale.dtype == torch.float16 and h.bits_state.dtype == torch.int32
    assert h(x.half()).dtype == torch.float16
    assert torch.allclose(h(x.half()).float(), y, atol=2e-2)


def test_invalid_construction():
    with pytest.raises(ValueError, match="`bits` = 9"):
        FakeQuantizer(bits=9, symmetric=True)
    with pytest.raises(ValueError, match="lsq_plus"):
        FakeQuantizer(bits=4, symmetric=True, kind="lsq_plus")


@pytest.mark.parametrize("per_channel", [False, True])
def test_step_size_pushed_below_zero_recovers(per_channel):
    """One too-large optimizer step can take a learned step size to or below zero. The floor in the forward
    must not cut its gradient, or the layer quantizes everything to zero for good."""
    q, x = _pair(4, per_channel, per_channel)
    with torch.no_grad():
        good = q.scale.clone()
        q.scale.fill_(-1e-4)
    assert (q(x) - x).pow(2).mean() > 0.9 * x.pow(2).mean()  # everything quantized to ~0
    opt = torch.optim.Adam([q.scale], lr=0.02)
    for _ in range(200):
        opt.zero_grad()
        (q(x) - x).pow(2).mean().backward()
        opt.step()
    assert (q.scale > 0).all()
    assert (q(x) - x).pow(2).mean() < 0.05 * x.pow(2).mean()
    assert torch.allclose(q.scale, good, rtol=0.5)
