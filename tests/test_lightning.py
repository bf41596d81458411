"""DetQCallback with real (tiny) Lightning runs: conversion, training, resume, DDP, precision, evaluation from
checkpoints, weight averaging, LightningCLI and bad input."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

from detq_hooks import RecipeError, is_quantized, iter_quantizers, quantized_layers, set_quantization_enabled  # noqa: E402
from detq_hooks.checkpoint import CheckpointMismatchError  # noqa: E402
from detq_hooks.lightning import DetQCallback, load_quantized_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------- tiny models
def _data(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g)
    y = torch.randn(n, 4, 8, 8, generator=g) * 0.5
    return TensorDataset(x, y)


def loader(n=16, seed=0, bs=4):
    return DataLoader(_data(n, seed), batch_size=bs, shuffle=False)


def make_net():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 4, 1),
    )


class TinyDet(pl.LightningModule):
    """A dense-prediction toy: images -> 4-channel maps (stands in for a detector's head outputs)."""

    def __init__(self, lr: float = 0.05, return_dict: bool = False, scheduler: bool = False):
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = make_net()

    def forward(self, x):
        return self.net(x)

    def _loss(self, batch):
        x, y = batch
        return nn.functional.mse_loss(self(x).float(), y)

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train_loss", loss)
        return {"loss": loss} if self.hparams.return_dict else loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))

    def test_step(self, batch, batch_idx):
        self.log("test_loss", self._loss(batch))

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        if self.hparams.scheduler:
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)}
        return opt


class LazyDet(TinyDet):
    """Layers created in `configure_model` (idempotent, as Lightning asks)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.net = None

    def configure_model(self):
        if self.net is None:
            torch.manual_seed(0)
            self.net = make_net()


class ManualDet(TinyDet):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss = self._loss(batch)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return loss


def trainer(tmp_path, callbacks=(), **kw):
    args = dict(
        accelerator="cpu", devices=1, max_steps=4, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
    )
    args.update(kw)
    return pl.Trainer(callbacks=list(callbacks), **args)


def qstate(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items() if "_quantizer." in k}


def act_scales(module):
    return torch.stack([q.scale.detach().float().mean() for _, q in iter_quantizers(module) if q.role == "activation"])


class Snapshot(pl.Callback):
    """Records the quantizer state right after calibration (DetQCallback's on_train_start ran before)."""

    def on_train_start(self, trainer, pl_module):
        self.after_calibration = qstate(pl_module)


# ---------------------------------------------------------------------------------------------- tests
def test_fit_quantizes_and_learns_scales(tmp_path):
    model, snap = TinyDet(return_dict=True, scheduler=True), Snapshot()
    cb = DetQCallback(recipe="w4a8", calibration_batches=2)
    t = trainer(tmp_path, [cb, snap], max_steps=6, log_every_n_steps=1)
    t.fit(model, loader())
    assert is_quantized(model) and len(quantized_layers(model)) == 4
    assert cb.last_calibration is not None and cb.last_calibration.num_batches == 2
    groups = {g.get("name"): g for g in t.optimizers[0].param_groups}
    assert "detq_quantizers" in groups and groups["detq_quantizers"]["weight_decay"] == 0.0
    assert len(t.lr_scheduler_configs[0].scheduler.base_lrs) == 2  # the scheduler covers the new group
    after = qstate(model)
    changed = [k for k in after if k.endswith(".scale") and not torch.equal(after[k], snap.after_calibration[k])]
    assert any(".input_quantizer." in k for k in changed) and any(".weight_quantizer." in k for k in changed)
    assert "detq/act_scale_mean" in t.logged_metrics and float(t.logged_metrics["detq/quantized_layers"]) == 4


class NoForwardDet(TinyDet):
    """training_step calls ``self.net`` directly and the module defines no ``forward`` (common with torchvision
    detectors held as ``self.model``)."""

    forward = pl.LightningModule.forward

    def _loss(self, batch):
        x, y = batch
        return nn.functional.mse_loss(self.net(x).float(), y)


def test_calibration_without_module_forward_runs_the_target(tmp_path):
    model = NoForwardDet()
    cb = DetQCallback(recipe="w4a8", target="net", calibration_batches=2)
    trainer(tmp_path, [cb], max_steps=1).fit(model, loader())
    assert cb.last_calibration is not None and cb.last_calibration.num_batches == 2


def test_layers_created_in_configure_model_are_quantized(tmp_path):
    model = LazyDet()
    t = trainer(tmp_path, [DetQCallback(recipe="w8a8")], max_steps=2)
    t.fit(model, loader())
    assert len(quantized_layers(model)) == 4
    qparams = {id(p) for _, q in iter_quantizers(model) for p in q.parameters()}
    opt_params = {id(p) for g in t.optimizers[0].param_groups if g.get("name") == "detq_quantizers" for p in g["params"]}
    assert qparams and qparams == opt_params


def test_loss_terms_tensor_dict_accumulation_and_manual(tmp_path):
    def penalty(pl_module, batch, out):  # shrinks activation ranges; proves the term reaches the optimizer
        scales = [q.scale.float().mean() for _, q in iter_quantizers(pl_module) if q.role == "activation"]
        return {"scale_penalty": 0.2 * torch.stack(scales).sum()}

    results = {}
    for name, model, kw in [
        ("plain", TinyDet(), {}),
        ("tensor", TinyDet(), {}),
        ("dict_accum", TinyDet(return_dict=True), {"accumulate_grad_batches": 2, "max_steps": 2}),
        ("manual", ManualDet(), {}),
    ]:
        cb = DetQCallback(recipe="w8a8", calibration_batches=1)
        if name != "plain":
            cb.add_loss_term("penalty", penalty)
        snap = Snapshot()
        t = trainer(tmp_path, [cb, snap], log_every_n_steps=1, **kw)
        t.fit(model, loader())
        results[name] = (snap.after_calibration, qstate(model))
        if name != "plain":
            assert "detq/scale_penalty" in t.logged_metrics, name
            assert cb.last_loss_terms["scale_penalty"] > 0
    shrink = {}
    for name, (before, after) in results.items():
        keys = [k for k in before if ".input_quantizer.scale" in k]
        shrink[name] = sum(float((before[k] - after[k]).sum()) for k in keys)
    for name in ("tensor", "dict_accum", "manual"):
        assert shrink[name] > shrink["plain"] + 1e-4, shrink


def test_resume_reproduces_uninterrupted_run(tmp_path):
    ck = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    full = TinyDet()
    trainer(tmp_path, [DetQCallback(recipe="w4a8", calibration_batches=2), ck], max_epochs=2, max_steps=-1,
            enable_checkpointing=True).fit(full, loader())
    resumed = TinyDet(lr=0.05)
    trainer(tmp_path, [DetQCallback(recipe="w4a8", calibration_batches=2)], max_epochs=2, max_steps=-1).fit(
        resumed, loader(), ckpt_path=tmp_path / "ck" / "epoch=0.ckpt")
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6, rtol=0), k


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trained")
    model = TinyDet()
    t = trainer(tmp, [DetQCallback(recipe="w4a8", calibration_batches=2)], max_steps=8)
    t.fit(model, loader())
    path = tmp / "q.ckpt"
    t.save_checkpoint(path)
    return path, model


def test_test_validate_predict_from_ckpt_path_evaluate_quantized_model(tmp_path, trained_ckpt):
    path, trained = trained_ckpt
    t = trainer(tmp_path, [DetQCallback(recipe="w4a8")])
    fresh = TinyDet()
    res = t.test(fresh, loader(seed=1), ckpt_path=path)[0]["test_loss"]
    assert is_quantized(fresh)
    val = t.validate(fresh, loader(seed=1), ckpt_path=path)[0]["val_loss"]
    preds = torch.cat(t.predict(fresh, loader(seed=1), ckpt_path=path))

    direct = load_quantized_checkpoint(TinyDet, path, map_location="cpu").eval()
    assert type(direct) is TinyDet and is_quantized(direct)
    x, y = _data(16, 1).tensors
    with torch.no_grad():
        q_out = direct(x)
        q_loss = nn.functional.mse_loss(q_out, y).item()
        set_quantization_enabled(direct, weights=False, activations=False)
        f_loss = nn.functional.mse_loss(direct(x), y).item()
    assert res == pytest.approx(q_loss, rel=1e-5) and val == pytest.approx(q_loss, rel=1e-5)
    assert torch.allclose(preds, q_out, atol=1e-6)
    assert abs(res - f_loss) > 1e-6  # the quantized model was evaluated, not the float one
    with torch.no_grad():
        assert torch.allclose(trained.eval()(x), q_out, atol=1e-6)


def test_bf16_mixed(tmp_path):
    model = TinyDet()
    cb = DetQCallback(recipe="w4a8", calibration_batches=1)
    t = trainer(tmp_path, [cb], precision="bf16-mixed", max_steps=3)
    t.fit(model, loader())
    assert is_quantized(model) and cb.last_calibration.num_batches == 1
    assert all(p.dtype == torch.float32 for _, q in iter_quantizers(model) for p in q.parameters())  # fp32 master
    x, y = _data(16, 1).tensors
    model.eval()
    with torch.no_grad():
        out32 = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out16 = model(x).float()
    # bf16 fake-quant outputs track fp32 fake-quant outputs (bf16 has ~3 significant digits; a rounding flip
    # moves an activation by one 8-bit step), and bf16 was really used (not a silent fp32 run)
    rel = float((out16 - out32).abs().mean() / out32.abs().mean())
    assert 1e-5 < rel < 0.03, rel
    l32, l16 = nn.functional.mse_loss(out32, y).item(), nn.functional.mse_loss(out16, y).item()
    assert l16 == pytest.approx(l32, rel=0.02)


def test_ema_and_swa_keep_quantizers(tmp_path):
    from lightning.pytorch.callbacks import EMAWeightAveraging, StochasticWeightAveraging

    # EMA listed before DetQ: its copy (made in its setup) must be rebuilt from the quantized module.
    class Toggle(pl.Callback):  # what the curriculum does: a layer's quantizers switched off, then on again
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx in (0, 2):
                set_quantization_enabled(pl_module, weights=batch_idx == 2, activations=batch_idx == 2,
                                         where=lambda n: n == "net.3")

    ema, model = EMAWeightAveraging(decay=0.999), TinyDet()
    t = trainer(tmp_path, [ema, DetQCallback(recipe="w4a8", calibration_batches=1), Toggle()], max_steps=4)
    t.fit(model, loader())
    avg = ema._average_model.module
    assert is_quantized(avg)
    for (_, qa), (_, qm) in zip(iter_quantizers(avg), iter_quantizers(model)):
        assert int(qa.bits_state) == int(qm.bits_state) == qm.bits  # integer buffers are not blended
        assert int(qa.enabled_state) == int(qm.enabled_state) == 1 and qa.enabled
    path = tmp_path / "ema.ckpt"
    t.save_checkpoint(path)
    assert is_quantized(load_quantized_checkpoint(TinyDet, path))

    swa, model = StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1), TinyDet()
    t = trainer(tmp_path, [swa, DetQCallback(recipe="w4a8", calibration_batches=1)], max_epochs=2, max_steps=-1)
    t.fit(model, loader(n=8))
    assert is_quantized(swa._average_model) and is_quantized(model)


def test_lightning_cli_yaml(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    cfg = ROOT / "integrations" / "lightning" / "detq_w4a8.yaml"
    data_cfg = tmp_path / "run.yaml"
    data_cfg.write_text(textwrap.dedent(f"""
        trainer:
          accelerator: cpu
          devices: 1
          max_steps: 2
          logger: false
          enable_checkpointing: false
          enable_progress_bar: false
          default_root_dir: {tmp_path}
    """))
    cli = LightningCLI(CLIModel, CLIData, args=["fit", "--config", str(data_cfg), "--config", str(cfg)],
                       save_config_callback=None)
    cbs = [c for c in cli.trainer.callbacks if isinstance(c, DetQCallback)]
    assert len(cbs) == 1 and cbs[0].recipe.name == "w4a8"
    assert is_quantized(cli.model) and cli.trainer.global_step == 2

    crqat = ROOT / "integrations" / "lightning" / "detq_w4a4_crqat.yaml"
    cli = LightningCLI(CLIModel, CLIData, args=["--config", str(data_cfg), "--config", str(crqat)], run=False,
                       save_config_callback=None)
    cb = next(c for c in cli.trainer.callbacks if isinstance(c, DetQCallback))
    assert cb.recipe.curriculum.enabled and cb.recipe.distillation.enabled and cb.target == "model"
    assert cb.recipe.distillation.teacher_precision == "float32"


class CLIModel(TinyDet):
    pass


class CLIData(pl.LightningDataModule):
    def train_dataloader(self):
        return loader()


# ---------------------------------------------------------------------------------------------- PTQ (mode: ptq)
def float_loss(model, seed=1):
    x, y = _data(16, seed).tensors
    with torch.no_grad():
        return nn.functional.mse_loss(model.eval()(x), y).item()


class TrainValData(pl.LightningDataModule):
    def train_dataloader(self):
        return loader(seed=0)

    def val_dataloader(self):
        return loader(seed=1)


def ptq_reference_scales(batches=2, seed=0):
    """Activation scales of TinyDet calibrated directly by the session on the first ``batches`` of ``loader(seed)``."""
    from detq_hooks.session import QuantSession

    ref = TinyDet()
    session = QuantSession("w8a8-ptq", calibration_batches=batches)
    session.convert(ref, training=False)
    session.run_ptq(ref, list(loader(seed=seed)), forward_fn=lambda m, b: m(b[0]))
    return act_scales(ref)


def test_ptq_validate_and_test_calibrate_then_evaluate(tmp_path):
    f_loss = float_loss(TinyDet())
    # validate: the datamodule's train loader gives the calibration batches
    model, cb = TinyDet(), DetQCallback(recipe="w8a8-ptq", calibration_batches=2)
    val = trainer(tmp_path, [cb]).validate(model, datamodule=TrainValData())[0]["val_loss"]
    assert all(q.initialized for _, q in iter_quantizers(model)) and cb.last_calibration.num_batches == 2
    assert torch.allclose(act_scales(model), ptq_reference_scales(seed=0), rtol=1e-6, atol=0)
    assert val == pytest.approx(float_loss(model), rel=1e-6)  # the quantized model was evaluated ...
    assert 1e-7 < abs(val - f_loss) < 0.02 * f_loss, (val, f_loss)  # ... and W8A8 stays close to float
    # test with a bare loader: no train loader anywhere, the evaluation batches calibrate
    model, cb = TinyDet(), DetQCallback(recipe="w8a8-ptq", calibration_batches=2)
    res = trainer(tmp_path, [cb]).test(model, loader(seed=1))[0]["test_loss"]
    assert torch.allclose(act_scales(model), ptq_reference_scales(seed=1), rtol=1e-6, atol=0)
    assert 1e-7 < abs(res - f_loss) < 0.02 * f_loss
    # a second evaluation keeps the ranges (no re-calibration on other batches)
    before = qstate(model)
    trainer(tmp_path, [cb]).test(model, loader(seed=2))
    assert all(torch.equal(before[k], v) for k, v in qstate(model).items())


def test_ptq_fit_calibrates_and_never_steps(tmp_path):
    model = TinyDet()
    float_state = {k: v.clone() for k, v in model.state_dict().items()}
    cb = DetQCallback(recipe="w8a8-ptq", calibration_batches=2)
    # a sanity check on the validation loader runs first: the ranges must still come from the training batches
    t = trainer(tmp_path, [cb], max_steps=4, num_sanity_val_steps=1)
    t.fit(model, loader(seed=0), loader(seed=1))
    assert t.global_step == 0 and cb.last_calibration.num_batches == 2
    assert all(q.initialized for _, q in iter_quantizers(model))
    assert torch.allclose(act_scales(model), ptq_reference_scales(seed=0), rtol=1e-6, atol=0)
    after = model.state_dict()
    for k, v in float_state.items():  # weights and BN statistics are exactly the float ones
        assert torch.equal(after[k], v), k
    path = tmp_path / "ptq.ckpt"
    t.save_checkpoint(path)
    loaded = load_quantized_checkpoint(TinyDet, path)
    assert all(torch.equal(a, b) for a, b in zip(qstate(loaded).values(), qstate(model).values()))


# ---------------------------------------------------------------------------------------------- mixed bits
class SixBits(pl.Callback):
    """What mixed precision does: after conversion, one body layer gets another bit width."""

    def on_train_start(self, trainer, pl_module):
        pl_module.net[3].weight_quantizer.bits = 6


def test_mixed_bits_survive_test_load_and_resume(tmp_path):
    model = TinyDet()
    t = trainer(tmp_path, [DetQCallback(recipe="w4a8", calibration_batches=1), SixBits()], max_steps=3)
    t.fit(model, loader())
    path = tmp_path / "mixed.ckpt"
    t.save_checkpoint(path)
    assert torch.load(path, weights_only=False)["detq"]["layers"]["net.3"]["weight_bits"] == 6
    x = _data(16, 1).tensors[0]
    with torch.no_grad():
        ref = model.eval()(x)

    fresh = TinyDet()
    trainer(tmp_path, [DetQCallback(recipe="w4a8")]).test(fresh, loader(seed=1), ckpt_path=path)
    direct = load_quantized_checkpoint(TinyDet, path).eval()
    for m in (fresh, direct):
        assert m.net[3].weight_quantizer.bits == 6 and m.net[5].weight_quantizer.bits == 4
        with torch.no_grad():
            assert torch.equal(m.eval()(x), ref)

    resumed = TinyDet()
    trainer(tmp_path, [DetQCallback(recipe="w4a8")], max_steps=5).fit(resumed, loader(), ckpt_path=path)
    assert resumed.net[3].weight_quantizer.bits == 6 and int(resumed.net[3].weight_quantizer.bits_state) == 6


# ---------------------------------------------------------------------------------------------- 0.1.0 checkpoints
LEGACY_CKPT = ROOT / "tests" / "fixtures" / "legacy_0.1.0" / "lightning_tinydet_w4a8.ckpt"


def test_legacy_0_1_0_checkpoint_loads(tmp_path):
    saved = torch.load(LEGACY_CKPT, weights_only=False)
    file_q = {k: v for k, v in saved["state_dict"].items() if "_quantizer." in k}
    assert len(file_q) > 8 and "curriculum" not in saved["callbacks"]["DetQCallback"]

    direct = load_quantized_checkpoint(TinyDet, LEGACY_CKPT)
    fresh = TinyDet()
    res = trainer(tmp_path, [DetQCallback(recipe="w4a8")]).test(fresh, loader(seed=1), ckpt_path=LEGACY_CKPT)[0]
    for m in (direct, fresh):
        q = qstate(m)
        assert q.keys() == file_q.keys() and all(torch.equal(q[k], file_q[k]) for k in q)
        assert [m.net[i].weight_quantizer.bits for i in (0, 3, 5, 7)] == [8, 4, 4, 8]
    assert res["test_loss"] == pytest.approx(float_loss(direct), rel=1e-6)
    # resume a fit from it (its callback state is the 0.1.0 one)
    resumed = TinyDet()
    t = trainer(tmp_path, [DetQCallback(recipe="w4a8")], max_steps=5)
    t.fit(resumed, loader(), ckpt_path=LEGACY_CKPT)
    assert t.global_step == 5 and is_quantized(resumed)


def test_plan_naming_a_missing_layer_is_refused(tmp_path, trained_ckpt):
    path, _ = trained_ckpt
    ckpt = torch.load(path, weights_only=False)
    ckpt["detq"]["layers"]["net.99"] = dict(ckpt["detq"]["layers"]["net.3"])
    bad = tmp_path / "bad.ckpt"
    torch.save(ckpt, bad)
    fresh = TinyDet()
    with pytest.raises(CheckpointMismatchError, match=r"saved plan quantizes layer 'net\.99', which TinyDet does not have"):
        trainer(tmp_path, [DetQCallback(recipe="w4a8")]).test(fresh, loader(), ckpt_path=bad)
    assert not is_quantized(fresh)  # left float, nothing loaded
    with pytest.raises(CheckpointMismatchError, match=r"'net\.99'"):
        load_quantized_checkpoint(TinyDet, bad)


# ---------------------------------------------------------------------------------------------- bad input
def test_rule_matching_nothing_is_a_clear_error_and_model_untouched(tmp_path):
    model = TinyDet()
    recipe = {"preset": "w4a8", "quantization": {"rules": [{"name": "backbone.*", "weight_bits": 8}]}}
    with pytest.raises(RecipeError, match=r"rules\[0\].*matches no quantizable module"):
        trainer(tmp_path, [DetQCallback(recipe=recipe)]).fit(model, loader())
    assert not is_quantized(model)


def test_two_callbacks_are_refused(tmp_path):
    model = TinyDet()
    # Lightning refuses two callbacks with the same state key when the Trainer is built
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `DetQCallback`"):
        trainer(tmp_path, [DetQCallback("w4a8"), DetQCallback("w8a8")]).fit(model, loader())
    assert not is_quantized(model)


def test_checkpoint_mismatches_are_clear_errors(tmp_path, trained_ckpt):
    qpath, _ = trained_ckpt
    float_trainer = trainer(tmp_path, max_steps=2)
    float_model = TinyDet()
    float_trainer.fit(float_model, loader())
    fpath = tmp_path / "float.ckpt"
    float_trainer.save_checkpoint(fpath)

    # float checkpoint resumed into a quantized run
    with pytest.raises(CheckpointMismatchError, match="float weights without quantizer state"):
        trainer(tmp_path, [DetQCallback("w4a8")], max_steps=4).fit(TinyDet(), loader(), ckpt_path=fpath)
    with pytest.raises(CheckpointMismatchError, match="float weights without quantizer state"):
        trainer(tmp_path, [DetQCallback("w4a8")]).test(TinyDet(), loader(), ckpt_path=fpath)
    # quantized checkpoint into a float run: Lightning's strict load names the quantizer keys
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: .*net\.0\.weight_quantizer\.scale"):
        trainer(tmp_path).test(TinyDet(), loader(), ckpt_path=qpath)
    # a different recipe
    fresh = TinyDet()
    with pytest.raises(CheckpointMismatchError, match="quantized with detq recipe 'w4a8', this run asks for 'w8a8'"):
        trainer(tmp_path, [DetQCallback("w8a8")]).test(fresh, loader(), ckpt_path=qpath)
    assert not is_quantized(fresh)  # nothing half-applied
    # the loading helper on a float checkpoint
    with pytest.raises(CheckpointMismatchError, match="no detq quantization state"):
        load_quantized_checkpoint(TinyDet, fpath)


def test_distillation_head_terms_on_an_unknown_detector_fail_before_training(tmp_path):
    from detq_hooks.detectors import UnsupportedDetectorError

    model = TinyDet()
    with pytest.raises(UnsupportedDetectorError, match=r"TinyDet is not a detector family .*DetectorFamily"):
        trainer(tmp_path, [DetQCallback(recipe={"preset": "w4a8", "distillation": {"enabled": True}})]).fit(model, loader())
    assert not is_quantized(model)


def test_bad_arguments():
    with pytest.raises(RecipeError, match="unknown recipe preset"):
        DetQCallback(recipe="w3a3")
    with pytest.raises(ValueError, match="calibration_batches"):
        DetQCallback(calibration_batches=0)
    with pytest.raises(ValueError, match="calibration_forward"):
        DetQCallback(calibration_forward="no_such_module_xyz.fn")
    with pytest.raises(TypeError, match="must be a detq_hooks.detectors.DetectorFamily"):
        DetQCallback(family="torchvision")


# ---------------------------------------------------------------------------------------------- DDP
DDP_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
import lightning.pytorch as pl
from test_lightning import TinyDet, TinyFCOS, Snapshot, loader, det_loader, qstate, CRQAT_RECIPE
from detq_hooks.lightning import DetQCallback
from detq_hooks.sharing import input_leaders

def params_and_quantizers(m):
    state = qstate(m)
    state.update({{k: p.detach().clone() for k, p in m.named_parameters()}})
    return state

class Save(Snapshot):
    def on_train_end(self, trainer, pl_module):
        det = trainer.callbacks[0]
        stage = det.session.schedule.current if det.session.schedule is not None else None
        torch.save({{"calib": self.after_calibration, "final": params_and_quantizers(pl_module),
                    "terms": dict(det.last_loss_terms), "stage": stage,
                    "logged": sorted(k for k in trainer.logged_metrics if k.startswith("detq/distill_")),
                    "leaders": input_leaders(pl_module)}},
                   {out!r} + f"/rank{{trainer.global_rank}}.pt")

torch.set_num_threads(1)
if {mode!r} == "crqat":
    model, data, recipe = TinyFCOS(), det_loader(n=16), CRQAT_RECIPE
elif {mode!r} == "shared":  # tied at conversion, before Lightning's DDP (find_unused_parameters=False) wraps it
    model, data, recipe = TinyFCOS(), det_loader(n=16), {{"preset": "w4a8", "quantization": {{"shared_activations": True}}}}
else:
    model, data, recipe = TinyDet(), loader(n=32), "w4a8"
t = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=4, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, callbacks=[DetQCallback(recipe, calibration_batches=2), Save()])
# each rank gets different data from the DistributedSampler (shuffle=False keeps it deterministic)
t.fit(model, data)
"""


@pytest.mark.parametrize("mode", ["plain", "crqat", "shared"])
def test_ddp_two_processes_agree(tmp_path, mode):
    script = tmp_path / "ddp_fit.py"
    script.write_text(DDP_SCRIPT.format(tests=str(ROOT / "tests"), out=str(tmp_path), mode=mode))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script)], env=env, timeout=300, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for key in ("calib", "final"):
        assert r0[key].keys() == r1[key].keys() and r0[key]
        for k in r0[key]:
            assert torch.equal(r0[key][k], r1[key][k]), (key, k)
    changed = [k for k in r0["final"] if k.endswith("input_quantizer.scale") and k in r0["calib"]
               and not torch.equal(r0["final"][k], r0["calib"][k])]
    assert changed
    if mode == "shared":  # the shared quantizers train under DDP, tied alike on both ranks
        assert r0["leaders"] == r1["leaders"] and r0["leaders"]["model.head.regression_head.conv.0"] == \
            "model.backbone.fpn.extra_blocks.p6"
    if mode == "crqat":  # curriculum + distillation under DDP: stage 2 reached, distillation terms nonzero on both ranks
        for r in (r0, r1):
            assert r["stage"] == 1
            parts = {k: v for k, v in r["terms"].items() if k.startswith("distill_")}
            assert set(parts) == {"distill_pkd_stage1", "distill_relational", "distill_logit", "distill_box"}, r["terms"]
            assert all(v > 0 for v in parts.values()), parts
            assert r["logged"] == sorted("detq/" + k for k in parts)


# ---------------------------------------------------------------------------------------------- CR-QAT (issue 6)
class TinyBody(nn.Module):
    """ResNet-shaped body (children conv1 / layer2..4) small enough for tests."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, 8, 3, 4, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
        self.layer3 = nn.Sequential(nn.Conv2d(16, 16, 3, 2, 1), nn.ReLU())
        self.layer4 = nn.Sequential(nn.Conv2d(16, 16, 3, 2, 1), nn.ReLU())


def tiny_fcos(num_classes=3):
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.fcos import FCOSHead
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    torch.manual_seed(0)
    fpn = BackboneWithFPN(TinyBody(), {"layer2": "0", "layer3": "1", "layer4": "2"}, [16, 16, 16], 32,
                          extra_blocks=LastLevelP6P7(32, 32))
    return FCOS(fpn, num_classes + 1, min_size=64, max_size=64, head=FCOSHead(32, 1, num_classes + 1, num_convs=1),
                score_thresh=0.05, detections_per_img=20, topk_candidates=50)


class TinyFCOS(pl.LightningModule):
    def __init__(self, lr: float = 0.01):
        super().__init__()
        self.save_hyperparameters()
        self.model = tiny_fcos()

    def forward(self, images):
        return self.model(images)

    def training_step(self, batch, batch_idx):
        images, targets = batch
        loss = sum(self.model(images, targets).values())
        self.log("train_loss", loss)
        return loss

    def calibration_forward(self, batch):
        return self.model(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def det_loader(n=8, bs=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        xy = torch.rand(3, 2, generator=g) * 40
        boxes = torch.cat([xy, xy + 8 + torch.rand(3, 2, generator=g) * 16], 1)
        items.append((torch.rand(3, 64, 64, generator=g), {"boxes": boxes, "labels": torch.randint(1, 4, (3,), generator=g)}))
    return DataLoader(items, batch_size=bs, shuffle=False, collate_fn=lambda b: tuple(map(list, zip(*b))))


CRQAT_RECIPE = {"preset": "w4a8", "curriculum": {"enabled": True, "boundaries": [0.5]}, "distillation": {"enabled": True}}


class StageProbe(pl.Callback):
    """Per step: the curriculum stage, whether the head's quantizers are on, and the head weights."""

    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        head = pl_module.model.head.classification_head.cls_logits
        body = pl_module.model.backbone.body.layer2[0]
        self.rows.append((trainer.global_step, head.weight_quantizer.enabled, head.input_quantizer.enabled,
                          head.weight.detach().clone(), body.weight.detach().clone()))


def test_crqat_stages_freezing_and_distillation_terms(tmp_path):
    model, probe = TinyFCOS(), StageProbe()
    float_head = model.model.head.classification_head.cls_logits.weight.detach().clone()
    cb = DetQCallback(recipe=CRQAT_RECIPE, calibration_batches=1)
    t = trainer(tmp_path, [cb, probe], max_steps=4, log_every_n_steps=1)
    t.fit(model, det_loader())
    assert [s.name for s in cb.session.stages] == ["backbone", "neck_head"]
    assert cb.session.stages[0].prefixes == ["model.backbone.body"]
    assert cb.session.family.name == "torchvision"
    # teacher: a float copy outside the module tree
    assert not is_quantized(cb.session.teacher.module)
    assert not any(p is q for p in model.parameters() for q in cb.session.teacher.module.parameters())
    # stage 1 (steps 1-2): head float and frozen, body trained; stage 2: head quantized and trained
    (s1, w_on1, a_on1, head1, body1), (s2, _, _, head2, body2), (_, w_on3, a_on3, head3, _), _ = probe.rows
    assert not w_on1 and not a_on1 and torch.equal(head1, float_head) and torch.equal(head2, float_head)
    assert not torch.equal(body1, body2)
    assert w_on3 and a_on3 and not torch.equal(head3, float_head)
    for k in ("detq/distill_pkd_stage1", "detq/distill_relational", "detq/distill_logit", "detq/distill_box",
              "detq/curriculum_stage"):
        assert k in t.logged_metrics, k
    parts = {k: v for k, v in cb.last_loss_terms.items() if k.startswith("distill_")}
    assert len(parts) == 4 and all(v > 0 for v in parts.values()), cb.last_loss_terms


def test_distillation_gradients_reach_student_only(tmp_path):
    model = TinyFCOS()
    cb = DetQCallback(recipe={"preset": "w4a8", "distillation": {"enabled": True}}, calibration_batches=1)
    trainer(tmp_path, [cb], max_steps=1).fit(model, det_loader(n=2))
    model.train()
    batch = next(iter(det_loader(n=2)))
    session = cb.session
    session.start_training(model)
    try:
        model.model(batch[0], batch[1])
        terms = session.loss_terms(model, batch)
    finally:
        session.end_training(model)
    model.zero_grad()
    terms["distill"].backward()
    distill = session.terms[0]
    assert set(distill.last_terms) == {"pkd_stage1", "relational", "logit", "box"}
    assert all(v > 0 for v in distill.last_terms.values())
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None and not p.requires_grad for p in session.teacher.module.parameters())


def test_crqat_resume_mid_curriculum_reproduces(tmp_path):
    # 4 batches per epoch x 2 epochs; the stage changes at step 4 (epoch 2); resume from the epoch-1 checkpoint
    ck = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    full = TinyFCOS()
    cb_full = DetQCallback(recipe=CRQAT_RECIPE, target="model", calibration_batches=1)
    trainer(tmp_path, [cb_full, ck], max_epochs=2, max_steps=-1, enable_checkpointing=True).fit(full, det_loader())
    ckpt = torch.load(tmp_path / "ck" / "epoch=0.ckpt", weights_only=False)
    assert ckpt["detq"]["curriculum"]["current"] == 0 and "state" in ckpt["detq"]["teacher"]
    assert set(ckpt["callbacks"]["DetQCallback"]) == {"recipe", "target"}
    mid = load_quantized_checkpoint(TinyFCOS, tmp_path / "ck" / "epoch=0.ckpt")  # stage 1: head float
    assert is_quantized(mid.model) and not mid.model.head.classification_head.cls_logits.weight_quantizer.enabled
    assert mid.model.backbone.body.layer2[0].weight_quantizer.enabled

    resumed = TinyFCOS()
    with torch.no_grad():  # a different float start: the teacher must come from the checkpoint, not from here
        for p in resumed.parameters():
            p.add_(0.01)
    cb_res = DetQCallback(recipe=CRQAT_RECIPE, target="model", calibration_batches=1)
    trainer(tmp_path, [cb_res], max_epochs=2, max_steps=-1).fit(resumed, det_loader(), ckpt_path=tmp_path / "ck" / "epoch=0.ckpt")
    assert cb_res.session.schedule.current == cb_full.session.schedule.current == 1
    a, b = full.state_dict(), resumed.state_dict()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5, rtol=0), k
    for (k, ta), tb in zip(cb_full.session.teacher.state_dict().items(), cb_res.session.teacher.state_dict().values()):
        assert torch.equal(ta, tb), k


def test_curriculum_needs_stages_when_structure_is_unknown(tmp_path):
    recipe = {"preset": "w4a8", "curriculum": {"enabled": True}}
    with pytest.raises(RecipeError, match="curriculum.stages"):
        trainer(tmp_path, [DetQCallback(recipe=recipe)]).fit(TinyDet(), loader())
    named = {"preset": "w4a8", "curriculum": {"enabled": True, "stages": [
        {"name": "body", "modules": ["net.0", "net.1", "net.3"], "outputs": ["net.4"]},
        {"name": "head", "modules": ["net.5", "net.7"]}]},
        # feature distillation only: TinyDet's head cannot be read (no detector family answers for it)
        "distillation": {"enabled": True, "relational_weight": 0, "logit_weight": 0, "box_weight": 0}}
    model, cb = TinyDet(), DetQCallback(recipe=named, calibration_batches=1)
    trainer(tmp_path, [cb], max_steps=2, log_every_n_steps=1).fit(model, loader())
    assert [s.name for s in cb.session.stages] == ["body", "head"] and cb.last_loss_terms["distill_pkd_stage1"] > 0

    # the same stages answered by a detector family of the user's (family=) instead of the recipe
    from detq_hooks.curriculum import Stage
    from detq_hooks.detectors import DetectorFamily

    class TinyFamily(DetectorFamily):
        def stages(self, model):
            return [Stage("body", ["net.0", "net.1", "net.3"], ["net.4"]), Stage("head", ["net.5", "net.7"], [])]

    model = TinyDet()
    cb = DetQCallback(recipe={"preset": "w4a8", "curriculum": {"enabled": True, "boundaries": [0.5]}},
                      calibration_batches=1, family=TinyFamily())
    trainer(tmp_path, [cb], max_steps=2).fit(model, loader())
    assert [s.name for s in cb.session.stages] == ["body", "head"] and cb.session.schedule.current == 1



class TinyFasterRCNN(TinyFCOS):
    """torchvision's Faster R-CNN (MobileNetV3 FPN, random weights): a two-stage detector no family reads the head of."""

    def __init__(self, lr: float = 0.01):
        super().__init__(lr)
        from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn

        self.model = fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=4,
                                                           min_size=64, max_size=64)


def test_two_stage_torchvision_detector_gets_curriculum_stages_and_feature_distillation(tmp_path):
    """Faster R-CNN: the stages are found (the backbone with its FPN, then RPN and RoI heads); feature
    distillation trains; head terms are refused before training, naming the model and the way out."""
    from detq_hooks.detectors import UnsupportedDetectorError

    with pytest.raises(UnsupportedDetectorError, match=r"FasterRCNN is not a detector family .*relational_weight"):
        trainer(tmp_path, [DetQCallback(recipe="w4a8-crqat", target="model", calibration_batches=1)]).fit(
            TinyFasterRCNN(), det_loader())
    recipe = {"preset": "w4a8-crqat", "distillation": {"relational_weight": 0, "logit_weight": 0, "box_weight": 0}}
    model, cb = TinyFasterRCNN(), DetQCallback(recipe=recipe, target="model", calibration_batches=1)
    # stand-in for trained float weights: BatchNorm statistics from a few training-mode passes (untrained ones make
    # eval-mode calibration meaningless, and this model's first curriculum step then overflows; see calibrate())
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.momentum = None  # the plain average of the passes' batch statistics
    model.train()
    with torch.no_grad():
        for _ in range(3):
            for images, targets in det_loader():
                model.model(images, targets)
    for bn in bns:
        bn.momentum = 0.01
    trainer(tmp_path, [cb], max_steps=4, log_every_n_steps=1).fit(model, det_loader())
    assert [(s.name, s.prefixes) for s in cb.session.stages] == [
        ("backbone", ["backbone"]), ("neck_head", ["rpn", "roi_heads"])]  # of the callback's target
    assert cb.session.schedule.current == 1 and cb.last_loss_terms["distill_pkd_stage1"] > 0
    assert all(m.weight_quantizer.enabled for _, m in quantized_layers(model))
    assert all(torch.isfinite(p).all() for p in model.parameters())

class TinySSDlite(TinyFCOS):
    """torchvision's SSDlite (MobileNetV3, random weights): softmax scores with a background class, levels of
    different widths and anchor counts."""

    def __init__(self, lr: float = 0.01):
        super().__init__(lr)
        from torchvision.models.detection import ssdlite320_mobilenet_v3_large

        self.model = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=4)


@pytest.mark.parametrize("builder,predictor", [
    ("maskrcnn_resnet50_fpn", "roi_heads.mask_predictor.mask_fcn_logits"),
    ("keypointrcnn_resnet50_fpn", "roi_heads.keypoint_predictor.kps_score_lowres"),  # a ConvTranspose2d
])
def test_mask_and_keypoint_rcnn_predictors_are_prediction_layers(builder, predictor):
    """torchvision's Mask R-CNN mask logits and Keypoint R-CNN keypoint scores stay at 8 bits beside the box
    predictors (they trained at 4 bits as body layers); the heads before them stay body layers, and the quantized
    model still predicts masks / keypoints."""
    import torchvision

    import detq_hooks as dq
    from detq_hooks.detectors import family_for

    model = getattr(torchvision.models.detection, builder)(weights=None, weights_backbone=None, num_classes=3)
    preds = family_for(model).prediction_layers(model)
    assert predictor in preds and "roi_heads.box_predictor.cls_score" in preds
    dq.quantize(model, "w4a8", prediction_layers=preds)
    layers = dict(dq.quantized_layers(model))
    assert layers[predictor].weight_quantizer.bits == 8 and layers[predictor].detq_layer_role == "prediction"
    head = [m for n, m in layers.items() if n.startswith(predictor.rsplit(".", 2)[0]) and n not in preds]
    assert head and all(m.weight_quantizer.bits == 4 for m in head)
    with torch.no_grad():
        out = model.eval()([torch.rand(3, 96, 96)])[0]
    assert ("masks" if "mask" in builder else "keypoints") in out


def test_ssdlite_head_decodes_as_its_own_postprocess_and_crqat_distils_it(tmp_path):
    """SSD/SSDlite family: every level's last class and box conv are prediction layers (8 bits); decoded boxes and
    softmax scores are those of SSD's own postprocess; W4A4 CR-QAT runs its stages with every head term."""
    from detq_hooks.detectors import family_for
    from torchvision.ops import clip_boxes_to_image

    from detq_hooks.recording import record

    model = TinySSDlite()
    family = family_for(model.model)
    assert family.name == "torchvision-ssd"
    pred = family.prediction_layers(model.model)
    assert len(pred) == 12 and pred[0] == "head.classification_head.module_list.0.1"
    assert [(s.name, s.outputs) for s in family.stages(model.model)] == [
        ("backbone", ["backbone.features.1"]), ("neck_head", [])]

    det = model.model.eval()
    images, targets = next(iter(det_loader()))
    with torch.no_grad(), record(det, family.head_taps(det)) as rec:
        family.teacher_forward(det, (images, targets))
        head = family.head_outputs(det, rec, (images, targets))
        regression = rec.output("head")["bbox_regression"]
    a = head.cls_logits.shape[1]
    assert head.embeddings.shape[:2] == (2, a) and head.anchor_index.shape == (a,)
    assert head.class_anchors.shape == (6, 4, head.embeddings.shape[-1])
    # SSD's own decoding, nothing suppressed or cut: each of its detections is one of our (box, score) pairs
    det.score_thresh, det.nms_thresh, det.topk_candidates, det.detections_per_img = 0.0, 1.0, a, a * 3
    image_list, _ = det.transform(images)
    anchors = det.anchor_generator(image_list, list(det.backbone(image_list.tensors).values()))
    raw = {"cls_logits": head.cls_logits, "bbox_regression": regression}
    theirs = det.postprocess_detections(raw, anchors, image_list.image_sizes)
    scores = head.cls_logits.softmax(-1)
    for b, res in enumerate(theirs):
        h, w = image_list.image_sizes[b]
        ours = clip_boxes_to_image(head.boxes[b], (h, w))
        top = res["scores"].argsort(descending=True)[:50]
        for box, score, label in zip(res["boxes"][top], res["scores"][top], res["labels"][top]):
            match = ((scores[b, :, label] - score).abs() < 1e-6) & ((ours - box).abs().amax(-1) < 1e-3)
            assert match.any(), (box, score, label)

    # the critical objective knows SSD's background is class 0: every class critical is the plain objective; class
    # 0 is no class to name
    from detq_hooks.critical import CriticalObjective
    from detq_hooks.fisher import FisherError

    gts = ([t["boxes"] for t in targets], [t["labels"] for t in targets])
    assert float(CriticalObjective(None, [1, 2, 3]).loss(head, gts, "critical")) == \
        pytest.approx(float(CriticalObjective(None, [1]).loss(head, gts, "all")), rel=1e-6)
    assert float(CriticalObjective(None, [1]).loss(head, gts, "critical")) != \
        pytest.approx(float(CriticalObjective(None, [1]).loss(head, gts, "all")), rel=1e-3)
    with pytest.raises(FisherError, match=r"critical class ids \[0\] are not all classes of a head whose classes are 1..3"):
        CriticalObjective(None, [0]).loss(head, gts, "critical")

    model, cb = TinySSDlite(), DetQCallback(recipe="w4a4-crqat", target="model", calibration_batches=1)
    trainer(tmp_path, [cb], max_steps=4, log_every_n_steps=1).fit(model, det_loader())
    assert cb.session.schedule.current == 1
    assert all(cb.last_loss_terms[f"distill_{k}"] > 0 for k in ("pkd_stage1", "relational", "logit", "box"))
    bits = {n: m.weight_quantizer.bits for n, m in quantized_layers(model.model)}
    assert {bits[n] for n in pred} == {8} and sum(b == 4 for b in bits.values()) > 50
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fcos_head_outputs_score_with_centerness_as_its_postprocess():
    """FCOS ranks by sqrt(σ(cls)·σ(centerness)): the logits distillation, the teacher's assignment and the critical
    objective read are those scores' logits, every (anchor, class) once; RetinaNet's stay its raw class logits."""
    from test_ptq_trainers import _anchors_per_level, _tiny_retinanet

    from detq_hooks.detectors import family_for
    from detq_hooks.recording import record

    images, targets = next(iter(det_loader()))
    for build in (tiny_fcos, _tiny_retinanet):
        det = build().eval()
        family = family_for(det)
        with torch.no_grad():  # a spread a trained head has; centerness logits of both signs
            for conv in (det.head.classification_head.cls_logits, getattr(det.head.regression_head, "bbox_ctrness", None)):
                if conv is not None:
                    conv.bias.normal_(0, 3)
            with record(det, family.head_taps(det)) as rec:
                family.teacher_forward(det, (images, targets))
                head = family.head_outputs(det, rec, (images, targets))
        output = rec.output("head")
        assert torch.isfinite(head.cls_logits).all()
        if "bbox_ctrness" not in output:
            assert torch.equal(head.cls_logits, output["cls_logits"].float())
            continue
        det.score_thresh, det.topk_candidates, det.nms_thresh, det.detections_per_img = -1.0, 10**6, 1.0, 10**6
        sizes = _anchors_per_level(det, images, output["cls_logits"].shape[1])
        anchors = rec.output("anchor_generator")
        theirs = det.postprocess_detections({k: list(v.split(sizes, dim=1)) for k, v in output.items()},
                                            [list(a.split(sizes)) for a in anchors], [(64, 64)] * len(images))
        ours = head.cls_logits.sigmoid()
        assert float((ours - output["cls_logits"].sigmoid()).abs().max()) > 0.05  # centerness changed the scores
        for i, result in enumerate(theirs):
            assert len(result["scores"]) == ours[i].numel()
            torch.testing.assert_close(result["scores"].sort().values, ours[i].flatten().sort().values,
                                       atol=1e-6, rtol=1e-5)


def test_restore_loads_the_recipes_teacher_checkpoint(tmp_path):
    """Core (QuantSession.restore): a recipe naming `distillation.teacher` gets that checkpoint's weights when
    the model is rebuilt from a saved plan, as it does at conversion (the Lightning adapter restores a
    checkpoint whose plan differs from a fresh conversion, e.g. mixed bits)."""
    from detq_hooks.session import QuantSession

    float_teacher = TinyDet()
    with torch.no_grad():
        for p in float_teacher.parameters():
            p.add_(0.1)
    torch.save({"state_dict": float_teacher.state_dict()}, tmp_path / "teacher.ckpt")
    recipe = {"preset": "w4a8", "curriculum": {"enabled": True, "stages": [
        {"name": "body", "modules": ["net.0", "net.1", "net.3"], "outputs": ["net.4"]},
        {"name": "head", "modules": ["net.5", "net.7"]}]},
        "distillation": {"enabled": True, "teacher": str(tmp_path / "teacher.ckpt"),
                         "relational_weight": 0, "logit_weight": 0, "box_weight": 0}}
    first = QuantSession(recipe)
    model = TinyDet()
    first.convert(model)
    model.net[3].weight_quantizer.bits = 6
    entry = first.state(model)
    second = QuantSession(recipe)
    rebuilt = TinyDet()
    second.restore(rebuilt, entry, training=True)
    assert rebuilt.net[3].weight_quantizer.bits == 6
    for k, v in float_teacher.state_dict().items():
        assert torch.equal(second.teacher.module.state_dict()[k], v), k


def test_quantized_checkpoint_exports_as_integer_onnx_and_openvino(tmp_path, trained_ckpt):
    """The documented Lightning one-liner: load_quantized_checkpoint -> dq.export_onnx / dq.export_openvino."""
    import numpy as np
    import onnx

    import detq_hooks as dq
    from detq_hooks.deploy import make_runner, runtime_precisions
    from detq_hooks.onnx_graph import graph_summary

    path, _ = trained_ckpt
    model = load_quantized_checkpoint(TinyDet, path, map_location="cpu").eval()
    x, _ = _data(16, 1).tensors
    res = dq.export_onnx(model, x[:1], tmp_path / "m.onnx", input_names=["x"])
    ir = dq.export_openvino(model, x[:1], tmp_path / "m.xml", input_names=["x"])
    s = graph_summary(onnx.load(str(res.path)))
    assert res.quantized_convs == s["Conv"] == 4 and (s["Round"], s["Clip"]) == (0, 0)
    precisions = runtime_precisions(ir.xml)["Convolution"]  # u8, or i8 on AMX-INT8 CPUs
    assert set(precisions) <= {"u8", "i8"} and sum(precisions.values()) == 4
    with torch.no_grad():
        ref = model(x[:1]).numpy()
    for got in (make_runner(res.path, "onnxruntime")(x[:1].numpy())[0],
                make_runner(ir.xml, "openvino", precision="f32")(x[:1].numpy())[0]):
        # equal but where a different float summation order flips a rounding decision upstream (one 8-bit step,
        # spread by the following convs): >= 80 % of outputs within 1e-5, none off by 1 % of the output range
        d = np.abs(got - ref)
        assert (d > 1e-5).mean() <= 0.2 and d.max() <= 0.01 * np.abs(ref).max(), (float((d > 1e-5).mean()), float(d.max()))
