"""DetQHook in real MMDetection runs: RTMDet-tiny, RetinaNet-R18 and a slim DETR-R18, from the configs under
integrations/mmdet, shrunk to 96 px images on the synthetic COCO data."""

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("mmdet")
pytest.importorskip("mmcv.ops")

from mmengine.config import Config  # noqa: E402
from mmengine.hooks import Hook  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

import detq_hooks as dq  # noqa: E402
from detq_hooks.tools.data import make_synthetic_dataset  # noqa: E402
from detq_hooks.recipe import RecipeError  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "integrations" / "mmdet"
SIZE = 96


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("synth"), num_train=8, num_val=4, imgsz=SIZE, seed=0)


def _shrink(node):
    """Image scales of the configs' pipelines -> SIZE; random flips off (so resumed runs are comparable)."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("scale", "size", "img_scale") and isinstance(v, (tuple, list)) and len(v) == 2:
                node[k] = (SIZE, SIZE)
            elif k == "type" and v == "RandomFlip":
                node["prob"] = 0.0
            else:
                _shrink(v)
    elif isinstance(node, list):
        for v in node:
            _shrink(v)


def load_cfg(name, synth, work_dir, epochs=1, batch=4, **options):
    os.environ["DETQ_SYNTH_ROOT"] = str(synth.root) + "/"
    cfg = Config.fromfile(str(CONFIGS / name))
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        cfg[loader]["batch_size"] = batch
        _shrink(cfg[loader]["dataset"]["pipeline"])
    cfg.train_cfg = dict(type="EpochBasedTrainLoop", max_epochs=epochs, val_interval=epochs)
    cfg.param_scheduler = [dict(type="LinearLR", start_factor=0.5, by_epoch=False, begin=0, end=2)]
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=1, max_keep_ckpts=3)
    cfg.default_hooks.logger = dict(type="LoggerHook", interval=1)
    cfg.default_hooks.visualization = dict(type="DetVisualizationHook", draw=False)
    cfg.visualizer = dict(type="DetLocalVisualizer", vis_backends=[])
    cfg.work_dir = str(work_dir)
    cfg.randomness = dict(seed=0)
    cfg.log_level = "WARNING"
    if "score_thr" in cfg.model.get("test_cfg", {}):  # a briefly trained model still yields detections to score
        cfg.model.test_cfg.score_thr = 0.0
    cfg.merge_from_dict(options)
    return cfg


def hook_recipe(cfg, recipe, **kw):
    for h in cfg.custom_hooks:
        if h["type"] == "DetQHook":
            h.update(recipe=recipe, calibration_batches=kw.pop("calibration_batches", 1), **kw)
    return cfg


def quantizer_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "_quantizer." in k}


@pytest.fixture(scope="module")
def rtmdet_run(synth, tmp_path_factory):
    work = tmp_path_factory.mktemp("rtmdet")
    runner = Runner.from_cfg(hook_recipe(load_cfg("rtmdet_tiny_synthetic_w4a8.py", synth, work, epochs=2), "w4a8"))
    calibrated = {}
    runner.register_hook(_Snapshot(calibrated), priority="LOWEST")
    runner.train()
    return runner, work, calibrated


class _Snapshot(Hook):
    """Records the quantizer state right after calibration (before the first iteration)."""

    def __init__(self, out):
        self.out = out

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        if not self.out:
            self.out.update(quantizer_state(runner.model))


def test_rtmdet_quantized_scales_learn_and_ema_keeps_quantizers(rtmdet_run):
    runner, work, calibrated = rtmdet_run
    model = runner.model
    layers = dq.quantized_layers(model)
    assert len(layers) > 50
    bits = {n: m.weight_quantizer.bits for n, m in layers}
    assert bits["backbone.stem.0.conv"] == 8  # the first layer stays at 8 bits
    assert all(bits[n] == 8 for n in bits if n.startswith("bbox_head.rtm_cls") or n.startswith("bbox_head.rtm_reg"))
    assert sum(b == 4 for b in bits.values()) > 40
    now = quantizer_state(model)
    changed = [k for k in calibrated if k.endswith(".scale") and not torch.allclose(calibrated[k], now[k])]
    assert len(changed) > 20, "learned scales did not move during training"
    ckpt = torch.load(work / "epoch_2.pth")
    assert ckpt["meta"]["detq"]["recipe"]["name"] == "w4a8"
    assert any(".input_quantizer.scale" in k for k in ckpt["ema_state_dict"])


def test_rtmdet_resume_and_test_reproduce(rtmdet_run, synth, tmp_path):
    runner, work, _ = rtmdet_run
    final = torch.load(work / "epoch_2.pth")["state_dict"]
    # resume from the end of epoch 1 and train epoch 2 again: the same quantizer state as the uninterrupted run
    resumed = Runner.from_cfg(hook_recipe(load_cfg("rtmdet_tiny_synthetic_w4a8.py", synth, tmp_path / "resume", epochs=2,
                                                   resume=True, load_from=str(work / "epoch_1.pth")), "w4a8"))
    resumed.train()
    again = resumed.model.state_dict()
    for k, v in final.items():
        if "_quantizer." in k and v.is_floating_point():
            assert torch.allclose(again[k], v, rtol=1e-4, atol=1e-6), k
    # Runner.test() of the saved quantized checkpoint gives the validation mAP of the end of training
    val_map = runner.val()["coco/bbox_mAP"]
    tester = Runner.from_cfg(hook_recipe(load_cfg("rtmdet_tiny_synthetic_w4a8.py", synth, tmp_path / "test",
                                                  load_from=str(work / "epoch_2.pth")), "w4a8"))
    res = tester.test()
    assert dq.is_quantized(tester.model)
    assert res["coco/bbox_mAP"] == pytest.approx(val_map, abs=1e-4)


def test_quantized_checkpoint_loads_exports_and_scores_like_pytorch(rtmdet_run, synth, tmp_path):
    """Config + a DetQHook checkpoint -> the quantized detector -> integer ONNX / OpenVINO IR, each scored by the
    config's own evaluator with the head's own decoding: the mAP of every exported model is the PyTorch one."""
    import onnx

    from detq_hooks.deploy import make_runner, ort_op_counts, runtime_precisions
    from detq_hooks.mmengine.deploy import evaluate_exported, example_input, exportable, load_quantized_detector

    runner, work, _ = rtmdet_run
    cfg = load_cfg("rtmdet_tiny_synthetic_w4a8.py", synth, tmp_path / "export")
    model = load_quantized_detector(cfg, work / "epoch_2.pth")
    saved = torch.load(work / "epoch_2.pth")["state_dict"]
    assert not model.training and {k: v for k, v in model.state_dict().items()}.keys() == saved.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    bits = {n: m.weight_quantizer.bits for n, m in dq.quantized_layers(model)}
    assert bits == {n: m.weight_quantizer.bits for n, m in dq.quantized_layers(runner.model)}
    pytorch_dets: list = []
    pytorch_map = evaluate_exported(model, None, cfg, predictions=pytorch_dets)["coco/bbox_mAP"]
    assert pytorch_map == pytest.approx(runner.val()["coco/bbox_mAP"], abs=1e-4)  # what Runner.test() reports

    x = example_input(model, cfg)
    assert x.shape == (1, 3, SIZE, SIZE)
    res = dq.export_onnx(exportable(model), x, tmp_path / "rtmdet.onnx")
    graph = onnx.load(str(res.path)).graph
    weights = [i for i in graph.initializer if len(i.dims) == 4]
    assert weights and all(i.data_type == onnx.TensorProto.INT8 for i in weights)
    assert not {n.op_type for n in graph.node} & {"Round", "Clip"}
    # every Conv of the graph is quantized (the head's convs shared across levels appear once per level)
    assert res.quantized_convs == sum(n.op_type == "Conv" for n in graph.node) > len(bits)
    with torch.no_grad():
        ref = [t.numpy() for t in exportable(model)(x)]
    got = make_runner(res.path, "onnxruntime")(x.numpy())
    n_cls = 3  # RTMDet: class scores of three levels, then box regressions
    for r, g in zip(ref[:n_cls], got[:n_cls]):
        assert np.abs(1 / (1 + np.exp(-r)) - 1 / (1 + np.exp(-g))).max() < 2e-3
    for r, g in zip(ref[n_cls:], got[n_cls:]):  # distances in pixels
        assert np.abs(r - g).max() < 0.5
    ort_dets: list = []
    assert evaluate_exported(model, make_runner(res.path, "onnxruntime"), cfg, predictions=ort_dets)["coco/bbox_mAP"] \
        == pytest.approx(pytorch_map, abs=0.005)
    # a model trained 2 epochs scores ~0 mAP, so compare the decoded detections themselves (after NMS): their
    # score distribution. Which of hundreds of near-equal boxes (scores ~0.01) survive NMS, and so how many, may
    # differ; the raw outputs above are the element-wise check.
    assert [d["img_id"] for d in ort_dets] == [d["img_id"] for d in pytorch_dets] and len(ort_dets) == 4
    for ours, ref_dets in zip(ort_dets, pytorch_dets):
        k = min(len(ours["scores"]), len(ref_dets["scores"]), 20)
        assert k >= 5
        np.testing.assert_allclose(np.sort(ours["scores"])[::-1][:k], np.sort(ref_dets["scores"])[::-1][:k], atol=2e-3)

    ir = dq.export_openvino(exportable(model), x, tmp_path / "rtmdet.xml")
    precisions = runtime_precisions(ir.xml)
    # integer convolutions: u8, or i8 (signed activations) on CPUs with AMX-INT8, where OpenVINO runs some so
    assert all(set(p) <= {"u8", "i8"} for p in precisions.values())
    assert sum(n for p in precisions.values() for n in p.values()) == res.quantized_convs
    assert evaluate_exported(model, make_runner(ir.xml, "openvino"), cfg)["coco/bbox_mAP"] == \
        pytest.approx(pytorch_map, abs=0.005)

    ort = dq.export_onnx(exportable(model), x, tmp_path / "rtmdet_ort.onnx", target="onnxruntime",
                         calibration_inputs=[x])
    not_fused = [n for n in ort.notes if "graph output" in n]
    assert len(not_fused) == 3 and all("rtm_cls" in n for n in not_fused)  # class logits are the graph's outputs
    assert ort_op_counts(ort.path)["QLinearConv"] == res.quantized_convs - 3


def test_quantized_detector_loading_and_export_refuse_what_they_cannot_do(rtmdet_run, synth, tmp_path):
    from mmdet.registry import MODELS

    from detq_hooks.export import ExportError
    from detq_hooks.mmengine.deploy import exportable, load_quantized_detector

    runner, work, _ = rtmdet_run
    cfg = load_cfg("rtmdet_tiny_synthetic_w4a8.py", synth, tmp_path)
    float_ckpt = tmp_path / "float.pth"
    torch.save({"state_dict": MODELS.build(cfg.model).state_dict(), "meta": {}}, float_ckpt)
    with pytest.raises(dq.checkpoint.CheckpointMismatchError, match="float.pth: no detq quantization state"):
        load_quantized_detector(cfg, float_ckpt)
    other = load_cfg("retinanet_r18_synthetic_w4a8.py", synth, tmp_path)
    with pytest.raises(dq.checkpoint.CheckpointMismatchError, match="epoch_2.pth"):
        load_quantized_detector(other, work / "epoch_2.pth")
    detr = MODELS.build(load_cfg("detr_r18_synthetic.py", synth, tmp_path).model)
    with pytest.raises(ExportError, match="DETR: DETR-family detectors are not exportable here yet"):
        exportable(detr)


@pytest.mark.parametrize("config, quantized_min", [("retinanet_r18_synthetic_w4a8.py", 25), ("detr_r18_synthetic_w4a8.py", 30)])
def test_model_trains_quantized_and_test_reproduces_val(config, quantized_min, synth, tmp_path):
    cfg = hook_recipe(load_cfg(config, synth, tmp_path, epochs=1), "w4a8")
    runner = Runner.from_cfg(cfg)
    before = {}
    runner.register_hook(_Snapshot(before), priority="LOWEST")
    runner.train()
    assert len(dq.quantized_layers(runner.model)) >= quantized_min
    now = quantizer_state(runner.model)
    assert any(k.endswith(".scale") and not torch.allclose(before[k], now[k]) for k in before)
    if "detr" in config:
        # nn.MultiheadAttention reads out_proj.weight itself: those stay float (and the report says so)
        assert not any(n.endswith("out_proj") for n, _ in dq.quantized_layers(runner.model))
    val_map = runner.val()["coco/bbox_mAP"]
    tester = Runner.from_cfg(hook_recipe(load_cfg(config, synth, tmp_path / "test", load_from=str(tmp_path / "epoch_1.pth")), "w4a8"))
    assert tester.test()["coco/bbox_mAP"] == pytest.approx(val_map, abs=1e-4)


def test_float_checkpoint_resumed_into_quantized_config_and_unmatched_rule_fail_early(synth, tmp_path):
    float_cfg = load_cfg("retinanet_r18_synthetic.py", synth, tmp_path / "float", epochs=1)
    float_cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=1, val_interval=100)
    float_cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=1, by_epoch=False)
    Runner.from_cfg(float_cfg).train()
    ckpt = tmp_path / "float" / "iter_1.pth"
    cfg = hook_recipe(load_cfg("retinanet_r18_synthetic_w4a8.py", synth, tmp_path / "q", resume=True, load_from=str(ckpt)), "w4a8")
    with pytest.raises(dq.checkpoint.CheckpointMismatchError, match="written by a float run"):
        Runner.from_cfg(cfg).train()
    bad = {"preset": "w4a8", "quantization": {"rules": [{"name": "roi_head.*", "quantize": False}]}}
    runner = Runner.from_cfg(hook_recipe(load_cfg("retinanet_r18_synthetic_w4a8.py", synth, tmp_path / "r"), bad))
    with pytest.raises(RecipeError, match="matches no quantizable module"):
        runner.train()
    assert not dq.is_quantized(runner.model)


class _CurriculumProbe(Hook):
    """Per iteration: the curriculum stage, whether the head is quantized, the head weights after the step,
    and the distillation terms the hook logged."""

    def __init__(self):
        self.rows = []

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        model = runner.model
        head = [m for n, m in dq.quantized_layers(model) if n.startswith("bbox_head.")]
        self.rows.append(dict(iter=runner.iter, head_quantized=all(m.weight_quantizer.enabled for m in head),
                              head_weight=model.bbox_head.retina_cls.weight.detach().clone()))

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        detq = [h for h in runner.hooks if type(h).__name__ == "DetQHook"][0]
        terms = {k[len("distill_"):]: v for k, v in detq.session.last_terms.items() if k.startswith("distill_")}
        self.rows[-1].update(stage=detq.session.schedule.current, terms=terms,
                             head_weight_after=runner.model.bbox_head.retina_cls.weight.detach().clone(),
                             loss_distill=float(outputs["loss_distill"]) if "loss_distill" in outputs else None)


CRQAT = {"preset": "w4a4-crqat", "curriculum": {"boundaries": [0.3, 0.6]}}


def _crqat_cfg(synth, work, float_ckpt, config="retinanet_r18_synthetic_w4a8.py", recipe=CRQAT, **options):
    cfg = hook_recipe(load_cfg(config, synth, work, load_from=str(float_ckpt), **options), recipe)
    cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=6, val_interval=100)
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=3, by_epoch=False)
    return cfg


@pytest.fixture(scope="module")
def float_retinanet(synth, tmp_path_factory):
    work = tmp_path_factory.mktemp("float_retina")
    cfg = load_cfg("retinanet_r18_synthetic.py", synth, work)
    cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=2, val_interval=100)
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=2, by_epoch=False)
    Runner.from_cfg(cfg).train()
    return work / "iter_2.pth"


class _TermsProbe(Hook):
    """Per iteration: the curriculum stage and the loss terms DetQHook added."""

    def __init__(self):
        self.rows = []

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        detq = next(h for h in runner.hooks if type(h).__name__ == "DetQHook")
        self.rows.append((detq.session.schedule.current, dict(detq.session.last_terms)))


def _train_recording_terms(cfg):
    """Trains ``cfg``; the runner and, per iteration, the curriculum stage and DetQHook's loss terms."""
    runner = Runner.from_cfg(cfg)
    probe = _TermsProbe()
    runner.register_hook(probe, priority="LOWEST")
    runner.train()
    return runner, probe.rows


@pytest.mark.parametrize("config, expected", [
    ("rtmdet_tiny_synthetic.py", [("backbone", ["backbone"]), ("neck", ["neck"]), ("head", ["bbox_head"])]),
    ("detr_r18_synthetic.py", [("backbone", ["backbone"]), ("neck", ["neck", "encoder", "decoder", "query_embedding"]),
                               ("head", ["bbox_head"])]),
    ("dino_r18_synthetic.py", [("backbone", ["backbone"]), ("neck", ["neck", "encoder", "decoder", "query_embedding",
                                                                     "memory_trans_fc", "memory_trans_norm",
                                                                     "dn_query_generator", "",
                                                                     "bbox_head.reg_branches", "bbox_head.cls_branches.3"]),
                               ("head", ["bbox_head"])]),
])
def test_curriculum_stages_of_mmdet_detectors(synth, tmp_path, config, expected):
    """Backbone / neck (with a DETR's transformer, the detector's own parameters and the head branches the
    transformer calls: DINO's box refinement and its encoder-proposal scoring, branch ``num_layers`` = 3) / head.
    Two stages for DETRs (the whole head with the transformer) were measured on the slim DINO and kept less with
    CR-QAT alone at W4A4; a recipe names them where wanted (README)."""
    from mmdet.registry import MODELS

    from detq_hooks.curriculum import assign_parameters
    from detq_hooks.detectors.mmdet import MMDetFamily

    model = MODELS.build(copy.deepcopy(load_cfg(config, synth, tmp_path).model))
    stages = MMDetFamily().stages(model)
    assert [(s.name, s.prefixes) for s in stages] == expected
    assign_parameters(model, stages)  # every parameter in exactly one stage, or a RecipeError


MMDET_DETRS = {  # MMDetection's own DETR configs, on a ResNet-18 (its channels into the neck)
    "deformable_detr/deformable-detr-refine-twostage_r50_16xb2-50e_coco.py": [128, 256, 512],
    "deformable_detr/deformable-detr_r50_16xb2-50e_coco.py": [128, 256, 512],
    "dab_detr/dab-detr_r50_8xb2-50e_coco.py": [512],
    "ddq/ddq-detr-4scale_r50_8xb2-12e_coco.py": [128, 256, 512],
    # two-stage without box refinement (no such config ships): its branches are one shared pair, which scores the
    # encoder's proposals, so the transformer calls the whole head and the family drops the head stage
    "deformable_detr/deformable-detr_r50_16xb2-50e_coco.py+as_two_stage": [128, 256, 512],
}


@pytest.mark.parametrize("config", ["rtmdet_tiny_synthetic.py", "detr_r18_synthetic.py", "dino_r18_synthetic.py",
                                    *MMDET_DETRS])
def test_every_layer_is_in_the_curriculum_stage_of_its_first_call(synth, tmp_path, config):
    """The curriculum trains stages in data-flow order, so no module may first run before a module of an earlier
    stage has: DINO's decoder calls the head's box branches (reference-point refinement) and scores the encoder's
    proposals with the head's last branch pair; in the head stage they stayed float and frozen while the decoder
    that calls them trained, and with Fisher mixed precision switched to 2 bits late (README, "DINO")."""
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope
    from mmengine.runner import Runner

    from detq_hooks.detectors.mmdet import MMDetFamily

    init_default_scope("mmdet")
    cfg = load_cfg(config if config.endswith("_synthetic.py") else "dino_r18_synthetic.py", synth, tmp_path)
    if config in MMDET_DETRS:  # the synthetic data's pipeline, MMDetection's model
        path, _, flag = config.partition("+")
        (tmp_path / "cfg.py").write_text(f"_base_ = ['mmdet::{path}']\n")
        model_cfg = Config.fromfile(str(tmp_path / "cfg.py")).model
        if flag:
            model_cfg[flag] = True
        model_cfg.backbone.update(depth=18, init_cfg=None)
        model_cfg.neck.in_channels = MMDET_DETRS[config]
        model_cfg.bbox_head.num_classes = cfg.model.bbox_head.num_classes
        model_cfg.num_queries = 50  # two-stage models pick their queries among the encoder's 85 tokens at 64 px
        cfg.model = model_cfg
    model = MODELS.build(copy.deepcopy(cfg.model))
    model.init_weights()
    stages = MMDetFamily().stages(model)
    first_calls = []
    handles = [m.register_forward_pre_hook(lambda mod, args, name=n: first_calls.append(name))
               for n, m in model.named_modules() if n and any(True for _ in m.parameters(recurse=False))]
    batch = model.data_preprocessor(next(iter(Runner.build_dataloader(cfg.train_dataloader))), True)
    model.loss(batch["inputs"], batch["data_samples"])
    for h in handles:
        h.remove()
    order = list(dict.fromkeys(first_calls))
    stage_of = [next(i for i, s in enumerate(stages) if s.contains(n)) for n in order]
    late = [(n, stages[i].name) for k, (n, i) in enumerate(zip(order, stage_of)) if i > min(stage_of[k:])]
    assert not late, f"first called before a module of an earlier stage: {late[:5]}"
    assert len(order) > 20 and stage_of[0] == 0 and stage_of[-1] == len(stages) - 1
    if config.endswith("+as_two_stage"):
        assert [s.name for s in stages] == ["backbone", "neck"]


def test_crqat_on_dino_stages_cover_the_detector_and_query_terms_are_distilled(synth, tmp_path):
    """DINO (Deformable-DETR family): the detector's own parameters (level_embed) fall in the transformer stage,
    and the head terms pair student and teacher queries (the student's denoising queries left out)."""
    from mmdet.registry import MODELS

    float_cfg = load_cfg("dino_r18_synthetic.py", synth, tmp_path / "float")
    model = MODELS.build(copy.deepcopy(float_cfg.model))
    model.init_weights()
    float_ckpt = tmp_path / "dino_float.pth"
    torch.save({"state_dict": model.state_dict(), "meta": {}}, float_ckpt)
    runner, terms = _train_recording_terms(_crqat_cfg(synth, tmp_path, float_ckpt, config="dino_r18_synthetic_w4a8.py"))
    detq = next(h for h in runner.hooks if type(h).__name__ == "DetQHook")
    stages = detq.session.schedule.stages
    assert [s.name for s in stages] == ["backbone", "neck", "head"] and "" in stages[1].prefixes
    assert [k for k, _ in terms] == [0, 0, 1, 1, 2, 2]
    last = terms[-1][1]
    assert all(last[f"distill_{k}"] > 0 for k in ("logit", "box", "relational")), last


def test_two_stage_faster_rcnn_trains_with_feature_distillation_only(synth, tmp_path):
    """Faster R-CNN (rpn_head + roi_head): no family reads its heads, so CR-QAT with the head terms off distils the
    backbone's and neck's features through the curriculum; the teacher runs backbone and neck only."""
    from mmdet.registry import MODELS

    float_cfg = load_cfg("faster_rcnn_r18_synthetic.py", synth, tmp_path / "float")
    model = MODELS.build(copy.deepcopy(float_cfg.model))
    model.init_weights()
    float_ckpt = tmp_path / "faster_float.pth"
    torch.save({"state_dict": model.state_dict(), "meta": {}}, float_ckpt)
    recipe = {**CRQAT, "preset": "w4a8-crqat",
              "distillation": {"relational_weight": 0, "logit_weight": 0, "box_weight": 0}}
    runner, terms = _train_recording_terms(_crqat_cfg(synth, tmp_path, float_ckpt, config="faster_rcnn_r18_synthetic_w4a8.py",
                                                      recipe=recipe, batch=2))
    detq = next(h for h in runner.hooks if type(h).__name__ == "DetQHook")
    stages = detq.session.schedule.stages
    assert [(s.name, s.prefixes) for s in stages] == [("backbone", ["backbone"]), ("neck", ["neck"]),
                                                      ("head", ["rpn_head", "roi_head"])]
    assert [k for k, _ in terms] == [0, 0, 1, 1, 2, 2]
    assert dq.is_quantized(runner.model)
    for stage, last in terms:
        distilled = {k: v for k, v in last.items() if k.startswith("distill_")}
        assert set(distilled) == {f"distill_pkd_stage{i + 1}" for i in range(min(stage + 1, 2))} \
            and all(v > 0 for v in distilled.values()), (stage, last)


def test_crqat_curriculum_and_distillation_in_mmdet(synth, tmp_path, float_retinanet, capfd):
    runner = Runner.from_cfg(_crqat_cfg(synth, tmp_path, float_retinanet))
    probe = _CurriculumProbe()
    runner.register_hook(probe, priority="LOWEST")
    capfd.readouterr()
    runner.train()
    # the float `load_from` lacks every quantizer value: the loader must not list them as missing keys
    printed = capfd.readouterr()
    assert "weight_quantizer.scale" not in printed.out + printed.err
    detq = [h for h in runner.hooks if type(h).__name__ == "DetQHook"][0]
    assert [s.name for s in detq.session.schedule.stages] == ["backbone", "neck", "head"]
    stages = [r["stage"] for r in probe.rows]
    assert stages == [0, 0, 1, 1, 2, 2]
    for r in probe.rows:
        if r["stage"] < 2:  # the head: float and frozen while earlier stages train
            assert not r["head_quantized"]
            assert torch.equal(r["head_weight"], r["head_weight_after"])
        else:
            assert r["head_quantized"]
        assert r["loss_distill"] is not None and r["loss_distill"] > 0
    assert probe.rows[0]["terms"].keys() == {"pkd_stage1"} and probe.rows[0]["terms"]["pkd_stage1"] > 0
    assert {"pkd_stage1", "pkd_stage2"} <= probe.rows[2]["terms"].keys()
    last = probe.rows[-1]["terms"]
    assert all(last[k] > 0 for k in ("pkd_stage1", "pkd_stage2", "relational", "logit", "box")), last
    assert not torch.equal(probe.rows[-1]["head_weight"], probe.rows[-1]["head_weight_after"])
    teacher = detq.session.teacher.module
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not any("teacher" in k for k in runner.model.state_dict())
    assert not dq.is_quantized(teacher)

    # resume in the middle of the curriculum (after iteration 3, in stage "neck"): same end state
    resumed = Runner.from_cfg(_crqat_cfg(synth, tmp_path / "resume", tmp_path / "iter_3.pth", resume=True))
    resumed.train()
    rdetq = [h for h in resumed.hooks if type(h).__name__ == "DetQHook"][0]
    assert rdetq.session.teacher_source == str(float_retinanet)
    expected = torch.load(tmp_path / "iter_6.pth")["state_dict"]
    got = resumed.model.state_dict()
    for k, v in expected.items():
        if v.is_floating_point():
            assert torch.allclose(got[k], v, rtol=1e-4, atol=1e-5), k



def test_yolox_head_decodes_as_its_own_prediction_and_crqat_distils_it(synth, tmp_path):
    """YOLOX (no bbox_coder, an objectness branch): the family's decoded boxes and scores are exactly those of
    YOLOX's own ``predict_by_feat`` before NMS (score = σ(cls)·σ(obj)), and CR-QAT trains it through DetQHook
    with every head term distilled."""
    from mmdet.registry import MODELS

    from detq_hooks.detectors import family_for

    float_cfg = load_cfg("yolox_tiny_synthetic.py", synth, tmp_path / "float")
    model = MODELS.build(copy.deepcopy(float_cfg.model))
    model.init_weights()
    model.eval()
    torch.manual_seed(0)
    with torch.no_grad():
        outs = model(torch.rand(2, 3, SIZE, SIZE) * 255, mode="tensor")
        family = family_for(model)
        assert family.head_block(model) == "bbox_head"
        boxes, scores = family.decode_head_output(model, outs)
        test_cfg = copy.deepcopy(model.test_cfg)
        test_cfg.score_thr = 0.0
        metas = [dict(img_shape=(SIZE, SIZE), scale_factor=(1.0, 1.0))] * 2
        theirs = model.bbox_head.predict_by_feat(*outs, batch_img_metas=metas, cfg=test_cfg, rescale=False, with_nms=False)
    assert boxes.shape == (2, sum((SIZE // s) ** 2 for s in (8, 16, 32)), 4) and scores.shape[-1] == 8
    for b, res in enumerate(theirs):
        assert torch.allclose(boxes[b], res.bboxes, atol=1e-4)
        assert torch.allclose(scores[b].max(-1).values, res.scores, rtol=1e-5, atol=1e-7)
        # their label's score is our best one (a freshly initialised head has near-ties, so not argmax equality)
        assert torch.allclose(scores[b].gather(-1, res.labels[:, None])[:, 0], res.scores, rtol=1e-5, atol=1e-7)

    float_ckpt = tmp_path / "yolox_float.pth"
    torch.save({"state_dict": model.state_dict(), "meta": {}}, float_ckpt)
    # W4A8, not W4A4: this "float" model is untrained, and calibration runs in eval mode, where BatchNorm at its
    # initial statistics does not normalise; the ranges are then ~10x wider than the training activations, a 4-bit
    # input rounds to one value, and the BatchNorms after such layers blow the first step's gradients up to inf
    _, terms = _train_recording_terms(_crqat_cfg(synth, tmp_path, float_ckpt, config="yolox_tiny_synthetic_w4a8.py",
                                                 recipe={**CRQAT, "preset": "w4a8-crqat"}))
    assert [k for k, _ in terms] == [0, 0, 1, 1, 2, 2]
    last = terms[-1][1]
    assert all(last[f"distill_{k}"] > 0 for k in ("logit", "box", "relational")), last
    assert all(torch.isfinite(torch.as_tensor(v)) for _, t in terms for v in t.values())


MMDET_DDP_SCRIPT = """
import os, sys, types, torch, torch.distributed as dist
sys.path.insert(0, os.environ["TESTS_DIR"])
from mmengine.runner import Runner
from test_mmdet import hook_recipe, load_cfg
# MMEngine's `init_dist` selects a CUDA device: on CPU the gloo group is opened first, the DDP wrapper gets no device ids.
dist.init_process_group("gloo")
synth = types.SimpleNamespace(root=os.environ["SYNTH"])
cfg = hook_recipe(load_cfg("retinanet_r18_synthetic_w4a8.py", synth, os.environ["WORK"], batch=2, launcher="pytorch",
                           model_wrapper_cfg=dict(type="MMDistributedDataParallel", device_ids=None)), "w4a8")
cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=2, val_interval=100)
runner = Runner.from_cfg(cfg)
runner.train()
assert type(runner.model).__name__ == "MMDistributedDataParallel"
state = dict(runner.model.module.state_dict())
state["last_loss"] = torch.tensor(runner.message_hub.get_scalar("train/loss").current())  # this rank's own batch
torch.save(state, os.path.join(os.environ["WORK"], f"rank{runner.rank}.pt"))
dist.barrier()
dist.destroy_process_group()  # a gloo group left to interpreter shutdown can SIGABRT after a good run
"""


@pytest.mark.ddp
def test_ddp_two_gloo_processes_train_retinanet_and_agree(synth, tmp_path):
    import subprocess
    import sys

    script = tmp_path / "ddp_mmdet.py"
    script.write_text(MMDET_DDP_SCRIPT)
    env = {**os.environ, "TESTS_DIR": str(Path(__file__).parent), "WORK": str(tmp_path), "SYNTH": str(synth.root),
           "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv-backend=c10d",
                    "--rdzv-endpoint=localhost:0", str(script)], check=True, env=env, timeout=600)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    scales = [k for k in r0 if k.endswith("quantizer.scale")]
    assert len(scales) > 50
    # the ranks trained on different images (different losses), yet weights and scales are identical
    assert not torch.equal(r0.pop("last_loss"), r1.pop("last_loss"))
    running = [k for k in r0 if "running_" in k]  # BN statistics are per rank (DDP broadcasts them next forward)
    for k in r0:
        if k not in running:
            assert torch.allclose(r0[k].float(), r1[k].float(), atol=1e-6), k


MMDET_CRQAT_DDP_SCRIPT = """
import os, sys, types, torch, torch.distributed as dist
sys.path.insert(0, os.environ["TESTS_DIR"])
from mmengine.hooks import Hook
from mmengine.runner import Runner
from test_mmdet import hook_recipe, load_cfg
dist.init_process_group("gloo")  # before the Runner: MMEngine's `init_dist` would select a CUDA device
synth = types.SimpleNamespace(root=os.environ["SYNTH"])
recipe = {"preset": "w4a8-crqat", "curriculum": {"boundaries": [0.25, 0.5]}}
cfg = hook_recipe(load_cfg("retinanet_r18_synthetic_w4a8.py", synth, os.environ["WORK"], batch=2, launcher="pytorch",
                           load_from=os.environ["FLOAT"],
                           model_wrapper_cfg=dict(type="MMDistributedDataParallel", device_ids=None)), recipe)
cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=4, val_interval=100)
cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=100, by_epoch=False)
rows = []


class Probe(Hook):
    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        detq = [h for h in runner.hooks if type(h).__name__ == "DetQHook"][0]
        rows.append(dict(stage=detq.session.schedule.current, loss_distill=float(outputs["loss_distill"]),
                         anchor=float(outputs["loss_ddp_anchor"]) if "loss_ddp_anchor" in outputs else None,
                         terms=dict(detq.session.last_terms)))


runner = Runner.from_cfg(cfg)
runner.register_hook(Probe(), priority="LOWEST")
runner.train()
assert type(runner.model).__name__ == "MMDistributedDataParallel"
torch.save(dict(state=dict(runner.model.module.state_dict()), rows=rows),
           os.path.join(os.environ["WORK"], f"rank{runner.rank}.pt"))
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.ddp
def test_ddp_two_gloo_processes_crqat_curriculum_and_distillation(synth, tmp_path, float_retinanet):
    """The reported crash: a CR-QAT DetQHook (float `load_from`, 2 processes, gloo, MMDistributedDataParallel) died
    at the second iteration ("Expected to have finished reduction in the prior iteration"): the quantizers the
    curriculum switched off took no part in the loss. The DDP anchor term keeps them in the graph."""
    import subprocess
    import sys

    script = tmp_path / "ddp_crqat.py"
    script.write_text(MMDET_CRQAT_DDP_SCRIPT)
    env = {**os.environ, "TESTS_DIR": str(Path(__file__).parent), "WORK": str(tmp_path), "SYNTH": str(synth.root),
           "FLOAT": str(float_retinanet), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv-backend=c10d",
                    "--rdzv-endpoint=localhost:0", str(script)], check=True, env=env, timeout=900)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for rows in (r0["rows"], r1["rows"]):
        assert [r["stage"] for r in rows] == [0, 1, 2, 2]  # the stage boundaries were crossed
        assert all(r["loss_distill"] > 0 for r in rows)
        assert rows[0]["anchor"] == 0.0  # neck and head quantizers off: anchored, with zero value
        assert rows[-1]["terms"]["distill_pkd_stage1"] > 0 and rows[-1]["terms"]["distill_pkd_stage2"] > 0
        assert all(rows[-1]["terms"][f"distill_{k}"] > 0 for k in ("relational", "logit", "box")), rows[-1]["terms"]
    assert r0["rows"][-1]["loss_distill"] != r1["rows"][-1]["loss_distill"]  # the ranks saw different images
    s0, s1 = r0["state"], r1["state"]
    quantizer = [k for k in s0 if "_quantizer." in k]
    assert len(quantizer) > 200
    running = [k for k in s0 if "running_" in k]  # BN statistics are per rank
    for k in s0:
        if k not in running:
            assert torch.allclose(s0[k].float(), s1[k].float(), atol=1e-6), k
    assert all(bool(v) for k, v in s0.items() if k.endswith("_quantizer.enabled_state"))  # last stage: all on


def test_mmcv_layer_wrappers_are_quantized_and_given_back():
    """mmcv's Conv2d/Linear wrappers (DETR's fc_cls, ...) compute nn.Conv2d/nn.Linear's function on this torch."""
    import copy
    import pickle

    from mmcv.cnn import Conv2d as MMConv2d, Linear as MMLinear

    model = torch.nn.Sequential(MMConv2d(3, 8, 3), torch.nn.Flatten(), MMLinear(8 * 6 * 6, 5))
    x = torch.randn(2, 3, 8, 8)
    ref = model(x)
    dq.quantize(model, "w8a8")
    assert [n for n, _ in dq.quantized_layers(model)] == ["0", "2"]
    dq.calibrate(model, [x])
    assert (model(x) - ref).abs().max() < 0.05 * ref.abs().max()
    model = pickle.loads(pickle.dumps(copy.deepcopy(model)))
    dq.dequantize(model)
    assert type(model[0]) is MMConv2d and type(model[2]) is MMLinear
    assert torch.allclose(model(x), ref)


def test_checkpoint_of_a_run_without_detq_loads_with_a_warning(tmp_path):
    """A plain MMEngine checkpoint (message hub pickled through builtins.getattr) is refused by torch's safe
    load; the file named in the config is loaded fully, with a warning naming it."""
    import pickle

    from mmengine.logging.history_buffer import HistoryBuffer
    from mmengine.runner.checkpoint import CheckpointLoader

    import detq_hooks.mmengine as dm

    path = tmp_path / "plain.pth"
    saved = HistoryBuffer.__reduce__
    del HistoryBuffer.__reduce__  # as without detq_hooks.mmengine imported
    try:
        hub = HistoryBuffer()
        hub.update(1.0)
        torch.save({"state_dict": {"w": torch.ones(2)}, "message_hub": {"loss": hub}}, path)
    finally:
        HistoryBuffer.__reduce__ = saved
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    with pytest.warns(UserWarning, match="plain.pth"):
        ckpt = CheckpointLoader.load_checkpoint(str(path), map_location="cpu")
    assert torch.equal(ckpt["state_dict"]["w"], torch.ones(2))
    # written with the module imported: the safe load reads it, no warning
    torch.save({"state_dict": {"w": torch.ones(2)}, "message_hub": {"loss": hub}}, tmp_path / "safe.pth")
    assert torch.load(tmp_path / "safe.pth", weights_only=True)["message_hub"]["loss"].current() == 1.0
    assert CheckpointLoader._schemes[""] is dm.checkpoints._load_from_local


@pytest.mark.parametrize("base,leaves", [
    ("atss/atss_r50_fpn_1x_coco.py", {"atss_cls", "atss_reg", "atss_centerness"}),
    ("gfl/gfl_r50_fpn_1x_coco.py", {"gfl_cls", "gfl_reg"}),
    ("tood/tood_r50_fpn_1x_coco.py", {"tood_cls", "tood_reg"}),
])
def test_dense_heads_final_layers_are_prediction_layers(base, leaves, tmp_path):
    """ATSS/GFL/TOOD name their final convs after the head; they stay at prediction_layer_bits (they were
    quantized at 4 bits as body layers)."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    from detq_hooks.detectors import family_for

    register_all_modules()
    (tmp_path / "cfg.py").write_text(f"_base_ = ['mmdet::{base}']\n")
    cfg = Config.fromfile(str(tmp_path / "cfg.py")).model
    cfg.backbone.update(depth=18, init_cfg=None)
    cfg.neck.in_channels = [64, 128, 256, 512]
    cfg.bbox_head.num_classes = 3
    model = MODELS.build(cfg)
    preds = family_for(model).prediction_layers(model)
    assert {n.split(".")[-1] for n in preds} == leaves
    dq.quantize(model, "w4a8", prediction_layers=preds)
    roles = {n: m.detq_layer_role for n, m in dq.quantized_layers(model) if n.split(".")[-1] in leaves}
    assert len(roles) == len(leaves) and set(roles.values()) == {"prediction"}


@pytest.mark.parametrize("base,predictors", [
    # SSD's per-level cls_convs / reg_convs are its predictors (the depthwise-separable SSDLite: their pointwise conv)
    ("ssd/ssdlite_mobilenetv2-scratch_8xb24-600e_coco.py", {"bbox_head.cls_convs.#.1", "bbox_head.reg_convs.#.1"}),
    ("ssd/ssd300_coco.py", {"bbox_head.cls_convs.#.0", "bbox_head.reg_convs.#.0"}),
    ("yolo/yolov3_mobilenetv2_8xb24-320-300e_coco.py", {"bbox_head.convs_pred.#"}),
    ("yolof/yolof_r50-c5_8xb8-1x_coco.py", {"bbox_head.cls_score", "bbox_head.bbox_pred", "bbox_head.object_pred"}),
    ("centernet/centernet_r18_8xb16-crop512-140e_coco.py",
     {"bbox_head.heatmap_head.2", "bbox_head.wh_head.2", "bbox_head.offset_head.2"}),
    ("reppoints/reppoints-moment_r50_fpn_1x_coco.py",
     {"bbox_head.reppoints_cls_out", "bbox_head.reppoints_pts_init_out", "bbox_head.reppoints_pts_refine_out"}),
    ("sabl/sabl-retinanet_r50_fpn_1x_coco.py",
     {"bbox_head.retina_cls", "bbox_head.retina_bbox_cls", "bbox_head.retina_bbox_reg"}),
    ("mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py", {"rpn_head.rpn_cls", "rpn_head.rpn_reg", "roi_head.bbox_head.fc_cls",
                                                 "roi_head.bbox_head.fc_reg", "roi_head.mask_head.conv_logits"}),
])
def test_other_heads_final_layers_are_prediction_layers(base, predictors, tmp_path):
    """Heads that name their predictors otherwise (SSD, YOLOv3, YOLOF, CenterNet, RepPoints, SABL, Mask R-CNN's
    mask logits): exactly those layers stay at prediction_layer_bits; none of them fell back to the last layer
    only, and the towers beside them (RetinaNet-style names: ``cls_convs``) stay body layers."""
    import re

    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    from detq_hooks.detectors import family_for

    register_all_modules()
    (tmp_path / "cfg.py").write_text(f"_base_ = ['mmdet::{base}']\n")
    cfg = Config.fromfile(str(tmp_path / "cfg.py")).model
    cfg.backbone.init_cfg = None
    model = MODELS.build(cfg)
    preds = family_for(model).prediction_layers(model)
    assert {re.sub(r"\.\d+\.(\d+)$", r".#.\1", re.sub(r"convs_pred\.\d+$", "convs_pred.#", n)) for n in preds} == predictors
    dq.quantize(model, "w4a8", prediction_layers=preds)
    roles = dict((n, m.detq_layer_role) for n, m in dq.quantized_layers(model))
    assert {roles[n] for n in preds} == {"prediction"}
    assert all(m.weight_quantizer.bits == 8 for n, m in dq.quantized_layers(model) if n in preds)
    body = [n for n, r in roles.items() if n.split(".")[0] in ("bbox_head", "roi_head") and n not in preds]
    assert all(roles[n] != "prediction" for n in body)  # SSDLite's depthwise convs, the towers, RoI fcs
    assert body or base.startswith("ssd/ssd300")  # SSD300's head is its predictors alone


def test_tood_task_decomposition_convs_stay_float_and_unrun_layers_are_named(tmp_path):
    """TOOD applies its task-decomposition ``reduction_conv`` weight with ``bmm``; the conv's forward never runs.
    The family keeps those convs float, so TOOD calibrates; quantized anyway, calibration names every such layer
    and the rule that keeps it float, and that rule works."""
    import re

    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    from detq_hooks.calibration import CalibrationError
    from detq_hooks.session import QuantSession

    register_all_modules()
    (tmp_path / "cfg.py").write_text("_base_ = ['mmdet::tood/tood_r50_fpn_1x_coco.py']\n")
    cfg = Config.fromfile(str(tmp_path / "cfg.py")).model
    cfg.backbone.update(depth=18, init_cfg=None)
    cfg.neck.in_channels = [64, 128, 256, 512]
    cfg.bbox_head.num_classes = 3
    float_model = MODELS.build(cfg).eval()
    x = torch.rand(2, 3, 64, 64)
    batches = [x]

    def forward(m, b):
        return m(b, mode="tensor")

    reduction = [f"bbox_head.{t}_decomp.reduction_conv.conv" for t in ("cls", "reg")]
    model = copy.deepcopy(float_model)
    QuantSession("w4a8").convert(model, training=False)
    layers = dict(model.named_modules())
    assert all(type(layers[n]) is torch.nn.Conv2d for n in reduction)
    dq.calibrate(model, batches, forward_fn=forward, num_batches=1)

    plain = copy.deepcopy(float_model)
    dq.quantize(plain, "w4a8")
    with pytest.raises(CalibrationError, match=r"2 quantized layer\(s\) never ran during calibration \(1 batch\(es\)\): "
                       r"'bbox_head\.cls_decomp\.reduction_conv\.conv', 'bbox_head\.reg_decomp\.reduction_conv\.conv'") as err:
        dq.calibrate(plain, batches, forward_fn=forward, num_batches=1)
    rules = [{"name": n, "quantize": False} for n in re.findall(r"\{name: '([^']+)', quantize: false\}", str(err.value))]
    assert [r["name"] for r in rules] == reduction
    ruled = copy.deepcopy(float_model)
    dq.quantize(ruled, {"preset": "w4a8", "quantization": {"rules": rules}})
    dq.calibrate(ruled, batches, forward_fn=forward, num_batches=1)
    assert {n for n, _ in dq.quantized_layers(ruled)} == {n for n, _ in dq.quantized_layers(model)}
