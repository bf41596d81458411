"""Fisher-aware quantization in the three trainers: the recipe's mixed precision after calibration (kept on
resume), the Fisher-trace regulariser as a loss term, critical-category mAP in each trainer's validation output.
Real (tiny) training runs on the synthetic data."""

from __future__ import annotations

import math
import os

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")

import pytest
import torch

from detq_hooks.detectors import UnsupportedDetectorError
from detq_hooks.fisher import FisherError

CRITICAL = ["circle", "ring"]  # frequent enough to have ground truth in a tiny validation split
FISHER = {"preset": "w4a8-fisher", "critical": {"classes": CRITICAL}, "calibration": {"num_batches": 2},
          "mixed_precision": {"num_batches": 2}, "fisher_regularizer": {"every": 1, "warmup": 0.1, "weight": 1.0}}
# warm-up 0.1: the first step adds nothing, later ones do (each trainer passes the progress of its budget)


def assert_task_loss_reached_the_regulariser(term, trainer_task_loss: float, penalty: float) -> None:
    """The adapter gave the regulariser the step's task loss in the units the penalty is added in, and the
    recipe's default cap (``max_share: 1``) held the penalty to it."""
    assert term.max_share == 1.0 and term.last_task_loss == pytest.approx(trainer_task_loss, rel=1e-4)
    assert 0 < penalty <= term.last_task_loss * (1 + 1e-5)
    if term.last_scale < 1.0:
        assert penalty == pytest.approx(term.last_task_loss, rel=1e-5)


def free_bits(layers: dict) -> list[int]:
    return [v["weight_bits"] for v in layers.values() if v.get("role", "body") not in ("first", "prediction")]


def average_bits(model) -> float:
    from detq_hooks.fisher import average_weight_bits

    return average_weight_bits(model)


# ============================================================================================ Ultralytics
class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    from detq_hooks.tools.data import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("synth"), num_train=16, num_val=8, imgsz=64, seed=0)


def test_ultralytics_fisher_recipe_end_to_end_and_resume(ds, tmp_path):
    pytest.importorskip("ultralytics")
    from ultralytics import YOLO

    from detq_hooks.ultralytics import DetQTrainer

    common = dict(imgsz=64, batch=8, amp=False, plots=False, workers=0, device="cpu", verbose=False, exist_ok=True,
                  seed=0, deterministic=True, val=True, nbs=8, warmup_epochs=0)
    seen = {}

    def at_start(trainer):
        model = trainer.model
        seen["bits"] = {n: m.weight_quantizer.bits for n, m in model.named_modules() if hasattr(m, "weight_quantizer")}
        seen["avg"] = average_bits(model)
        seen["plan"] = trainer.detq_session.last_mixed_precision
        seen["weights"] = {n: p.detach().clone() for n, p in model.named_parameters()}

    def interrupt(trainer):
        seen["trace"] = trainer.detq_session.terms[-1].last_trace
        seen["metrics"] = dict(trainer.metrics)
        raise Interrupt

    def step_end(trainer):  # loss_items: per-image losses; detq's own entries are the logged terms
        term = trainer.detq_session.terms[-1]
        task = sum(float(v) for k, v in trainer.loss_items.items() if k not in trainer.detq_session.log_names())
        seen["step"] = (term, task, trainer.detq_session.last_terms["fisher_reg"])

    model = YOLO("yolo11n.yaml")
    model.add_callback("on_train_start", at_start)
    model.add_callback("on_train_batch_end", step_end)
    model.add_callback("on_model_save", interrupt)
    with pytest.raises(Interrupt):
        model.train(data=str(ds.yolo_yaml), trainer=DetQTrainer, detq=FISHER, epochs=2, project=str(tmp_path),
                    name="fisher", **common)
    assert_task_loss_reached_the_regulariser(*seen["step"])
    # mixed precision ran after calibration: really mixed, within the budget counted over every quantized weight
    plan = seen["plan"]
    assert plan is not None and plan.used <= 4.0 and seen["avg"] == pytest.approx(plan.used, abs=1e-9)
    assert len(set(plan.allocation.values()) - {8}) >= 1 and len(set(plan.allocation.values())) >= 2
    assert all(seen["bits"][n] == b for n, b in plan.allocation.items())
    # the regulariser ran (every 2nd step) and its trace was logged; critical mAP beside the overall figures
    assert seen["trace"] is not None and seen["trace"] > 0
    m = seen["metrics"]
    for key in ("metrics/critical_mAP50-95(B)", "metrics/critical_mAP50(B)", "metrics/mAP50-95(B)"):
        assert key in m and not math.isnan(m[key]), key
    assert 0.0 <= m["metrics/critical_mAP50-95(B)"] <= m["metrics/critical_mAP50(B)"] <= 1.0
    # the saved plan is the mixed one; resume keeps it (no second allocation) and the results CSV has the columns
    weights = tmp_path / "fisher" / "weights"
    ckpt = torch.load(weights / "last.pt", map_location="cpu", weights_only=False)
    assert {n: v["weight_bits"] for n, v in ckpt["detq"]["layers"].items()} == plan.allocation
    resumed = {}
    again = YOLO(str(weights / "last.pt"))
    again.add_callback("on_train_start", lambda t: resumed.update(
        bits={n: m.weight_quantizer.bits for n, m in t.model.named_modules() if hasattr(m, "weight_quantizer")},
        plan=t.detq_session.last_mixed_precision))
    again.train(resume=True, trainer=DetQTrainer)
    assert resumed["plan"] is None and resumed["bits"] == seen["bits"]
    header = (tmp_path / "fisher" / "results.csv").read_text().splitlines()[0]
    assert "metrics/critical_mAP50-95(B)" in header and "fisher_reg" in header


def test_ultralytics_rtdetr_fisher_recipe_reads_its_queries(ds, tmp_path):
    """RT-DETR (a query head: critical positives by Hungarian matching): the Fisher plan is made from nonzero
    traces, the regulariser's trace is measured, critical mAP is reported."""
    pytest.importorskip("ultralytics")
    from ultralytics import RTDETR

    from test_ultralytics import rtdetr_tiny_yaml
    from detq_hooks.ultralytics import DetQTrainer

    seen = {}

    def at_start(trainer):
        seen["plan"] = trainer.detq_session.last_mixed_precision

    def at_end(trainer):
        seen["trace"] = trainer.detq_session.terms[-1].last_trace
        seen["metrics"] = dict(trainer.metrics)

    model = RTDETR(rtdetr_tiny_yaml(tmp_path / "rtdetr-tiny.yaml"))
    model.add_callback("on_train_start", at_start)
    model.add_callback("on_fit_epoch_end", at_end)
    model.train(data=str(ds.yolo_yaml), trainer=DetQTrainer, detq=FISHER, epochs=1, project=str(tmp_path), name="rtdetr",
                imgsz=64, batch=8, amp=False, plots=False, workers=0, device="cpu", verbose=False, exist_ok=True, seed=0,
                nbs=8, warmup_epochs=0)
    plan = seen["plan"]
    assert plan is not None and plan.used <= 4.0 and len(set(plan.allocation.values())) >= 2
    assert sum(t > 0 for t in plan.traces.values()) > len(plan.traces) // 2, plan.traces
    assert seen["trace"] is not None and seen["trace"] > 0
    assert "metrics/critical_mAP50-95(B)" in seen["metrics"]


def test_ultralytics_unknown_critical_class_fails_before_training(ds, tmp_path):
    pytest.importorskip("ultralytics")
    from ultralytics import YOLO

    from detq_hooks.ultralytics import DetQTrainer

    model = YOLO("yolo11n.yaml")
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    with pytest.raises(FisherError, match=r"`critical.classes` names .pedestrian., which is not a class of the data set.*circle"):
        model.train(data=str(ds.yolo_yaml), trainer=DetQTrainer, epochs=1, imgsz=64, batch=8, workers=0,
                    device="cpu", project=str(tmp_path), name="bad", plots=False, amp=False,
                    detq={"preset": "w4a8-fisher", "critical": {"classes": ["pedestrian"]}})
    assert all(torch.equal(v, model.model.state_dict()[k]) for k, v in before.items())


# ============================================================================================ MMDetection
def _mmdet_fisher_run(tmp_path, config, work, epochs=1):
    """A real MMDetection run of ``config`` (96 px, 8 images) with the Fisher recipe; checks the mixed-precision
    plan, the regulariser's trace and critical AP in the validation output. Returns (runner, synth, recipe,
    validation metrics, plan)."""
    from mmengine.hooks import Hook
    from mmengine.runner import Runner

    from test_mmdet import hook_recipe, load_cfg  # the shrunk configs of the MMDetection tests
    from detq_hooks.tools.data import make_synthetic_dataset

    synth = make_synthetic_dataset(tmp_path / "synth", num_train=8, num_val=4, imgsz=96, seed=0)
    recipe = {**FISHER, "calibration": {"num_batches": 1}, "mixed_precision": {"num_batches": 1}}
    runner = Runner.from_cfg(hook_recipe(load_cfg(config, synth, work, epochs=epochs), recipe))
    steps = []

    class LastStep(Hook):
        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            steps.append((float(outputs["loss"]), float(outputs["loss_fisher_reg"])))

    runner.register_hook(LastStep(), priority="LOWEST")
    runner.train()
    hook = next(h for h in runner.hooks if type(h).__name__ == "DetQHook")
    total, penalty = steps[-1]
    assert_task_loss_reached_the_regulariser(hook.session.terms[-1], total - penalty, penalty)
    plan = hook.session.last_mixed_precision
    assert plan is not None and plan.used <= 4.0 and len(set(plan.allocation.values())) >= 2
    assert hook.session.terms[-1].name == "fisher_reg" and hook.session.terms[-1].last_trace > 0
    metrics = runner.val()
    assert 0.0 <= metrics["coco/critical_bbox_mAP"] <= metrics["coco/critical_bbox_mAP_50"] <= 1.0
    return runner, synth, recipe, metrics, plan


def test_mmdet_detr_fisher_recipe_critical_metrics_and_resume(tmp_path):
    pytest.importorskip("mmdet")
    pytest.importorskip("mmcv.ops")
    from mmengine.runner import Runner

    from test_mmdet import hook_recipe, load_cfg

    work = tmp_path / "detr"
    _, synth, recipe, metrics, plan = _mmdet_fisher_run(tmp_path, "detr_r18_synthetic_w4a8.py", work, epochs=2)
    assert {"coco/critical_bbox_mAP", "coco/critical_bbox_mAP_50", "coco/bbox_mAP"} <= set(metrics)
    saved = torch.load(work / "epoch_1.pth", map_location="cpu", weights_only=False)["meta"]["detq"]["layers"]
    assert {n: v["weight_bits"] for n, v in saved.items()} == plan.allocation
    # resume from epoch 1: the saved bits, no second allocation
    resumed = Runner.from_cfg(hook_recipe(load_cfg("detr_r18_synthetic_w4a8.py", synth, tmp_path / "resume", epochs=2,
                                                   resume=True, load_from=str(work / "epoch_1.pth")), recipe))
    resumed.train()
    again = next(h for h in resumed.hooks if type(h).__name__ == "DetQHook")
    assert again.session.last_mixed_precision is None
    from detq_hooks import quantized_layers

    assert {n: m.weight_quantizer.bits for n, m in quantized_layers(resumed.model)} == plan.allocation


def test_mmdet_fisher_mixed_precision_reaches_the_ema_copy_and_resumes(tmp_path):
    """RTMDet's config keeps MMDetection's EMAHook, whose averaged copy is made before calibration: the plan's
    per-layer bits must reach that copy too (it used to be refused as a checkpoint of other bits), be saved in
    ``ema_state_dict`` and come back on resume."""
    pytest.importorskip("mmdet")
    pytest.importorskip("mmcv.ops")
    from mmengine.runner import Runner

    from detq_hooks import quantized_layers
    from test_mmdet import hook_recipe, load_cfg

    work = tmp_path / "rtmdet"
    runner, synth, recipe, _, plan = _mmdet_fisher_run(tmp_path, "rtmdet_tiny_synthetic_w4a8.py", work, epochs=2)
    ema = next(h for h in runner.hooks if type(h).__name__ == "EMAHook").ema_model.module
    assert {n: m.weight_quantizer.bits for n, m in quantized_layers(ema)} == plan.allocation
    saved = torch.load(work / "epoch_1.pth", map_location="cpu", weights_only=False)
    two_bit = next(n for n, b in plan.allocation.items() if b == 2)
    assert int(saved["ema_state_dict"][f"module.{two_bit}.weight_quantizer.bits_state"]) == 2
    resumed = Runner.from_cfg(hook_recipe(load_cfg("rtmdet_tiny_synthetic_w4a8.py", synth, tmp_path / "resume",
                                                   epochs=2, resume=True, load_from=str(work / "epoch_1.pth")), recipe))
    resumed.train()
    ema = next(h for h in resumed.hooks if type(h).__name__ == "EMAHook").ema_model.module
    assert {n: m.weight_quantizer.bits for n, m in quantized_layers(ema)} == plan.allocation
    assert {n: m.weight_quantizer.bits for n, m in quantized_layers(resumed.model)} == plan.allocation


def _train_batch(runner):
    """One preprocessed training batch as ``model.loss`` receives it: (inputs, data_samples)."""
    batch = runner.model.data_preprocessor(next(iter(runner.train_dataloader)), True)
    return batch["inputs"], batch["data_samples"]


def _recorded_head(model, family, batch):
    """The family's head outputs of one forward of ``model``, and how many queries the head itself returned."""
    from detq_hooks.recording import Recorder

    recorder = Recorder(model, family.head_taps(model), always=True)
    try:
        family.teacher_forward(model, batch)
        recorded = recorder.recorded
        return family.head_outputs(model, recorded, batch), recorded.output("bbox_head")[0].shape[-2]
    finally:
        recorder.remove()


def test_mmdet_conditional_detr_sigmoid_query_head_fisher_run(tmp_path):
    """Conditional DETR: a DETR head (queries, Hungarian positives) with sigmoid focal classification — the
    critical objective's sigmoid transform on queries, Fisher mixed precision and the regulariser in a real run."""
    pytest.importorskip("mmdet")
    pytest.importorskip("mmcv.ops")
    from detq_hooks.critical import CriticalObjective
    from detq_hooks.detectors import family_for

    runner, synth, *_ = _mmdet_fisher_run(tmp_path, "conditional_detr_cspnext_synthetic_w4a8.py", tmp_path / "w")
    batch = _train_batch(runner)
    model = runner.model
    family = family_for(model)
    head, _ = _recorded_head(model, family, batch)
    assert head.score_kind == "sigmoid" and head.cls_logits.shape[-2:] == (30, 8)  # 30 queries, no no-object column
    model.zero_grad()
    ids = [synth.classes.index(c) for c in CRITICAL]
    loss = CriticalObjective(family, ids)(model, batch)
    loss.backward()
    fc_cls = model.bbox_head.fc_cls.weight.grad
    assert torch.isfinite(loss) and float(loss.detach()) > 0
    others = [i for i in range(8) if i not in ids]
    # the sigmoid transform: each critical class keeps its own score, "other" is the max of the non-critical ones
    assert all(float(fc_cls[i].abs().sum()) > 0 for i in ids) and any(float(fc_cls[i].abs().sum()) > 0 for i in others)


def test_mmdet_dino_fisher_run_reads_matching_queries_not_denoising_ones(tmp_path):
    """DINO: a DETR head with a classifier per decoder layer (``cls_branches``), two-stage proposals and
    denoising queries in training — Fisher mixed precision, the regulariser and critical AP in a real run, and
    the family reading the last decoder layer's 30 matching queries (not the denoising ones)."""
    pytest.importorskip("mmdet")
    pytest.importorskip("mmcv.ops")
    from detq_hooks.detectors import family_for

    runner, *_ = _mmdet_fisher_run(tmp_path, "dino_r18_synthetic_w4a8.py", tmp_path / "w")
    batch = _train_batch(runner)
    model = runner.model.train()  # in training mode DINO adds denoising queries in front
    family = family_for(model)
    # the last decoder layer's branch (3 layers; branch 3 scores two-stage's proposals)
    assert family.head_taps(model).inputs == ["bbox_head.cls_branches.2"]
    head, head_queries = _recorded_head(model, family, batch)
    assert head_queries > 30
    assert head.score_kind == "sigmoid" and head.cls_logits.shape[-2:] == (30, 8)
    assert head.embeddings.shape[-2] == 30 and head.boxes.shape[-2:] == (30, 4)


# ============================================================================================ Lightning
def test_lightning_fcos_fisher_recipe_critical_metrics_and_resume(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from test_lightning import TinyFCOS, det_loader

    from detq_hooks import quantized_layers
    from detq_hooks.lightning import DetQCallback

    class FCOSWithVal(TinyFCOS):
        class_names = ["__background__", "a", "b", "c"]  # torchvision labels: 0 is the background

        def validation_step(self, batch, batch_idx):
            return self.model(batch[0])  # detections: the callback reads them

        def test_step(self, batch, batch_idx):
            return None  # no detections returned: the callback runs the quantized model itself

    recipe = {**FISHER, "critical": {"classes": ["a", "b"]}}
    steps = []

    class LastStep(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            cb = next(c for c in trainer.callbacks if isinstance(c, DetQCallback))
            penalty = cb.last_loss_terms["fisher_reg"]
            steps.append((cb.session.terms[-1], float(loss) - penalty, penalty))

    def fit(ckpt_path=None, epochs=2):
        torch.manual_seed(0)
        cb = DetQCallback(recipe, target="model")
        trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0,
                             callbacks=[cb, pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1,
                                                                         filename="{epoch}"), LastStep()])
        module = FCOSWithVal()
        trainer.fit(module, det_loader(), det_loader(n=4), ckpt_path=ckpt_path)
        return trainer, cb, module

    trainer, cb, module = fit()
    assert_task_loss_reached_the_regulariser(*steps[-1])
    plan = cb.session.last_mixed_precision
    assert plan is not None and plan.used <= 4.0 and len(set(plan.allocation.values())) >= 2
    assert "fisher_reg" in cb.last_loss_terms and cb.session.terms[-1].last_trace > 0
    m = trainer.callback_metrics
    assert {"val/critical_mAP50-95", "val/critical_mAP50"} <= set(m)
    assert 0.0 <= float(m["val/critical_mAP50-95"]) <= float(m["val/critical_mAP50"]) <= 1.0
    tested = trainer.test(module, det_loader(n=4), verbose=False)[0]
    assert tested["test/critical_mAP50-95"] == pytest.approx(float(m["val/critical_mAP50-95"]), abs=1e-6)
    # resume from the first epoch's checkpoint: the saved bits, no second allocation
    trainer2, cb2, module2 = fit(ckpt_path=str(tmp_path / "ckpt" / "epoch=0.ckpt"))
    assert cb2.session.last_mixed_precision is None
    assert {n: q.weight_quantizer.bits for n, q in quantized_layers(module2.model)} == plan.allocation


def test_lightning_ptq_with_fisher_mixed_precision_from_validate(tmp_path):
    """PTQ's mixed precision in ``trainer.validate()``: Lightning runs it under inference mode, where the Fisher
    traces (autograd) and the batches it loaded (inference tensors) would fail."""
    pl = pytest.importorskip("lightning.pytorch")
    from test_lightning import TinyFCOS, det_loader

    from detq_hooks import quantized_layers
    from detq_hooks.lightning import DetQCallback

    class FCOSWithVal(TinyFCOS):
        def validation_step(self, batch, batch_idx):
            return self.model(batch[0])

    torch.manual_seed(0)
    cb = DetQCallback({"preset": "w4a8-ptq", "calibration": {"num_batches": 2},
                       "mixed_precision": {"enabled": True, "num_batches": 2, "budget": {"avg_weight_bits": 5.0}}},
                      target="model")
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, callbacks=[cb])
    module = FCOSWithVal()
    trainer.validate(module, det_loader(n=4))
    plan = cb.last_calibration.mixed_precision
    assert plan is not None and 4.5 < plan.used <= 5.0 and len(set(plan.allocation.values())) >= 2
    assert {n: q.weight_quantizer.bits for n, q in quantized_layers(module.model)} == plan.allocation
    assert average_bits(module.model) == pytest.approx(plan.used)


def test_lightning_regulariser_on_a_head_no_family_reads_fails_before_training(tmp_path):
    pytest.importorskip("lightning.pytorch")
    from test_lightning import TinyDet, loader, trainer

    from detq_hooks import is_quantized
    from detq_hooks.lightning import DetQCallback

    model = TinyDet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedDetectorError, match=r"`fisher_regularizer` needs the critical-category objective.*"
                                                      r"TinyDet is not a detector family"):
        trainer(tmp_path, [DetQCallback("w4a8-fisher")]).fit(model, loader())
    assert not is_quantized(model) and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
