"""DetQHook life cycle on real MMEngine Runners (a toy registered model; MMDetection models are in
test_mmdet.py)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("mmengine")
from mmengine.runner import Runner  # noqa: E402

import detq_hooks as dq  # noqa: E402
from detq_hooks.checkpoint import CheckpointMismatchError  # noqa: E402
from detq_hooks.recipe import RecipeError  # noqa: E402

from mmengine_toy import toy_cfg  # noqa: E402

HOOK = dict(type="DetQHook", recipe="w4a8", calibration_batches=2, log_interval=1)


def _quantizer_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "quantizer" in k}


def _train(work_dir, max_iters=6, hooks=None, **extra):
    runner = Runner.from_cfg(toy_cfg(work_dir, max_iters=max_iters, hooks=[dict(HOOK)] if hooks is None else hooks, **extra))
    runner.train()
    return runner


def test_hook_converts_optimizes_and_saves_quantizer_state(tmp_path):
    torch.manual_seed(0)
    runner = Runner.from_cfg(toy_cfg(tmp_path, hooks=[dict(HOOK)]))
    float_weight = runner.model.backbone[3].weight.detach().clone()
    runner.train()
    m = runner.model
    assert isinstance(m.backbone[3], dq.QuantConv2d) and m.backbone[3].weight_quantizer.bits == 4
    assert m.bbox_head.conv_cls.weight_quantizer.bits == 8 and m.bbox_head.conv_reg.weight_quantizer.bits == 8
    groups = runner.optim_wrapper.optimizer.param_groups
    qgroup = [g for g in groups if g.get("name") == "detq_quantizers"][0]
    assert qgroup["weight_decay"] == 0.0 and len(qgroup["params"]) == len(dq.quantizer_parameters(m))
    assert all(len(s.base_values) == len(groups) for s in runner.param_schedulers)  # schedulers cover the group
    assert qgroup["lr"] == pytest.approx(groups[0]["lr"] * 0.1)
    assert not torch.equal(float_weight, m.backbone[3].weight)
    ckpt = torch.load(tmp_path / "iter_6.pth")  # a safe (weights_only) load works
    assert ckpt["meta"]["detq"]["recipe"]["name"] == "w4a8"
    assert any(".input_quantizer.scale" in k for k in ckpt["state_dict"])
    scales = runner.message_hub.get_scalar("train/detq_act_scale_mean")
    assert scales is not None


def test_scales_learn_during_training(tmp_path):
    runner = Runner.from_cfg(toy_cfg(tmp_path, max_iters=8, hooks=[dict(HOOK)]))
    seen = {}

    class Snap:
        priority = "LOWEST"

    from mmengine.hooks import Hook

    class SnapshotAfterCalibration(Hook):
        priority = "LOWEST"

        def before_train_iter(self, runner, batch_idx, data_batch=None):
            if batch_idx == 0:
                seen.update(_quantizer_state(runner.model))

    runner.register_hook(SnapshotAfterCalibration())
    runner.train()
    after = _quantizer_state(runner.model)
    moved = [k for k in seen if k.endswith(".scale") and not torch.equal(seen[k], after[k])]
    assert len(moved) >= 8, moved  # LSQ scales (weights and activations) are trained


class _Crash(Exception):
    pass


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    from mmengine.hooks import Hook

    class CrashAfterIter3(Hook):
        priority = "LOWEST"  # after CheckpointHook saved iter_3.pth

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            if runner.iter + 1 == 3:
                raise _Crash()

    full = _train(tmp_path / "full", max_iters=6)
    crashing = Runner.from_cfg(toy_cfg(tmp_path / "half", max_iters=6, hooks=[dict(HOOK)]))
    crashing.register_hook(CrashAfterIter3())
    with pytest.raises(_Crash):
        crashing.train()
    resumed = Runner.from_cfg(toy_cfg(tmp_path / "half", max_iters=6, hooks=[dict(HOOK)],
                                      resume=True, load_from=str(tmp_path / "half" / "iter_3.pth")))
    resumed.train()
    a, b = _quantizer_state(full.model), _quantizer_state(resumed.model)
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k
    wa, wb = full.model.state_dict(), resumed.model.state_dict()
    assert torch.allclose(wa["backbone.3.weight"], wb["backbone.3.weight"], atol=1e-6)


def test_load_from_float_checkpoint_starts_qat_but_resume_from_it_is_an_error(tmp_path):
    float_run = _train(tmp_path / "float", max_iters=3, hooks=[])  # plain float training
    assert not dq.is_quantized(float_run.model)
    ckpt = str(tmp_path / "float" / "iter_3.pth")
    qat = Runner.from_cfg(toy_cfg(tmp_path / "qat", max_iters=2, hooks=[dict(HOOK)], load_from=ckpt))
    qat.train()  # float weights loaded, ranges calibrated, QAT runs
    assert dq.is_quantized(qat.model)
    bad = Runner.from_cfg(toy_cfg(tmp_path / "float", max_iters=6, hooks=[dict(HOOK)], resume=True, load_from=ckpt))
    with pytest.raises(CheckpointMismatchError, match="written by a float run"):
        bad.train()


def test_checkpoint_from_another_recipe_is_refused(tmp_path):
    _train(tmp_path / "a", max_iters=3)
    other = dict(HOOK, recipe="w8a8")
    runner = Runner.from_cfg(toy_cfg(tmp_path / "b", max_iters=3, hooks=[other], load_from=str(tmp_path / "a" / "iter_3.pth")))
    with pytest.raises(RuntimeError, match="quantized with 4 bits but this model has 8|different recipe"):
        runner.train()


def test_test_of_saved_checkpoint_reproduces_validation(tmp_path):
    runner = _train(tmp_path, max_iters=6)
    val = runner.val()["mse"]
    tester = Runner.from_cfg(toy_cfg(tmp_path / "test", hooks=[dict(HOOK)], load_from=str(tmp_path / "iter_6.pth")))
    res = tester.test()
    assert dq.is_quantized(tester.model)
    assert res["mse"] == pytest.approx(val, rel=1e-6)


def test_ema_hook_averages_the_quantized_model(tmp_path):
    runner = _train(tmp_path, max_iters=6, hooks=[dict(HOOK), dict(type="EMAHook", momentum=0.5)])
    ema_hook = [h for h in runner.hooks if type(h).__name__ == "EMAHook"][0]
    ema = ema_hook.ema_model.module
    assert dq.is_quantized(ema) and ema.backbone[3].weight_quantizer.bits == 4
    ckpt = torch.load(tmp_path / "iter_6.pth")
    assert any("input_quantizer.scale" in k for k in ckpt["ema_state_dict"])
    s_model = runner.model.backbone[3].input_quantizer.scale
    s_ema = ema.backbone[3].input_quantizer.scale
    assert not torch.equal(s_model, s_ema)  # averaged, not copied


def test_ema_copy_starts_from_the_calibrated_ranges(tmp_path):
    # EMAHook copies the model before calibration; with a tiny momentum its ranges must still be calibrated.
    runner = _train(tmp_path, max_iters=2, hooks=[dict(HOOK), dict(type="EMAHook", momentum=0.0002)])
    ema = [h for h in runner.hooks if type(h).__name__ == "EMAHook"][0].ema_model.module
    for name, q in dq.iter_quantizers(runner.model):
        if q.role == "activation":
            q_ema = ema.get_submodule(name)
            assert torch.allclose(q_ema.scale, q.scale, rtol=0.05), name


@pytest.mark.parametrize(
    "hook, match",
    [
        (dict(HOOK, recipe={"quantization": {"weight": {"bitz": 4}}}), r"unknown key\(s\) \['bitz'\]"),
        (dict(HOOK, recipe={"quantization": {"weight": {"bits": 9}}}), r"`quantization.weight.bits` = 9"),
        (dict(HOOK, recipe="w5a5"), r"unknown recipe preset 'w5a5'"),
        (dict(HOOK, calibration_batches=0), r"`calibration_batches` = 0"),
    ],
)
def test_misconfigured_hook_fails_before_training(tmp_path, hook, match):
    with pytest.raises((RecipeError, ValueError), match=match):
        Runner.from_cfg(toy_cfg(tmp_path, hooks=[hook]))


def test_rules_that_match_nothing_and_two_hooks_are_errors(tmp_path):
    rule = dict(HOOK, recipe={"preset": "w4a8", "quantization": {"rules": [{"name": "roi_head.*", "quantize": False}]}})
    runner = Runner.from_cfg(toy_cfg(tmp_path / "a", hooks=[rule]))
    with pytest.raises(RecipeError, match=r"rules\[0\].*matches no quantizable module"):
        runner.train()
    assert not dq.is_quantized(runner.model)
    runner = Runner.from_cfg(toy_cfg(tmp_path / "b", hooks=[dict(HOOK), dict(HOOK)]))
    with pytest.raises(RuntimeError, match="DetQHook listed twice"):
        runner.train()


DDP_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch, torch.distributed as dist
    sys.path.insert(0, os.environ["TESTS_DIR"])
    from mmengine.runner import Runner
    from mmengine_toy import toy_cfg
    # MMEngine's own `init_dist` selects a CUDA device: on CPU the gloo group is opened first, and the
    # DDP wrapper gets no device ids.
    dist.init_process_group("gloo")
    cfg = toy_cfg(os.environ["WORK"], max_iters=4, hooks=[dict(type="DetQHook", recipe="w4a8", calibration_batches=2)],
                  launcher="pytorch", model_wrapper_cfg=dict(type="MMDistributedDataParallel", device_ids=None))
    runner = Runner.from_cfg(cfg)
    runner.train()
    assert type(runner.model).__name__ == "MMDistributedDataParallel"
    state = {k: v for k, v in runner.model.module.state_dict().items()}
    torch.save(state, os.path.join(os.environ["WORK"], f"rank{runner.rank}.pt"))
    # Without this, gloo's worker threads can still hold tensors while the interpreter shuts down:
    # an intermittent SIGABRT ("terminate called without an active exception") after a good run.
    dist.barrier()
    dist.destroy_process_group()
    """
)


@pytest.mark.ddp
def test_ddp_two_gloo_processes_agree(tmp_path):
    script = tmp_path / "ddp_mm.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "TESTS_DIR": str(Path(__file__).parent), "WORK": str(tmp_path), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv-backend=c10d",
                    "--rdzv-endpoint=localhost:0", str(script)], check=True, env=env, timeout=300)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert any("quantizer.scale" in k for k in r0)
    # BN running statistics are per-rank (DDP only re-broadcasts them at the next forward): they
    # differing shows the ranks saw different data, so the agreement below is not trivial.
    running = [k for k in r0 if "running_" in k]
    assert any(not torch.equal(r0[k], r1[k]) for k in running)
    for k in r0:
        if k not in running:
            assert torch.allclose(r0[k].float(), r1[k].float(), atol=1e-6), k
