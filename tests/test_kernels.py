"""Fused fake-quant kernels (detq_hooks/csrc/fakequant.cpp) against the reference formula and the PyTorch path,
the fallback when they cannot be built, and the quantized-weight cache of the layers."""

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from detq_hooks import kernels
from detq_hooks import quantizers as Q
from detq_hooks import modules as M
from detq_hooks.modules import QuantConv2d, QuantLinear
from detq_hooks.quantizers import FakeQuantizer, quantizer_mode

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"fused kernels not built: {kernels.status()}")

ROOT = Path(__file__).resolve().parents[1]


def _input(kind: str, seed: int, shape=(4, 6, 7, 9)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if kind == "saturated":  # most elements far outside the range, on both sides
        x = x * 50
    elif kind == "in_range":  # every element inside the range
        x = x.clamp(-0.9, 0.9) * 0.1
    return x


def _quantizer(bits, per_channel, kind, x, axis=0):
    q = FakeQuantizer(bits=bits, symmetric=per_channel, per_channel=per_channel, num_channels=x.shape[axis],
                      channel_axis=axis, kind=kind, role="weight" if per_channel else "activation")
    q.initialize_from(x if per_channel else x.clamp(-2, 2))
    if kind == "lsq_plus":
        with torch.no_grad():  # a zero point that is not the calibrated one, strictly inside (qmin, qmax): the
            # reference's clamp of the zero point passes no gradient at the bounds, the kernels' offset gradient does
            q.zero_point.copy_((q.zero_point + 1).clamp(q.qmin + 1, q.qmax - 1))
    return q


def _run(q, x, g, path):
    """Output, input gradient, scale gradient, zero-point gradient of q on x with upstream gradient g."""
    q.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_(True)
    if path == "reference":
        with quantizer_mode("reference"):
            out = q(xi)
    else:
        fused = Q._FUSED_ENABLED
        Q._FUSED_ENABLED = path == "fused"
        try:
            out = q(xi)
        finally:
            Q._FUSED_ENABLED = fused
    out.backward(g)
    zg = q.zero_point.grad.clone() if isinstance(q.zero_point, nn.Parameter) else None
    return out.detach(), xi.grad, q.scale.grad.clone(), zg


def _reference_mask(q, x):
    s = q.scale.detach().float().clamp_min(1e-8)
    z = q.zero_point.detach().float().round().clamp(q.qmin, q.qmax)
    if q.per_channel:
        shape = [1] * x.dim()
        shape[q.channel_axis] = -1
        s, z = s.reshape(shape), z.reshape(shape)
    code = torch.round(x / s) + z
    return (code >= q.qmin) & (code <= q.qmax)


def _fused_state_mask(q, x):
    """The in-range mask the fused forward stores for backward (decoded from its state)."""
    ops = kernels.load()
    z = q.zero_point.detach().round().clamp(q.qmin, q.qmax)
    if q.per_channel:
        s = q.scale.detach().clamp_min(1e-8).contiguous()
        _, st = ops.per_channel_fwd(x.contiguous(), s, (q.qmin - z).contiguous(), (q.qmax - z).contiguous(),
                                    q.channel_axis, True)
        return st.abs() <= 0.5
    s = float(q.scale.detach().clamp_min(1e-8))
    _, st = ops.per_tensor_fwd(x, s, q.qmin - float(z), q.qmax - float(z), True)
    return (st > -32767) & (st < 32767)


CASES = [(False, "lsq", 0), (False, "lsq_plus", 0), (True, "lsq", 0), (True, "lsq", 1)]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("per_channel,kind,axis", CASES)
@pytest.mark.parametrize("data", ["random", "saturated", "in_range"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_fused_matches_reference(bits, per_channel, kind, axis, data, layout):
    x = _input(data, bits * 7 + axis)
    q = _quantizer(bits, per_channel, kind, _input("random", 1), axis)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(bits)).contiguous(memory_format=torch.channels_last)
    f_out, f_gx, f_gs, f_gz = _run(q, x, g, "fused")
    r_out, r_gx, r_gs, r_gz = _run(q, x, g, "reference")
    mask = _reference_mask(q, x)
    if data == "in_range":
        assert mask.all()
    if data == "saturated":
        assert (~mask).float().mean() > 0.5
    # Exact: outputs, masks, input gradients (the reference's own input gradient is (g·s)/s, equal to g up to
    # one rounding, so the exact comparison is with g·mask).
    assert torch.equal(f_out, r_out)
    assert torch.equal(_fused_state_mask(q, x), mask)
    assert torch.equal(f_gx, torch.where(mask, g, 0.0))
    torch.testing.assert_close(f_gx, r_gx, rtol=1e-6, atol=0)
    if layout == "channels_last" and not per_channel:
        assert f_out.is_contiguous(memory_format=torch.channels_last)
    # Float tolerance: the scale and offset gradients are sums over the tensor.
    torch.testing.assert_close(f_gs, r_gs, rtol=1e-4, atol=1e-6)
    if kind == "lsq_plus":
        torch.testing.assert_close(f_gz, r_gz, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("kind", ["lsq", "lsq_plus"])
def test_fused_per_tensor_equals_pytorch_path_with_nan(bits, kind):
    """Against today's PyTorch per-tensor path (the fallback): identical outputs and input gradients, NaN
    included (out of range: no input gradient, NaN scale gradient, finite offset gradient)."""
    x = torch.cat([_input("random", 3).reshape(-1) * 3, torch.tensor([float("nan"), 1e6, -1e6, 0.0])])
    q = _quantizer(bits, False, kind, x[:-4])
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    f = _run(q, x, g, "fused")
    p = _run(q, x, g, "pytorch")
    assert torch.equal(f[0].nan_to_num(), p[0].nan_to_num()) and f[0][-4].isnan()
    assert torch.equal(f[1], p[1]) and f[1][-4:-1].eq(0).all()
    assert f[2].isnan().all() and p[2].isnan().all()
    if kind == "lsq_plus":
        torch.testing.assert_close(f[3], p[3], rtol=1e-5, atol=1e-7)
    xf = x[:-4]  # NaN-free: scale gradients agree
    gf = g[:-4]
    torch.testing.assert_close(_run(q, xf, gf, "fused")[2], _run(q, xf, gf, "pytorch")[2], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_scale_gradient_against_float64_formula(bits):
    """LSQ's scale gradient written out in float64 (gradcheck does not apply: the straight-through gradient is
    not the derivative of the piecewise-constant forward): g·(Σ_in grad·(round(v) − v) + Σ_out grad·(q − z))."""
    x = _input("random", 5, (8, 16, 12, 12)) * 2
    q = _quantizer(bits, False, "lsq", x)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    _, _, gs, _ = _run(q, x, g, "fused")
    s = float(q.scale.detach().clamp_min(1e-8))
    z = float(q.zero_point.round())
    v = (x / s).double()  # v as the kernel computes it (float32 division), then widened
    r = torch.round(v)
    code = r + z
    inside = (code >= q.qmin) & (code <= q.qmax)
    d = torch.where(inside, r - v, code.clamp(q.qmin, q.qmax) - z)
    expected = (g.double() * d).sum() / math.sqrt(x.numel() * q.qmax)
    # The in-range residual is stored to 1/65532 (|error| <= 7.7e-6 per element): float tolerance on the sum.
    assert gs.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-7)


def test_no_grad_forward_is_the_same_output_without_state():
    x = _input("random", 9) * 2
    q = _quantizer(4, False, "lsq", x)
    with torch.no_grad():
        y = q(x)
    assert y.grad_fn is None and not y.requires_grad
    assert torch.equal(y, _run(q, x, torch.ones_like(x), "reference")[0])
    w = _input("random", 10)
    qw = _quantizer(4, True, "lsq", w)
    with torch.no_grad():
        yw = qw(w)
    assert torch.equal(yw, _run(qw, w, torch.ones_like(w), "reference")[0])


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("case", ["half_zero_point", "below_floor", "saturated_zero_point", "nan", "channels_last",
                                  "nan_zero_point"])
def test_no_grad_activation_path_reads_the_same_bounds_as_the_autograd_one(bits, case):
    """Without autograd the activation quantizer reads its scale and zero point as Python numbers (one kernel
    call, no small tensor ops); the output must be bit for bit the autograd path's, at the edges of that reading:
    a zero point at .5 (round half to even), a scale under the floor, a zero point outside [qmin, qmax], NaN."""
    x = _input("random", 11) * 3
    q = _quantizer(bits, False, "lsq_plus", x)
    with torch.no_grad():
        if case == "half_zero_point":
            q.zero_point.fill_(q.qmin + 2.5)
        elif case == "below_floor":
            q.scale.fill_(1e-12)
        elif case == "saturated_zero_point":
            q.zero_point.fill_(q.qmax + 7.0)
        elif case == "nan":
            x[0, 0, 0, :3] = float("nan")
        elif case == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        elif case == "nan_zero_point":  # a broken range: whatever the tensor path gives, not a Python error
            q.zero_point.fill_(float("nan"))
    with torch.no_grad():
        fast = q(x)
        if case == "nan_zero_point":  # its bounds by tensor ops, as on the other no-grad path
            tensor_path = Q.fake_quantize_fused(x, Q.learned_scale(q.scale), q.zero_point, q.qmin, q.qmax, None, 1.0)
            assert torch.equal(fast.nan_to_num(), tensor_path.nan_to_num())
            return
    slow = q(x.clone().requires_grad_(True)).detach()  # the autograd path (fused kernel with its state)
    assert torch.equal(fast.isnan(), slow.isnan())
    assert torch.equal(fast.nan_to_num(), slow.nan_to_num())
    assert torch.equal(fast.nan_to_num(), _run(q, x, torch.ones_like(x), "reference")[0].nan_to_num())
    if case == "channels_last":
        assert fast.is_contiguous(memory_format=torch.channels_last)


def test_saved_state_is_two_bytes_per_activation_element():
    """The fused activation quantizer keeps 2 bytes per element for backward (the PyTorch path keeps the
    input, the output and a mask: 9 bytes)."""
    x = _input("random", 11, (2, 8, 32, 32)).requires_grad_(True)
    q = _quantizer(8, False, "lsq", x.detach())

    def saved_bytes(fused):
        total = []

        def pack(t):
            total.append(t.numel() * t.element_size())
            return t

        Q._FUSED_ENABLED = fused
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                q(x)
        finally:
            Q._FUSED_ENABLED = True
        return sum(total)

    # The step size's floor (straight-through) saves nothing.
    assert saved_bytes(True) == 2 * x.numel()
    assert saved_bytes(False) == 9 * x.numel() + 4  # x, out, mask and the 0-dim scale


def _backward_allocations(loss, numel):
    """The number of fresh float32 buffers of `numel` elements that `loss.backward()` allocates."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss.backward()
    return sum(1 for e in prof.events() if e.self_cpu_memory_usage == 4 * numel)


# per channel (weights) the kernels work on contiguous memory only
@pytest.mark.parametrize("per_channel,layout", [(False, "contiguous"), (False, "channels_last"), (True, "contiguous")])
def test_backward_writes_the_input_gradient_over_an_upstream_gradient_it_alone_holds(per_channel, layout):
    """A gradient made inside the backward (here by the multiplication's node) is referenced by the quantizer's
    node alone, so the input gradient is written over it: one activation-sized buffer in the whole backward (the
    multiplication's, then kept as x.grad) instead of two. Values as the reference's."""
    x = _input("random", 5, (2, 8, 16, 16))
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    q = _quantizer(4, per_channel, "lsq", _input("random", 1, (2, 8, 16, 16)))
    # in x's layout: an upstream gradient in another layout is first copied to the saved state's strides (a fresh
    # buffer, then written over)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).contiguous(memory_format=torch.channels_last
                                                                                   if layout == "channels_last"
                                                                                   else torch.contiguous_format)
    g_before = g.clone()
    xi = x.clone().requires_grad_(True)
    n_alloc = _backward_allocations((q(xi) * g).sum(), x.numel())
    f_gs = q.scale.grad.clone()
    r_out, r_gx, r_gs, _ = _run(q, x, g, "reference")
    assert n_alloc == 1
    assert torch.equal(xi.grad, torch.where(_reference_mask(q, x), g, 0.0))
    torch.testing.assert_close(f_gs, r_gs, rtol=1e-4, atol=1e-6)
    assert torch.equal(g, g_before)


def test_backward_leaves_gradients_others_hold_untouched():
    """An upstream gradient the caller passed, or one a hook or `retain_grad` keeps, is read, never written."""
    x = _input("random", 6, (2, 8, 16, 16)).requires_grad_(True)
    q = _quantizer(4, False, "lsq", x.detach())
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    mask = _reference_mask(q, x.detach())
    g_before = g.clone()
    (gx,) = torch.autograd.grad(q(x), [x], g)
    assert torch.equal(g, g_before) and torch.equal(gx, torch.where(mask, g, 0.0))

    kept = []
    out = q(x)
    out.retain_grad()
    scaled = out * 2.0
    scaled.register_hook(lambda t: kept.append(t))
    (scaled * g).sum().backward()
    assert torch.equal(kept[0], g) and torch.equal(out.grad, 2.0 * g)
    assert torch.equal(x.grad, torch.where(mask, 2.0 * g, 0.0))


def test_weight_quantizer_keeps_only_the_weight_for_backward():
    """Per-channel (weights): the backward recomputes the residual from the weight as it reduces, so the forward
    keeps the weight itself (a parameter, alive anyway: no copy) and the per-channel bounds (step size, lowest and
    highest code), nothing weight-sized of its own."""
    w = nn.Parameter(_input("random", 12, (16, 8, 3, 3)))
    q = _quantizer(4, True, "lsq", w.detach())
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((t.data_ptr(), t.numel())) or t, lambda t: t):
        q(w)
    assert sorted(n for _, n in saved) == [16, 16, 16, w.numel()]
    assert [p for p, n in saved if n == w.numel()] == [w.data_ptr()]


def test_fallback_without_compiler_warns_once_and_keeps_results(tmp_path):
    """No compiler: one warning that says why and how to get the fused kernels; the PyTorch path runs and gives
    the reference's outputs."""
    code = textwrap.dedent(
        """
        import warnings, torch
        warnings.simplefilter("always")
        from detq_hooks.quantizers import FakeQuantizer, quantizer_mode
        from detq_hooks import kernels
        q = FakeQuantizer(bits=4, symmetric=False)
        x = torch.randn(2, 3, 8, 8)
        q.initialize_from(x)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y1 = q(x.requires_grad_(True)); y1.sum().backward()
            y2 = q(x)
        with quantizer_mode("reference"):
            ref = q(x)
        msgs = [str(w.message) for w in caught if "fused fake-quant" in str(w.message)]
        print("WARNINGS", len(msgs))
        print("MSG", msgs[0] if msgs else "")
        print("AVAILABLE", kernels.available())
        print("EQUAL", bool(torch.equal(y1, ref) and torch.equal(y2, ref)))
        """
    )
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), DETQ_KERNELS_DIR=str(tmp_path / "k"),
               PYTHONPATH=str(ROOT), DETQ_NO_FUSED_KERNELS="")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    assert "WARNINGS 1" in out
    assert "could not be built" in out and "install a C++ compiler" in out
    assert "AVAILABLE False" in out and "EQUAL True" in out


# --------------------------------------------------------------------- quantizer reading a SiLU's / ReLU's output
ACTIVATIONS = {
    "silu": lambda t: torch.nn.functional.silu(t),
    "silu_": lambda t: torch.nn.functional.silu(t, inplace=True),
    "relu": lambda t: torch.relu(t),
    "relu_": lambda t: torch.relu_(t),
}


def _activation_fed(q, a0, g, act, fused, readers=1, layout="contiguous"):
    """a -> (a*1) -> activation -> quantizer (and, with readers=2, a second reader of the activation's output);
    returns the output, the gradients of a, scale and offset, and the name of the output's node's first input."""
    q.zero_grad(set_to_none=True)
    a = a0.clone()
    if layout == "channels_last":
        a = a.contiguous(memory_format=torch.channels_last)
    a.requires_grad_(True)
    y = ACTIVATIONS[act](a * 1.0)
    out = q(y if fused else y.clone())  # a clone's node is no activation: the ordinary quantizer node
    loss = (out * g).sum() + ((y * y).sum() if readers == 2 else 0.0)
    loss.backward()
    zg = q.zero_point.grad.clone() if q.zero_point.grad is not None else None
    sg = q.scale.grad.clone() if q.scale.grad is not None else None
    return out.detach(), a.grad, sg, zg, type(out.grad_fn.next_functions[0][0]).__name__


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("kind", ["lsq", "lsq_plus"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("readers", [1, 2])
@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_activation_fed_quantizer_stands_for_the_activation_with_the_same_values(bits, kind, layout, readers, act):
    """An activation quantizer reading a SiLU's or ReLU's output (in place or not) attaches its node to the
    activation's input: the output is the ordinary node's, bit for bit; the gradients reaching a are the
    activation's backward of the ordinary ones (ReLU exactly; SiLU to float tolerance, silu' computed in the
    kernel) with the same zeros (in-range mask), also when another reader of the activation's output sends its
    gradient through the activation's own node; scale/offset gradients to float tolerance. Sizes with a vector
    tail, several chunks and a saturated part."""
    a0 = torch.randn(3, 8, 29, 31, generator=torch.Generator().manual_seed(bits)) * 4
    q = _quantizer(bits, False, kind, ACTIVATIONS[act](a0.clone()))
    g = torch.randn(a0.shape, generator=torch.Generator().manual_seed(7))
    f_out, f_ga, f_gs, f_gz, f_node = _activation_fed(q, a0, g, act, True, readers, layout)
    r_out, r_ga, r_gs, r_gz, r_node = _activation_fed(q, a0, g, act, False, readers, layout)
    assert f_node == "MulBackward0" and r_node == "CloneBackward0"  # the fused node's input is a*1
    assert torch.equal(f_out, r_out)
    if layout == "channels_last":
        assert f_out.is_contiguous(memory_format=torch.channels_last)
    if readers == 1:
        assert torch.equal(f_ga == 0, r_ga == 0)
        assert (f_ga == 0).float().mean() > 0.05  # the range clips some: the mask is exercised
        if act.startswith("relu"):
            assert torch.equal(f_ga, r_ga)
    torch.testing.assert_close(f_ga, r_ga, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(f_gs, r_gs, rtol=1e-4, atol=1e-6)
    if kind == "lsq_plus":
        torch.testing.assert_close(f_gz, r_gz, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("act", ["silu", "relu_"])
def test_activation_fed_quantizer_keeps_nothing_of_its_own_for_backward(act):
    """It keeps the tensor the activation's node keeps anyway (SiLU: its input; ReLU: its output), no state."""
    pre = torch.randn(2, 8, 32, 32, requires_grad=True) * 1.0
    keep = pre.data_ptr()
    y = ACTIVATIONS[act](pre)
    q = _quantizer(8, False, "lsq", y.detach())
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.data_ptr()) or t, lambda t: t):
        q(y)
    assert saved == [keep if act == "silu" else y.data_ptr()]


@pytest.mark.parametrize("case", ["view", "nan", "no_grad_scale", "scale_only"])
def test_activation_fed_quantizer_on_other_inputs(case):
    """A view of an activation's output takes the ordinary node; a NaN before the SiLU gives the ordinary output
    and a NaN scale gradient; a quantizer whose scale needs no gradient still gives a's; asked for the step
    size's gradient only, it leaves the caller's upstream gradient untouched."""
    a0 = torch.randn(2, 8, 16, 16, generator=torch.Generator().manual_seed(2)) * 3
    q = _quantizer(4, False, "lsq", torch.nn.functional.silu(a0))
    if case == "view":
        out = q(torch.nn.functional.silu(a0.clone().requires_grad_(True) * 1.0)[:, :4])
        assert type(out.grad_fn.next_functions[0][0]).__name__ != "MulBackward0"
    elif case == "nan":
        a0[0, 0, 0, 0] = float("nan")
        g = torch.ones_like(a0)
        f = _activation_fed(q, a0, g, "silu", True)
        r = _activation_fed(q, a0, g, "silu", False)
        assert f[4] == "MulBackward0"
        assert torch.equal(torch.nan_to_num(f[0], 7.0), torch.nan_to_num(r[0], 7.0))
        assert f[2].isnan().all() and r[2].isnan().all()
    elif case == "scale_only":  # only the step size's gradient asked for, with a gradient the caller holds
        g = torch.randn(a0.shape, generator=torch.Generator().manual_seed(5))
        g_before = g.clone()
        grads = []
        for fused in (True, False):
            y = torch.nn.functional.silu(a0.clone().requires_grad_(True) * 1.0)
            (gs,) = torch.autograd.grad(q(y if fused else y.clone()), [q.scale], g)
            grads.append(gs)
        assert torch.equal(g, g_before)
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    else:
        q.scale.requires_grad_(False)
        q.zero_point.requires_grad_(False)
        g = torch.randn(a0.shape, generator=torch.Generator().manual_seed(3))
        f = _activation_fed(q, a0, g, "silu", True)[1]
        q.scale.requires_grad_(True)
        q.zero_point.requires_grad_(True)
        torch.testing.assert_close(f, _activation_fed(q, a0, g, "silu", False)[1], rtol=1e-5, atol=1e-6)


class _Blocks(nn.Module):
    """SiLU and in-place ReLU conv blocks whose outputs are read by several quantized layers, a chunk, a concat
    and a residual add: the graph shapes of YOLO's C2f/C3k2 and ResNet's blocks."""

    def __init__(self):
        super().__init__()

        def block(c1, c2, act):
            return nn.Sequential(nn.Conv2d(c1, c2, 3, padding=1, bias=False), nn.BatchNorm2d(c2), act)

        self.stem = block(3, 16, nn.SiLU())
        self.a = block(16, 16, nn.SiLU())
        self.b = block(8, 8, nn.ReLU(inplace=True))
        self.c = block(24, 16, nn.SiLU())
        self.d = block(16, 16, nn.ReLU(inplace=True))
        self.e = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        s = self.stem(x)
        a = self.a(s)
        left, right = a.chunk(2, 1)
        c = self.c(torch.cat([left, right, self.b(right)], 1))
        d = self.d(c)  # in-place ReLU, read by e and by the add
        return self.e(d) + (d + c + s).mean(), s  # c read by d and the add; s by a and the add


def test_whole_model_gradients_with_fused_activations_match_the_reference_formula():
    """A training step of a model mixing SiLU and in-place ReLU blocks, outputs read several times: every
    parameter's gradient (weights, BN, step sizes and offsets) as the reference formula's, to float tolerance, and
    the fused nodes are in the graph."""
    import detq_hooks as dq

    torch.manual_seed(0)
    model = _Blocks()
    dq.quantize(model, "w4a4")
    x = torch.randn(2, 3, 24, 24)
    dq.calibrate(model, [x], progress=False)
    model.train()
    grads = {}
    for mode in ("fused", "reference"):
        model.zero_grad(set_to_none=True)
        with quantizer_mode(mode):
            out, s = model(x)
            (out.square().mean() + s.mean()).backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        if mode == "fused":
            names = set()

            def walk(fn, seen=set()):
                if fn is None or fn in seen:
                    return
                seen.add(fn)
                names.add(fn.name())
                for nxt, _ in fn.next_functions:
                    walk(nxt)

            walk(out.grad_fn)
            assert {"SiluFakeQuantBackward", "ReluFakeQuantBackward"} <= names
    assert grads["fused"].keys() == grads["reference"].keys() and len(grads["fused"]) > 20
    for n, g in grads["fused"].items():
        torch.testing.assert_close(g, grads["reference"][n], rtol=2e-4, atol=1e-6, msg=n)


def test_activation_fusion_can_be_turned_off():
    code = textwrap.dedent(
        """
        import torch
        from detq_hooks.quantizers import FakeQuantizer
        y = torch.nn.functional.silu(torch.randn(2, 3, 8, 8, requires_grad=True) * 1.0)
        q = FakeQuantizer(bits=4, symmetric=False)
        q.initialize_from(y.detach())
        print("NODE", type(q(y).grad_fn.next_functions[0][0]).__name__)
        """
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT), DETQ_NO_ACTIVATION_FUSION="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "NODE SiluBackward0" in res.stdout


# ------------------------------------------------------------------------------------------- weight cache
def _qconv(c=8, seed=0):
    torch.manual_seed(seed)
    conv = QuantConv2d.from_float(nn.Conv2d(c, c, 3, padding=1), weight_spec=dict(bits=4, symmetric=True),
                                  input_spec=None)
    conv.weight_quantizer.initialize_from(conv.weight)
    calls = []
    conv.weight_quantizer.register_forward_hook(lambda *a: calls.append(1))
    return conv, calls


def test_shared_layer_quantizes_its_weight_once_per_step_with_the_same_gradients():
    conv, calls = _qconv()
    xs = [torch.randn(2, 8, s, s) for s in (16, 8, 4, 2, 1)]  # five pyramid levels, as FCOS's shared head
    sum(conv(x).square().sum() for x in xs).backward()
    assert len(calls) == 1
    cached = (conv.weight.grad.clone(), conv.weight_quantizer.scale.grad.clone())
    conv.zero_grad()
    with quantizer_mode("reference"):  # no cache: five quantizations
        sum(conv(x).square().sum() for x in xs).backward()
    assert len(calls) == 6
    torch.testing.assert_close(cached[0], conv.weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cached[1], conv.weight_quantizer.scale.grad, rtol=1e-4, atol=1e-6)


def test_weight_cache_invalidation():
    conv, calls = _qconv()
    x = torch.randn(2, 8, 6, 6)
    opt = torch.optim.SGD(conv.parameters(), lr=0.1)
    conv(x).sum().backward()
    conv(x).sum().backward()  # gradient accumulation: the first graph is freed, so the weight is quantized again
    assert len(calls) == 2
    opt.step()
    y = conv(x)
    assert len(calls) == 3
    with quantizer_mode("reference"):
        assert torch.equal(y, conv(x))  # the updated weight is the one quantized
    conv.eval()
    with torch.no_grad():
        for _ in range(3):  # validation: once for all batches
            conv(x)
        assert len(calls) == 5  # (+1 reference call above)
        conv.weight.mul_(0.5)  # an in-place change moves the version counter
        y = conv(x)
        assert len(calls) == 6
        conv.weight_quantizer.scale.data.mul_(2.0)  # `.data` does not: the cached scale's content is compared
        y2 = conv(x)
        assert len(calls) == 7 and not torch.equal(y, y2)
        conv.weight_quantizer.bits = 8
        conv(x)
        assert len(calls) == 8


# ------------------------------------------------------------------ training keeps the parameter, not Q(w)
def _recompute_pair(kind, bits, seed=0):
    """Two identical quantized layers (the second for the path that keeps the quantized weight)."""
    def make():
        torch.manual_seed(seed)
        if kind == "linear":
            layer = QuantLinear.from_float(nn.Linear(12, 7), weight_spec=dict(bits=bits, symmetric=True),
                                           input_spec=dict(bits=8, symmetric=False))
            x = torch.randn(3, 5, 12)
        else:
            groups, stride, dilation, bias = {"conv": (1, 1, 1, True), "grouped": (2, 2, 1, False),
                                              "depthwise": (8, 1, 2, True)}[kind]
            layer = QuantConv2d.from_float(nn.Conv2d(8, 8 if groups == 8 else 6, 3, stride, 2 if dilation == 2 else 1,
                                                     dilation, groups, bias), weight_spec=dict(bits=bits, symmetric=True),
                                           input_spec=dict(bits=8, symmetric=False))
            x = torch.randn(2, 8, 11, 11)
        layer.weight_quantizer.initialize_from(layer.weight)
        layer.input_quantizer.initialize_from(x)
        return layer, x * 1.3
    return make(), make()


# the graph nodes of a convolution that quantizes its weight again in backward: the compiled one (a quantized input)
# and the Python Function (an input kept in float: a ReLU's output or the image batch; or the compiled node switched off)
COMPILED_CONV_NODE = "torch::autograd::CppNode<(anonymous namespace)::ConvRecomputedWeight>"
RECOMPUTED_CONV_NODES = ("_ConvRecomputedBackward", COMPILED_CONV_NODE)
COMPILED_LINEAR_NODE = "torch::autograd::CppNode<(anonymous namespace)::LinearRecomputedWeight>"


def _train_grads(layer, x, monkeypatch, recompute: bool, channels_last=False, compiled=True):
    monkeypatch.setattr(M, "_RECOMPUTE_WEIGHTS", recompute)
    monkeypatch.setattr(M, "_COMPILED_NODES", compiled)
    x = x.clone()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    y = layer(x)
    node = y.grad_fn.name()
    torch.relu_(y)  # an in-place op on the output (a transformer's ReLU or dropout): refused if it were a view
    (y.square().sum() + y.sum()).backward()
    return y, [x.grad] + [p.grad for p in layer.parameters()], node


@pytest.mark.parametrize("kind", ["conv", "grouped", "depthwise", "linear"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_layer_that_quantizes_its_weight_again_in_backward_gives_the_same_gradients(kind, bits, monkeypatch):
    """Training keeps the parameter (held anyway) instead of the quantized weight and quantizes it again in the
    backward: outputs and every gradient (input, weight, bias, weight and input step sizes) are bit for bit those of
    the layer that keeps the quantized weight; channels-last inputs too. Each layer does it twice: as the compiled node
    (the default) and as the Python Function, which must agree with each other bit for bit as well."""
    (a, x), (b, _) = _recompute_pair(kind, bits)
    (c, _), _ = _recompute_pair(kind, bits)
    for channels_last in ([False, True] if kind != "linear" else [False]):
        for layer in (a, b, c):
            layer.zero_grad()
        ya, ga, node_a = _train_grads(a, x, monkeypatch, True, channels_last)
        yb, gb, node_b = _train_grads(b, x, monkeypatch, False, channels_last)
        yc, gc, node_c = _train_grads(c, x, monkeypatch, True, channels_last, compiled=False)
        if kind == "linear":
            assert node_a == COMPILED_LINEAR_NODE and node_c == "_LinearRecomputedWeightBackward"
        else:
            assert node_a == COMPILED_CONV_NODE and node_c == "_ConvRecomputedBackward"
        assert "Recomputed" not in node_b
        assert torch.equal(ya, yb) and torch.equal(yc, yb)
        assert len(ga) == len(gb) == len(gc) and all(g is not None for g in ga + gc)
        for g1, g2, g3 in zip(ga, gb, gc):
            assert torch.equal(g1, g2) and torch.equal(g3, g2)


def test_recomputing_layer_keeps_no_weight_sized_tensor_for_backward(monkeypatch):
    monkeypatch.setattr(M, "_RECOMPUTE_WEIGHTS", True)
    torch.manual_seed(0)
    conv = QuantConv2d.from_float(nn.Conv2d(64, 64, 3, padding=1), weight_spec=dict(bits=4, symmetric=True),
                                  input_spec=None)
    conv.weight_quantizer.initialize_from(conv.weight)
    x = torch.randn(1, 64, 4, 4, requires_grad=True)
    params = {p.untyped_storage().data_ptr() for p in conv.parameters()} | {
        p.untyped_storage().data_ptr() for p in conv.weight_quantizer.parameters()}
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved.append(t.numel())
        return t

    for recompute, weight_sized in ((True, 0), (False, 1)):
        monkeypatch.setattr(M, "_RECOMPUTE_WEIGHTS", recompute)
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = conv(x)
        assert saved.count(conv.weight.numel()) == weight_sized, saved  # the quantized weight, a fresh tensor
        assert x.numel() in saved  # the input, as for any convolution
        y.sum().backward()


def test_shared_layer_and_gradient_accumulation(monkeypatch):
    """A layer called again before any backward (FCOS's head over five levels) is marked shared and takes the cached
    quantized weight (quantized once per step) from then on; gradient accumulation, a backward between the calls,
    does not mark it; the gradients are the reference's either way."""
    monkeypatch.setattr(M, "_RECOMPUTE_WEIGHTS", True)
    (conv, _), (ref, _) = _recompute_pair("conv", 4)
    # inputs that require a gradient: the layer keeps its quantized input (the float one is kept by nobody else)
    xs = [torch.randn(2, 8, s, s, requires_grad=True) for s in (16, 8, 4)]
    for _ in range(3):  # accumulation: one level per backward
        for x in xs:
            y = conv(x)
            assert y.grad_fn.name() == COMPILED_CONV_NODE
            y.square().sum().backward()
    assert conv not in M._SHARED
    conv.zero_grad()
    nodes = [conv(x).grad_fn.name() for x in xs]
    assert nodes[0] == COMPILED_CONV_NODE and set(nodes[1:]) == {"ConvolutionBackward0"}
    assert conv in M._SHARED
    conv.zero_grad()
    sum(conv(x).square().sum() for x in xs).backward()
    with quantizer_mode("reference"):
        sum(ref(x).square().sum() for x in xs).backward()
    torch.testing.assert_close(conv.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(conv.weight_quantizer.scale.grad, ref.weight_quantizer.scale.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("compiled", [True, False])
def test_recomputing_layer_with_a_frozen_weight_and_refusing_a_double_backward(compiled, monkeypatch):
    monkeypatch.setattr(M, "_RECOMPUTE_WEIGHTS", True)
    (a, x), (b, _) = _recompute_pair("conv", 4)
    for layer in (a, b):
        layer.weight.requires_grad_(False)  # a frozen curriculum stage: the step sizes still learn
    ga = _train_grads(a, x, monkeypatch, True, compiled=compiled)[1]
    gb = _train_grads(b, x, monkeypatch, False, compiled=compiled)[1]
    assert a.weight.grad is None and b.weight.grad is None
    for g1, g2 in zip(ga, gb):
        assert (g1 is None and g2 is None) or torch.equal(g1, g2)
    monkeypatch.setattr(M, "_RECOMPUTE_WEIGHTS", True)
    a.weight.requires_grad_(True)
    xr = x.clone().requires_grad_()
    y = a(xr)
    assert y.grad_fn.name() == RECOMPUTED_CONV_NODES[compiled]
    with pytest.raises(RuntimeError, match="no double backward.*quantizer_mode\\('reference'\\)"):
        torch.autograd.grad(y.square().sum(), a.weight, create_graph=True)


def test_recomputing_layer_leaves_autocast_to_the_ordinary_path(monkeypatch):
    monkeypatch.setattr(M, "_RECOMPUTE_WEIGHTS", True)
    (conv, x), _ = _recompute_pair("conv", 8)
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    assert y.dtype == torch.bfloat16 and y.grad_fn.name() not in RECOMPUTED_CONV_NODES
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and conv.weight.grad is not None


@pytest.mark.parametrize("reentrant", [False, True])
def test_recomputing_layers_under_activation_checkpointing(reentrant, monkeypatch):
    """torch.utils.checkpoint (MMDetection backbones' with_cp) runs the layers again in backward: the gradients over
    two steps equal a plain run's, bit for bit."""
    from torch.utils.checkpoint import checkpoint

    monkeypatch.setattr(M, "_RECOMPUTE_WEIGHTS", True)

    def stack():
        torch.manual_seed(0)
        layers = nn.Sequential(*[QuantConv2d.from_float(nn.Conv2d(4, 4, 3, padding=1), weight_spec=dict(bits=4, symmetric=True),
                                                        input_spec=dict(bits=8, symmetric=False)) for _ in range(3)])
        for c in layers:
            c.weight_quantizer.initialize_from(c.weight)
            c.input_quantizer.initialize_from(torch.randn(2, 4, 6, 6))
        # ReLUs between the layers: the second and third keep the ReLU's output, not their quantized input
        return nn.Sequential(layers[0], nn.ReLU(), layers[1], nn.ReLU(inplace=True), layers[2])

    x = torch.randn(2, 4, 6, 6)
    plain, checkpointed = stack(), stack()
    plain(x.clone().requires_grad_()).square().sum().backward()  # as checkpoint() gets it
    for _ in range(2):
        checkpointed.zero_grad()
        checkpoint(checkpointed, x.clone().requires_grad_(), use_reentrant=reentrant).square().sum().backward()
        for a, b in zip(checkpointed.parameters(), plain.parameters()):
            assert torch.equal(a.grad, b.grad)
    assert not any(c in M._SHARED for c in checkpointed)
    assert plain[2](torch.relu(x.requires_grad_())).grad_fn.name() == COMPILED_CONV_NODE


def test_keep_quantized_weights_switch():
    code = textwrap.dedent("""
        import torch
        from torch import nn
        from detq_hooks.modules import QuantConv2d
        conv = QuantConv2d.from_float(nn.Conv2d(4, 4, 3), weight_spec=dict(bits=4, symmetric=True), input_spec=None)
        conv.weight_quantizer.initialize_from(conv.weight)
        print("NODE", conv(torch.randn(1, 4, 5, 5)).grad_fn.name())
    """)
    for value, node in (("1", "ConvolutionBackward0"), ("0", COMPILED_CONV_NODE)):
        env = dict(os.environ, PYTHONPATH=str(ROOT), DETQ_KEEP_QUANTIZED_WEIGHTS=value)
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        assert f"NODE {node}" in res.stdout



# ------------------------------------------------------------------ training keeps a ReLU's output, not Qa(relu(a))
def _relu_stack(act_bits, w_bits, channels_last):
    """A ReLU network of quantized convolutions (ResNet blocks, FCOS's tower) and its float input."""
    torch.manual_seed(0)
    layers = []
    for _ in range(3):
        c = QuantConv2d.from_float(nn.Conv2d(8, 8, 3, padding=1), weight_spec=dict(bits=w_bits, symmetric=True),
                                   input_spec=dict(bits=act_bits, symmetric=False))
        c.weight_quantizer.initialize_from(c.weight)
        c.input_quantizer.initialize_from(torch.rand(2, 8, 9, 9) * 0.8)
        layers.append(c)
    x = torch.randn(2, 8, 9, 9)
    return layers, x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _relu_stack_step(monkeypatch, keep, inplace, act_bits=8, w_bits=4, channels_last=False, shared_last=False,
                     compiled=True):
    monkeypatch.setattr(M, "_RECOMPUTE_WEIGHTS", keep)
    monkeypatch.setattr(M, "_COMPILED_NODES", compiled)
    monkeypatch.setattr(M, "_SHARED", __import__("weakref").WeakSet())
    layers, x = _relu_stack(act_bits, w_bits, channels_last)
    h = layers[0](x)  # the image batch: outside autograd, held by the caller
    nodes = [h.grad_fn.name()]
    for c in layers[1:] + (layers[-1:] if shared_last else []):
        h = c(torch.relu_(h) if inplace else torch.relu(h))
        nodes.append(h.grad_fn.name())
    (h.square().sum() + h.sum()).backward()
    return h, [(n, p.grad) for c in layers for n, p in c.named_parameters()], nodes


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("act_bits,w_bits", [(8, 8), (8, 4), (4, 4), (2, 2)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("compiled", [True, False])
def test_layer_keeping_its_float_relu_input_gives_the_same_gradients(inplace, act_bits, w_bits, channels_last, compiled,
                                                                     monkeypatch):
    """A convolution whose input is a ReLU's output (kept by the ReLU's node) or the image batch keeps that float
    input for backward and quantizes it again there: outputs and every gradient (weights, biases, weight and input
    step sizes and offsets) are bit for bit those of the layer that keeps its quantized input. The layers after a
    ReLU run as the compiled node, or (switched off) as the Python Function; the image layer is always the latter."""
    ya, ga, nodes_a = _relu_stack_step(monkeypatch, True, inplace, act_bits, w_bits, channels_last, compiled=compiled)
    yb, gb, nodes_b = _relu_stack_step(monkeypatch, False, inplace, act_bits, w_bits, channels_last)
    assert nodes_a == ["_ConvRecomputedBackward"] + [RECOMPUTED_CONV_NODES[compiled]] * 2
    assert nodes_b == ["ConvolutionBackward0"] * 3
    assert torch.equal(ya, yb)
    assert [n for n, _ in ga] == [n for n, _ in gb] and len(ga) == 12  # weight, bias, the two step sizes
    for i, ((name, g1), (_, g2)) in enumerate(zip(ga, gb)):
        if i == 3:  # the image's step size: a forward convolution of the tangent (another order of summation)
            assert name == "input_quantizer.scale"
            torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-7)
        else:
            assert g1 is not None and torch.equal(g1, g2), name
    assert any(n.startswith("input_quantizer.scale") and g.abs().sum() > 0 for n, g in ga)



@pytest.mark.parametrize("kind", ["lsq", "lsq_plus"])
@pytest.mark.parametrize("geometry", [(1, 1, 1), (2, 1, 1), (1, 3, 1), (2, 1, 2)])  # stride, groups, dilation
@pytest.mark.parametrize("channels_last", [False, True])
def test_layer_on_the_image_learns_its_input_range_without_an_input_gradient(kind, geometry, channels_last,
                                                                              monkeypatch):
    """On a tensor outside autograd (the image batch) the layer gives its input quantizer's step-size and offset
    gradients from a forward convolution of the quantizer's tangent, not from an input gradient: the same as the
    reference arithmetic's to float rounding, with the output and the weight's gradients bit for bit the ordinary
    path's; saturated, all-in-range and NaN inputs alike."""
    stride, groups, dilation = geometry

    def make():
        torch.manual_seed(0)
        conv = QuantConv2d.from_float(nn.Conv2d(3 * groups, 6, 3, stride, dilation, dilation, groups),
                                      weight_spec=dict(bits=8, symmetric=True),
                                      input_spec=dict(bits=8, symmetric=False, kind=kind))
        conv.weight_quantizer.initialize_from(conv.weight)
        conv.input_quantizer.set_range(torch.tensor(-0.2), torch.tensor(0.9))
        return conv

    torch.manual_seed(1)
    images = {"mixed": torch.rand(2, 3 * groups, 17, 17) * 1.4 - 0.3, "inside": torch.rand(2, 3 * groups, 17, 17) * 0.6,
              "saturated": torch.rand(2, 3 * groups, 17, 17) * 4 + 1}
    for case, x in images.items():
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        grads = {}
        for path in ("ours", "ordinary", "reference"):
            monkeypatch.setattr(M, "_RECOMPUTE_WEIGHTS", path == "ours")
            conv = make()
            with quantizer_mode("reference" if path == "reference" else "fused"):
                y = conv(x)
                assert (y.grad_fn.name() == "_ConvRecomputedBackward") == (path == "ours")
                (y.square().sum() + y.sum()).backward()
            grads[path] = (y.detach(), {n: p.grad for n, p in conv.named_parameters()})
        (y_ours, g_ours), (y_ord, g_ord), (_, g_ref) = grads["ours"], grads["ordinary"], grads["reference"]
        assert torch.equal(y_ours, y_ord)
        assert g_ours.keys() == g_ord.keys() and ("input_quantizer.zero_point" in g_ours) == (kind == "lsq_plus")
        for name, g in g_ours.items():
            if name.startswith("input_quantizer."):
                torch.testing.assert_close(g, g_ord[name], rtol=2e-5, atol=1e-6, msg=f"{case} {name}")
                torch.testing.assert_close(g, g_ref[name], rtol=1e-4, atol=1e-5, msg=f"{case} {name}")
            else:
                assert torch.equal(g, g_ord[name]), (case, name)
        if case == "inside" and kind == "lsq_plus":
            assert g_ours["input_quantizer.zero_point"].abs().item() == 0  # no element outside the range
        if case == "saturated":
            assert g_ours["input_quantizer.scale"].abs().item() > 1  # every element clipped high: hi · Σ g
    monkeypatch.setattr(M, "_RECOMPUTE_WEIGHTS", True)
    conv = make()
    x = images["mixed"].clone()
    x[0, 0, 3, 3] = float("nan")
    conv(x).sum().backward()
    assert conv.input_quantizer.scale.grad.isnan().all()  # as the quantizer's own kernels and the reference

@pytest.mark.parametrize("kind", ["lsq", "lsq_plus"])
def test_image_on_the_quantizer_grid_skips_the_tangent_convolution(kind, monkeypatch):
    """8-bit images read as n/255 (Ultralytics' batches) under an 8-bit input quantizer at 1/255 (what calibration
    finds for them): every tangent is zero but for the rounding of x / s, so the layer skips their convolution (one
    forward convolution of the image's size per step) and gives zero gradients, where the ordinary path gives
    rounding noise; a non-finite upstream gradient still makes them NaN; an image off the grid still takes the
    convolution."""
    monkeypatch.setattr(M, "_RECOMPUTE_WEIGHTS", True)

    def make():
        torch.manual_seed(0)
        conv = QuantConv2d.from_float(nn.Conv2d(3, 8, 3, 2, 1), weight_spec=dict(bits=8, symmetric=True),
                                      input_spec=dict(bits=8, symmetric=False, kind=kind))
        conv.weight_quantizer.initialize_from(conv.weight)
        conv.input_quantizer.set_range(torch.tensor(0.0), torch.tensor(1.0))
        return conv

    torch.manual_seed(1)
    on_grid = torch.randint(0, 256, (2, 3, 16, 16)).float() / 255
    off_grid = on_grid + 0.3 / 255

    def step(x, ordinary=False, poison=False):
        monkeypatch.setattr(M, "_RECOMPUTE_WEIGHTS", not ordinary)
        conv = make()
        y = conv(x)
        g = torch.ones_like(y)
        if poison:
            g[0, 0, 0, 0] = float("inf")
        with torch.autograd.profiler.profile() as prof:
            y.backward(g)
        convs = sum(e.name == "aten::convolution" for e in prof.function_events)
        return {n: p.grad for n, p in conv.named_parameters() if n.startswith("input_quantizer.")}, convs

    off, convs = step(off_grid)
    assert convs == 1 and off["input_quantizer.scale"].abs().item() > 0.05  # measured 0.125
    ours, convs = step(on_grid)
    ordinary, _ = step(on_grid, ordinary=True)
    assert convs == 0 and ours.keys() == ordinary.keys() and len(ours) == (2 if kind == "lsq_plus" else 1)
    for name, g in ours.items():
        assert g.abs().sum().item() == 0, name
        # the ordinary path's rounding noise: under 1e-4 of the off-grid image's gradient
        assert ordinary[name].abs().item() <= 1e-4 * off["input_quantizer.scale"].abs().item(), name
    poisoned, _ = step(on_grid, poison=True)
    assert poisoned["input_quantizer.scale"].isnan().all()


def test_shared_layer_keeping_its_relu_input_matches_the_reference(monkeypatch):
    """A layer called again before backward (FCOS's shared head) takes its cached quantized weight and still keeps
    the ReLU's output rather than its quantized input; gradients equal the reference arithmetic's."""
    _, ga, nodes = _relu_stack_step(monkeypatch, True, False, shared_last=True)
    # the image layer, then compiled nodes; the shared layer's second call: its cached weight, the Python Function
    assert nodes == ["_ConvRecomputedBackward", COMPILED_CONV_NODE, COMPILED_CONV_NODE, "_ConvRecomputedBackward"]
    monkeypatch.setattr(M, "_RECOMPUTE_WEIGHTS", False)
    layers, x = _relu_stack(8, 4, False)
    with quantizer_mode("reference"):
        h = layers[0](x)
        for c in layers[1:] + layers[-1:]:
            h = c(torch.relu(h))
        (h.square().sum() + h.sum()).backward()
    for (name, g1), (_, g2) in zip(ga, [(n, p.grad) for c in layers for n, p in c.named_parameters()]):
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-5, msg=name)


def test_layer_keeping_its_relu_input_saves_no_quantized_copy(monkeypatch):
    """Saved for backward: the ReLU's output once (the ReLU's node and the convolution share it), nothing the size of
    the quantized input; the ordinary path keeps that quantized copy as well."""
    layers, x = _relu_stack(8, 4, False)
    a = torch.relu(layers[0](x))
    sizes = {}
    for keep in (True, False):
        monkeypatch.setattr(M, "_RECOMPUTE_WEIGHTS", keep)
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = layers[1](a)
        sizes[keep] = [n for ptr, n in storages.items() if n == a.numel()]
        y.sum().backward(retain_graph=True)
    assert sizes[True] == [a.numel()] and sizes[False] == [a.numel()] * 2  # ours: a alone; ordinary: a and Qa(a)


def test_layer_keeping_its_relu_input_refuses_a_changed_input_and_a_double_backward(monkeypatch):
    monkeypatch.setattr(M, "_RECOMPUTE_WEIGHTS", True)
    layers, x = _relu_stack(8, 4, False)
    a = torch.relu(layers[0](x))
    y = layers[1](a)
    assert y.grad_fn.name() == COMPILED_CONV_NODE
    a.mul_(2)  # changed after the convolution read it: as for a float convolution, backward refuses
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    a = torch.relu(layers[0](x))
    y = layers[1](a)
    with pytest.raises(RuntimeError, match="no double backward.*quantizer_mode\\('reference'\\)"):
        torch.autograd.grad(y.square().sum(), layers[1].weight, create_graph=True)
    with quantizer_mode("reference"):  # what the Fisher methods run: the ordinary path, double backward allowed
        y = layers[1](torch.relu(layers[0](x)))
    assert y.grad_fn.name() == "ConvolutionBackward0"
    g, = torch.autograd.grad(y.square().sum(), layers[1].weight, create_graph=True)
    assert g.requires_grad

def _act_conv(channels=8):
    torch.manual_seed(0)
    conv = QuantConv2d.from_float(nn.Conv2d(channels, 4, 3, padding=1), weight_spec={"bits": 8, "symmetric": True},
                                  input_spec={"bits": 8, "symmetric": False})
    conv.weight_quantizer.initialize_from(conv.weight)
    conv.input_quantizer.initialize_from(torch.randn(2, channels, 8, 8))
    return conv.eval()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("size", [8, 96])  # 8 px: a fresh output; 96 px: over _SCRATCH_MIN_ELEMENTS, the reused buffer
def test_transient_quantized_input_is_the_quantizers_output(layout, size, monkeypatch):
    """Without autograd a layer quantizes its input into a buffer reused from layer to layer (validation maps no
    fresh memory per layer): bit for bit the quantizer's own output, any layout, and the layer's output too."""
    monkeypatch.setenv("DETQ_NO_INT8_CONV", "1")  # the float path's buffer (integer convolutions: test_integer_inference)
    conv = _act_conv()
    x = torch.randn(2, 8, size, size) * 3
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(2, 16, size, size)[:, ::2] * 3
    q = conv.input_quantizer
    with torch.no_grad():
        transient = q.quantize_transient(x)
        assert torch.equal(transient, q(x))
        buffer = Q._SCRATCH.buffer
        in_buffer = buffer is not None and transient.data_ptr() == buffer.data_ptr()
        assert in_buffer == (x.numel() >= Q._SCRATCH_MIN_ELEMENTS)
        with quantizer_mode("reference"):
            expected = conv(x)
        assert torch.equal(conv(x), expected)


def test_transient_buffer_is_reused_never_returned_to_users_and_freed_by_training(monkeypatch):
    monkeypatch.setenv("DETQ_NO_INT8_CONV", "1")  # the float path's buffer
    conv = _act_conv()
    big = torch.randn(2, 8, 96, 96)
    with torch.no_grad():
        kept = conv.input_quantizer(big)  # the quantizer called by a user: its own fresh output
        first = conv.input_quantizer.quantize_transient(big).data_ptr()
        second = conv.input_quantizer.quantize_transient(big * 2).data_ptr()
        assert first == second
        assert torch.equal(kept, conv.input_quantizer(big))  # not overwritten by the transient calls
        # Where it does not apply, None (the layer then calls the quantizer): a hook must see every call's output,
        # calibration observes, export writes QDQ.
        handle = conv.input_quantizer.register_forward_hook(lambda *a: None)
        assert conv.input_quantizer.quantize_transient(big) is None
        handle.remove()
        with quantizer_mode("export"):
            assert conv.input_quantizer.quantize_transient(big) is None
    assert conv.input_quantizer.quantize_transient(big) is None  # autograd on
    with torch.inference_mode():  # an inference tensor is not reused outside inference mode, nor the reverse
        in_inference = conv(big)
        assert Q._SCRATCH.buffer.is_inference()
    with torch.no_grad():
        assert torch.equal(conv(big), in_inference) and not Q._SCRATCH.buffer.is_inference()
    conv.train()
    conv(big.requires_grad_(True)).sum().backward()  # a training step gives the buffer back
    assert Q._SCRATCH.buffer is None


@pytest.mark.parametrize("per_channel,kind,axis", CASES)
def test_scale_floor_inside_the_kernel_matches_learned_scale(per_channel, kind, axis):
    """The fused paths floor the step size inside the kernel call (straight-through, no autograd node); outputs and
    every gradient must be the reference's, which floors with :func:`learned_scale`, for a step size under the
    floor, at zero and negative (one channel each where per-channel), and the scale's gradient must reach it."""
    x = _input("random", 21) * 2
    q = _quantizer(4, per_channel, kind, x, axis)
    with torch.no_grad():
        if per_channel:
            q.scale[:3] = torch.tensor([1e-12, 0.0, -1e-4])
        else:
            q.scale.fill_(-1e-4)
    g = _input("random", 22)
    fused, reference = _run(q, x, g, "fused"), _run(q, x, g, "reference")
    mask = _reference_mask(q, x)  # floored there too (clamp_min(1e-8))
    assert torch.equal(fused[0], reference[0])
    assert torch.equal(fused[1], torch.where(mask, g, 0.0))  # the reference's own is (g·s)/s: one rounding off
    torch.testing.assert_close(fused[1], reference[1], rtol=1e-6, atol=0)
    torch.testing.assert_close(fused[2], reference[2], rtol=1e-4, atol=1e-6)
    assert fused[2].abs().sum() > 0
    if kind == "lsq_plus":
        torch.testing.assert_close(fused[3], reference[3], rtol=1e-4, atol=1e-6)
