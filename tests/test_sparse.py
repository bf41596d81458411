"""Sparse outlier quantization of long-tailed activations (issue 13, TASKQ's sparse part; simulated)."""

import io

import pytest
import torch
from torch import nn

import detq_hooks as dq
from detq_hooks.quantizers import FakeQuantizer, quantizer_mode
from detq_hooks.ranges import mse_range
from detq_hooks.sparse import SparseOutlierQuantizer, SparseQuantizationError, outlier_mask


def silu_of_gaussian(n=200_000, std=3.0, seed=0):
    """SiLU of a Gaussian: bounded short negative tail (-0.2785), long positive one."""
    g = torch.Generator().manual_seed(seed)
    return nn.functional.silu(std * torch.randn(n, generator=g))


@pytest.mark.parametrize("std", [1.0, 3.0])
@pytest.mark.parametrize("outlier_bits", [None, 8])
def test_sparse_outliers_lower_the_4bit_error_of_a_long_tailed_activation(std, outlier_bits):
    x = silu_of_gaussian(std=std)
    plain = FakeQuantizer(bits=4, symmetric=False)
    lo, hi = mse_range(x[:32768], x.min().item(), x.max().item(), 4, False, 2.0)
    plain.set_range(torch.tensor([lo]), torch.tensor([hi]))
    sparse = SparseOutlierQuantizer(FakeQuantizer(bits=4, symmetric=False), 0.005, outlier_bits=outlier_bits, norm=2.0)
    dense_lo, dense_hi = sparse.calibrate_from(x)
    with torch.no_grad():
        plain_mse = (plain(x) - x).pow(2).mean().item()
        sparse_mse = (sparse(x) - x).pow(2).mean().item()
    # Seen: std 1: 0.00349 -> 0.00231 (-34 %); std 3: 0.0342 -> 0.0250 (-27 %), float or 8-bit outliers alike.
    assert sparse_mse < 0.8 * plain_mse, (plain_mse, sparse_mse)
    assert dense_hi < hi  # the dense range is tighter than the plain one
    assert sparse.last_outlier_fraction == pytest.approx(0.005, abs=1e-5)
    cost = sparse.storage_cost()
    assert cost["bits_per_element"] == pytest.approx(4 + 0.005 * ((outlier_bits or 32) + 32))


def test_outliers_are_the_largest_magnitudes():
    x = torch.tensor([0.1, -5.0, 0.3, 4.0, -0.2, 0.0, 0.05, 1.0])
    assert outlier_mask(x, 0.2).tolist() == [False, True, False, True, False, False, False, False]  # ceil(1.6) = 2
    q = SparseOutlierQuantizer(FakeQuantizer(bits=4, symmetric=False), 0.2)
    q.dense.set_range(torch.tensor([-0.2]), torch.tensor([1.0]))
    with torch.no_grad():
        out = q(x)
    assert out[1] == -5.0 and out[3] == 4.0  # float outliers pass exactly
    assert out[0] != 0.1 or out[2] != 0.3  # the rest is on the 4-bit grid


@pytest.mark.parametrize("ratio", [0, 0.0, -0.01, 0.25, 1.0, True, "0.01"])
def test_ratio_outside_0_to_20_percent_is_refused(ratio):
    with pytest.raises(SparseQuantizationError, match=r"`ratio` = .* must be a fraction in \(0, 0.2\]"):
        SparseOutlierQuantizer(FakeQuantizer(bits=4, symmetric=False), ratio)


def test_other_bad_arguments_are_refused():
    with pytest.raises(SparseQuantizationError, match=r"`dense` must be a per-tensor FakeQuantizer"):
        SparseOutlierQuantizer(FakeQuantizer(bits=4, symmetric=True, per_channel=True, num_channels=3), 0.01)
    with pytest.raises(SparseQuantizationError, match=r"`outlier_bits` = 1 must be None"):
        SparseOutlierQuantizer(FakeQuantizer(bits=4, symmetric=False), 0.01, outlier_bits=1)
    assert SparseOutlierQuantizer(FakeQuantizer(bits=4, symmetric=False), 0.2).ratio == 0.2


def test_export_is_refused_because_the_sparse_path_is_simulated():
    q = SparseOutlierQuantizer(FakeQuantizer(bits=4, symmetric=False), 0.01)
    with quantizer_mode("export"), pytest.raises(SparseQuantizationError, match=r"simulated.*sparse side path"):
        q(torch.randn(10))


def test_in_a_quantized_layer_calibration_sees_only_the_dense_values_and_lsq_still_learns():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 64), nn.SiLU(), nn.Linear(64, 4))
    dq.quantize(net, "w4a4", first_layers=[], prediction_layers=[])
    net[2].input_quantizer = SparseOutlierQuantizer(net[2].input_quantizer, 0.01)
    batches = [3 * torch.randn(64, 8) for _ in range(4)]
    dq.calibrate(net, batches, method="minmax")
    with torch.no_grad():
        hidden = torch.cat([net[1](net[0](b)) for b in batches])
    _, dense_hi = net[2].input_quantizer.dense.current_range()
    assert dense_hi.item() < 0.95 * hidden.max().item()  # the min-max of the dense values, outliers excluded
    loss = net(batches[0]).pow(2).mean()
    loss.backward()
    assert net[2].input_quantizer.dense.scale.grad is not None and net[2].input_quantizer.dense.scale.grad.abs() > 0
    # Checkpoints carry the ratio and the dense quantizer's state.
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer)
    assert state["2.input_quantizer.ratio_state"].item() == 0.01 and "2.input_quantizer.dense.scale" in state


def test_block_reconstruction_learns_the_dense_step_size_of_a_sparse_quantizer():
    import copy

    from detq_hooks.reconstruction import ReconstructionConfig, reconstruct

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 64), nn.SiLU(), nn.Linear(64, 4))
    float_ = copy.deepcopy(net)
    dq.quantize(net, "w4a4", first_layers=[], prediction_layers=[])
    net[2].input_quantizer = SparseOutlierQuantizer(net[2].input_quantizer, 0.01)
    batches = [3 * torch.randn(16, 8) for _ in range(4)]
    dq.calibrate(net, batches)
    result = reconstruct(net, float_, batches, blocks=["2"], config=ReconstructionConfig(iterations=20, batch_size=16))
    assert result.blocks[0].learned_scales == 1 and result.blocks[0].loss_after <= result.blocks[0].loss_before
