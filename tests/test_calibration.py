import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import detq_hooks as dq
from detq_hooks.calibration import CalibrationError, entropy_range, mse_range, percentile_range

from core_models import TinyDetector


def _heavy_tailed(n=200_000, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    with torch.random.fork_rng(devices=[]):  # StudentT samples from the global generator: seeded here, left as it was
        torch.manual_seed(seed)
        tail = torch.distributions.StudentT(2.0).sample((n,)).abs()
    return torch.nn.functional.silu(x * 2) + tail * (torch.rand(n, generator=g) < 0.01)


def _lp(x, lo, hi, bits, p=2.4):
    scale = (hi - lo) / (2**bits - 1)
    zp = round(-lo / scale)
    q = torch.clamp(torch.round(x / scale) + zp, 0, 2**bits - 1)
    return ((q - zp) * scale - x).abs().pow(p).mean().item()


def test_range_searches_beat_minmax_on_long_tails():
    x = _heavy_tailed()
    lo, hi = x.min().item(), x.max().item()
    mlo, mhi = mse_range(x, lo, hi, 4, symmetric=False)
    assert -0.2785 - 1e-3 <= mlo <= 0 and mhi < hi  # SiLU's bounded negative tail, clipped positive tail
    assert _lp(x, mlo, mhi, 4) < 0.5 * _lp(x, lo, hi, 4)
    plo, phi = percentile_range(x, 99.9, symmetric=False)
    assert phi < hi and plo >= lo
    elo, ehi = entropy_range(x, lo, hi, 8, symmetric=False)
    assert elo == pytest.approx(min(lo, 0.0)) and ehi < hi
    slo, shi = mse_range(torch.randn(10000), -4.0, 4.0, 4, symmetric=True)
    assert slo == -shi and 1.5 < shi < 3.5


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse", "entropy"])
def test_calibrate_sets_every_activation_range(method):
    torch.manual_seed(0)
    m = dq.quantize(TinyDetector().eval(), "w8a8")
    batches = [torch.randn(2, 3, 32, 32) for _ in range(3)]
    grad_enabled = []
    res = dq.calibrate(m, batches, method=method, forward_fn=lambda model, b: grad_enabled.append(torch.is_grad_enabled()) or model(b))
    assert res.num_batches == 3 and len(res.ranges) == 8
    assert grad_enabled == [False] * 3  # no autograd graph kept over the calibration batches
    for name, q in dq.iter_quantizers(m):
        assert q.initialized
    if method == "minmax":
        lo, hi = res.ranges["backbone.0.input_quantizer"]
        data = torch.cat([b.reshape(-1) for b in batches])
        assert lo == pytest.approx(data.min().item()) and hi == pytest.approx(data.max().item())


def test_calibrating_never_trained_batchnorms_warns_and_names_them():
    """Eval-mode calibration of a model whose BatchNorms never saw a training batch gives ranges training will not
    see: a warning names them; once a training-mode pass has set their statistics, none."""
    import warnings

    from detq_hooks.calibration import untrained_batchnorms

    model = TinyDetector()
    dq.quantize(model, "w4a8")
    batches = [torch.rand(2, 3, 32, 32) for _ in range(2)]
    bns = [n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and untrained_batchnorms(model) == bns
    with pytest.warns(UserWarning, match=rf"BatchNorm layers {bns[0]!r}.*never trained.*calibrate trained float weights"):
        dq.calibrate(model, batches)
    model.train()
    with torch.no_grad():
        model(batches[0])
    assert untrained_batchnorms(model) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        dq.calibrate(model, batches)


def test_no_batches_and_nan_are_clear_errors_and_restore_state():
    torch.manual_seed(0)
    m = dq.quantize(TinyDetector().eval(), "w8a8")
    dq.calibrate(m, [torch.randn(2, 3, 32, 32)])
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(CalibrationError, match="got no batches"):
        dq.calibrate(m, [])
    bad = torch.randn(2, 3, 32, 32)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(CalibrationError, match=r"NaN in the input of quantizer 'backbone.0.input_quantizer' during calibration batch 1"):
        dq.calibrate(m, [torch.randn(2, 3, 32, 32), bad])
    inf_model_input = torch.full((1, 3, 32, 32), float("inf"))
    with pytest.raises(CalibrationError, match="inf in the input"):
        dq.calibrate(m, [inf_model_input])
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(q.observer is None for _, q in dq.iter_quantizers(m))
    # an uninitialised weight is named, not reported as a NaN activation two layers further on
    name, weight = next((n, p) for n, p in m.named_parameters() if n.endswith(".weight") and "quantizer" not in n)
    with torch.no_grad():
        weight.view(-1)[0] = float("nan")
    with pytest.raises(CalibrationError, match=rf"parameters '{name}' hold NaN/inf before calibration: load the trained checkpoint"):
        dq.calibrate(m, [torch.randn(2, 3, 32, 32)])
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items() if "quantizer" in k)
    with pytest.raises(CalibrationError, match="has no quantizers"):
        dq.calibrate(TinyDetector(), [torch.randn(1, 3, 32, 32)])


DDP_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch, torch.distributed as dist
    sys.path.insert(0, os.environ["TESTS_DIR"])
    import detq_hooks as dq
    from core_models import TinyDetector
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    m = dq.quantize(TinyDetector().eval(), "w4a8")
    g = torch.Generator().manual_seed(100 + rank)          # different data on each rank
    batches = [torch.randn(2, 3, 32, 32, generator=g) * (1 + rank) for _ in range(2)]
    dq.calibrate(m, batches, method=os.environ["METHOD"])
    state = {k: v for k, v in m.state_dict().items() if "quantizer" in k}
    torch.save({"state": state, "data": torch.cat([b.reshape(-1) for b in batches])}, os.path.join(os.environ["OUT"], f"rank{rank}.pt"))
    dist.destroy_process_group()
    """
)


@pytest.mark.ddp
@pytest.mark.parametrize("method", ["minmax", "mse"])
def test_ddp_calibration_gives_identical_scales_on_every_rank(tmp_path, method):
    script = tmp_path / "calib_ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "TESTS_DIR": str(Path(__file__).parent), "OUT": str(tmp_path), "METHOD": method, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv-backend=c10d",
                    "--rdzv-endpoint=localhost:0", str(script)], check=True, env=env, timeout=240)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["state"].keys() == r1["state"].keys()
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    if method == "minmax":  # the range covers both ranks' data, not just one rank's
        scale = r0["state"]["backbone.0.input_quantizer.scale"].item()
        data = torch.cat([r0["data"], r1["data"]])
        assert scale == pytest.approx((data.max() - data.min()).item() / 255, rel=1e-5)
