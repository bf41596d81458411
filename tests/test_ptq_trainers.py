"""PTQ with block reconstruction (``mode: ptq`` with ``ptq.method``) from each trainer and from the one-call API:
runs end to end, the result is an ordinary quantized model (weights on the quantizer grid, saved, reloaded,
exported), and bad input fails clearly with the model left as it was. Tiny real runs on the synthetic data."""

from __future__ import annotations

import copy
import os
import textwrap
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")

import pytest
import torch
from torch import nn

import detq_hooks as dq
from detq_hooks.recipe import RecipeError
from detq_hooks.reconstruction import ReconstructionError

FAST = {"iterations": 6, "batch_size": 4}
INTEGRATIONS = Path(__file__).resolve().parents[1] / "integrations"


def on_grid(layer) -> bool:
    """The stored weight is exactly representable by the layer's weight quantizer (AdaRound folded in)."""
    q = layer.weight_quantizer
    with torch.no_grad():
        return torch.equal(q(layer.weight), layer.weight)


@torch.no_grad()
def codes(layer) -> torch.Tensor:
    """The integer codes of a layer's quantized weight (per-channel symmetric weight quantizer)."""
    q = layer.weight_quantizer
    scale = q.scale.detach().reshape(-1, *([1] * (layer.weight.dim() - 1))) if q.scale.numel() > 1 else q.scale.detach()
    return torch.round(q(layer.weight) / scale)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU())
        self.body = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, 16, 3, padding=1), nn.SiLU())
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.head(self.body(self.stem(x)))


def test_one_call_ptq_reconstructs_lowers_error_saves_reloads_and_exports(tmp_path):
    torch.manual_seed(0)
    model = ConvNet().eval()
    reference = copy.deepcopy(model)
    batches = [torch.randn(8, 3, 16, 16) for _ in range(2)]
    calibrated = copy.deepcopy(model)
    dq.ptq(calibrated, batches, {"preset": "w4a4-ptq", "calibration": {"num_batches": 2}}, progress=False)
    dq.ptq(model, batches, {"preset": "w4a4-ptq", "calibration": {"num_batches": 2},
                            "ptq": {"method": "qdrop", "iterations": 100, "batch_size": 8}}, progress=False)
    result = model.detq_ptq.reconstruction
    assert [b.name for b in result.blocks] == ["stem", "body", "head"] and result.cached_bytes_per_image > 0
    for b in result.blocks:
        assert b.loss_after <= b.loss_before
    x = torch.randn(16, 3, 16, 16)
    with torch.no_grad():
        err_recon = (model(x) - reference(x)).pow(2).mean()
        err_calib = (calibrated(x) - reference(x)).pow(2).mean()
    assert err_recon < 0.95 * err_calib, (float(err_recon), float(err_calib))  # measured: 0.90
    assert all(on_grid(m) for _, m in dq.quantized_layers(model))
    # an ordinary quantized model: its state dict restores it exactly, and it exports
    path = tmp_path / "ptq.pt"
    torch.save({"model": model.state_dict(), "detq": dq.QuantSession("w4a4-ptq").state(model)}, path)
    fresh = ConvNet()
    saved = torch.load(path, weights_only=False)
    dq.QuantSession("w4a4-ptq").restore(fresh, saved["detq"])
    fresh.load_state_dict(saved["model"])
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    onnx_path = dq.export_onnx(fresh, torch.randn(1, 3, 16, 16), tmp_path / "ptq.onnx").path
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x[:1].numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), fresh(x[:1]), atol=0.05, rtol=0.05)


def test_one_call_ptq_bad_input_leaves_the_model_float():
    torch.manual_seed(0)
    model = ConvNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = {"preset": "w4a8-ptq", "ptq": {"method": "adaround", "iterations": 2, "batch_size": 64}}
    with pytest.raises(ReconstructionError, match=r"fewer than one reconstruction batch \(`batch_size` = 64\)"):
        dq.ptq(model, [torch.randn(4, 3, 16, 16)], recipe, progress=False)
    assert not dq.is_quantized(model) and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(dq.CalibrationError, match=r"calibration got no batches"):
        dq.ptq(model, [], {**recipe, "ptq": {"method": "adaround"}}, progress=False)
    assert not dq.is_quantized(model)
    nan = torch.randn(8, 3, 16, 16)
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(dq.CalibrationError, match=r"NaN in the input of quantizer 'stem.0.input_quantizer'"):
        dq.ptq(model, [nan], {**recipe, "ptq": {"method": "adaround", "batch_size": 4}}, progress=False)
    assert not dq.is_quantized(model)
    with pytest.raises(RecipeError, match=r"`ptq.sparse_ratio` = 0.5 must be in \(0, 0.2\]"):
        dq.ptq(model, [torch.randn(8, 3, 16, 16)], {"preset": "w4a8-ptq", "ptq": {"method": "taskq", "sparse_ratio": 0.5}})
    with pytest.raises(RecipeError, match=r"`ptq.method` = 'qdrop' is post-training quantization; it needs `mode: ptq`"):
        dq.load_recipe({"preset": "w4a8", "ptq": {"method": "qdrop"}})
    with pytest.raises(RecipeError, match=r"detq_hooks.ptq needs a post-training recipe"):
        dq.ptq(model, [torch.randn(8, 3, 16, 16)], "w4a8")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


# ============================================================================================ Ultralytics
def test_ultralytics_taskq_ptq_end_to_end(tmp_path):
    pytest.importorskip("ultralytics")
    from ultralytics import YOLO

    from detq_hooks.tools.data import make_synthetic_dataset
    from detq_hooks.ultralytics import DetQTrainer

    ds = make_synthetic_dataset(tmp_path / "synth", num_train=16, num_val=8, imgsz=64, seed=0)
    model = YOLO("yolo11n.yaml")
    recipe = {"preset": "w4a8-taskq", "calibration": {"num_batches": 2}, "ptq": FAST}
    model.train(data=str(ds.yolo_yaml), trainer=DetQTrainer, detq=recipe, epochs=1, imgsz=64, batch=8, workers=0,
                device="cpu", amp=False, plots=False, project=str(tmp_path), name="taskq", exist_ok=True, verbose=False)
    session = model.trainer.detq_session
    result = session.last_calibration.reconstruction
    names = [b.name for b in result.blocks]
    # head-wise units (STAHQ): each scale's box and class branch in the order Detect calls them (every box
    # branch, then every class branch), then the whole head once more for DTR
    assert names[-7:] == ["model.23.cv2.0", "model.23.cv2.1", "model.23.cv2.2", "model.23.cv3.0", "model.23.cv3.1",
                          "model.23.cv3.2", "model.23"]
    assert session.float_copy is None  # freed after reconstruction
    trained = dict(dq.quantized_layers(model.trainer.model))
    kept = [b.name for b in result.blocks if b.skipped is None and not b.reverted and b.rounded_layers]
    assert kept  # the learned rounding of the blocks that kept it is folded into their weights
    assert all(on_grid(m) for n, m in trained.items() if any(n.startswith(b + ".") for b in kept))
    best = YOLO(str(tmp_path / "taskq" / "weights" / "best.pt"))
    assert dq.is_quantized(best.model)
    # best.pt stores fp16 weights and quantizer scales: off the grid by fp16 rounding, but the integer codes (the
    # learned rounding) of the reconstructed layers are the same (on-grid weights sit far from rounding boundaries)
    checked = 0
    for name, layer in dq.quantized_layers(best.model.float()):
        if any(name.startswith(b + ".") for b in kept):
            assert torch.equal(codes(layer), codes(trained[name])), name
            checked += 1
    assert checked >= 1
    assert best.predict(str(ds.root / "images" / "val"), imgsz=64, verbose=False)
    # TASKQ's sparse outliers (simulated) are in the per-layer plan: a float model rebuilt from it loads strictly
    from ultralytics.nn.tasks import DetectionModel

    from detq_hooks.sparse import SparseOutlierQuantizer, SparseQuantizationError

    ckpt = torch.load(tmp_path / "taskq" / "weights" / "best.pt", map_location="cpu", weights_only=False)
    sparse = [n for n, v in ckpt["detq"]["layers"].items() if v.get("input_outliers") == 0.005]
    assert len(sparse) == len(ckpt["detq"]["layers"]) - 1  # every layer but the first (the image has no long tail)
    fresh = DetectionModel("yolo11n.yaml", nc=len(ds.classes), verbose=False)
    dq.QuantSession(recipe).restore(fresh, ckpt["detq"])
    fresh.load_state_dict(ckpt["model"].float().state_dict(), strict=True)
    assert all(isinstance(m.input_quantizer, SparseOutlierQuantizer) for n, m in dq.quantized_layers(fresh) if n in sparse)
    with pytest.raises(SparseQuantizationError, match=r"sparse outlier quantization is simulated.*'ptq': \{'sparse': False\}"):
        dq.export_onnx(fresh.eval(), torch.zeros(1, 3, 64, 64), tmp_path / "taskq.onnx")


def test_ultralytics_decoder_of_dtr_is_the_trainers_own():
    """DTR's boxes at each anchor are those of Ultralytics' own inference (before NMS)."""
    pytest.importorskip("ultralytics")
    from ultralytics.nn.tasks import DetectionModel

    from detq_hooks.detectors.ultralytics import UltralyticsFamily

    torch.manual_seed(0)
    model = DetectionModel("yolo11n.yaml", nc=3, verbose=False).eval()
    out = {}
    handle = model.model[-1].register_forward_hook(lambda m, a, o: out.update(head=o))
    with torch.no_grad():
        decoded = model(torch.rand(2, 3, 64, 64))[0]  # (B, 4 + nc, A): xywh in pixels, scores
    handle.remove()
    boxes, scores = UltralyticsFamily().decode_head_output(model, out["head"])
    xywh = decoded[:, :4].transpose(1, 2)
    torch.testing.assert_close(boxes, torch.cat([xywh[..., :2] - xywh[..., 2:] / 2, xywh[..., :2] + xywh[..., 2:] / 2], -1))
    torch.testing.assert_close(scores, decoded[:, 4:].transpose(1, 2))


def test_dtr_term_has_gradients_and_vanishes_at_the_float_output():
    pytest.importorskip("ultralytics")
    from ultralytics.nn.tasks import DetectionModel

    from detq_hooks.detectors.ultralytics import UltralyticsFamily
    from detq_hooks.post_training import detection_task_loss

    torch.manual_seed(0)
    model = DetectionModel("yolo11n.yaml", nc=3, verbose=False).eval()
    out = {}
    model.model[-1].register_forward_hook(lambda m, a, o: out.update(head=o))
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        model(x)
    target = out["head"]
    model.model[-1].cv2[0][-1].bias.data += 0.5  # perturb the box branch
    model(x)
    loss = detection_task_loss(model, UltralyticsFamily(), weight=1.0)
    term = loss("model.23", out["head"], target, torch.tensor(1.0))
    assert term.requires_grad and float(term) > 0
    grad = torch.autograd.grad(term, model.model[-1].cv2[0][-1].bias)[0]
    assert grad.abs().sum() > 0
    assert loss("model.22", out["head"], target, torch.tensor(1.0)) is None
    assert float(loss("model.23", target, target, torch.tensor(1.0))) == pytest.approx(0.0, abs=1e-6)


# ============================================================================================ MMDetection
@pytest.mark.parametrize("config", ["rtmdet_tiny_synthetic_w4a8.py", "detr_r18_synthetic_w4a8.py"])
def test_mmdet_taskq_ptq_from_runner_test(config, tmp_path):
    pytest.importorskip("mmdet")
    pytest.importorskip("mmcv.ops")
    from mmengine.runner import Runner

    from test_mmdet import hook_recipe, load_cfg
    from detq_hooks.tools.data import make_synthetic_dataset

    synth = make_synthetic_dataset(tmp_path / "synth", num_train=8, num_val=4, imgsz=96, seed=0)
    recipe = {"preset": "w8a8-ptq", "calibration": {"num_batches": 2},
              # QDrop, sparse outliers, DTR on the whole head at the end; a DETR head's "samples" are its decoder
              # layers' outputs
              "ptq": {"method": "taskq", **FAST, "batch_size": 2}}
    runner = Runner.from_cfg(hook_recipe(load_cfg(config, synth, tmp_path / "work"), recipe))
    metrics = runner.test()
    hook = next(h for h in runner.hooks if type(h).__name__ == "DetQHook")
    result = hook.session.last_calibration.reconstruction
    done = [b for b in result.blocks if b.skipped is None]
    assert len(done) >= 10 and all(b.loss_after <= b.loss_before for b in done)
    assert {b.name.split(".")[0] for b in done} >= {"backbone", "neck", "bbox_head"}
    # in data-flow order (DETR defines its head before the encoder and decoder), the head last, for DTR
    assert result.blocks[-1].name == "bbox_head" and result.blocks[-1].skipped is None
    if config.startswith("rtmdet"):  # each tower depth: three per-level modules around one shared conv, one unit
        tied = {b.name: b.tied_with for b in result.blocks if b.tied_with}
        assert tied == {f"bbox_head.{t}_convs.0.{d}": [f"bbox_head.{t}_convs.{level}.{d}" for level in (1, 2)]
                        for t in ("cls", "reg") for d in (0, 1)}
        assert all(b.calls == 3 and b.quantized_layers == 1 for b in result.blocks if b.tied_with)
        assert not any(b.name.startswith(("bbox_head.cls_convs.1", "bbox_head.reg_convs.2")) for b in result.blocks)
    assert isinstance(metrics, dict) and hook.session.float_copy is None  # random weights: no detection to score
    # EMAHook's copy (what the test ran) took the sparse outlier quantizers calibration added, with their ranges
    model = runner.model
    for ema in hook._averaging_wrappers(runner):
        assert set(ema.module.state_dict()) == set(model.state_dict())
        assert any(".dense.scale" in k for k in ema.module.state_dict())


def test_mmdet_ptq_reconstructs_dino_with_level_shapes_shared_and_its_head_per_branch(tmp_path):
    """DINO's deformable encoder layers read level shapes and start indices that have no batch dimension (kept
    as they are, not sliced by image); its head also reads reference points, so it is reconstructed per branch."""
    pytest.importorskip("mmdet")
    pytest.importorskip("mmcv.ops")
    from mmengine.runner import Runner

    from mmengine_toy import logged_warnings
    from test_mmdet import hook_recipe, load_cfg
    from detq_hooks.tools.data import make_synthetic_dataset

    synth = make_synthetic_dataset(tmp_path / "synth", num_train=8, num_val=4, imgsz=96, seed=0)
    recipe = {"preset": "w4a8-ptq", "calibration": {"num_batches": 2}, "ptq": {"method": "qdrop", **FAST, "batch_size": 2}}
    runner = Runner.from_cfg(hook_recipe(load_cfg("dino_r18_synthetic_w4a8.py", synth, tmp_path / "work"), recipe))
    # Runner.test() runs no init_weights(): DINO's level_embed would stay uninitialised memory (NaN at random)
    runner.model.init_weights()
    with logged_warnings(runner.logger) as warnings:
        runner.test()
    hook = next(h for h in runner.hooks if type(h).__name__ == "DetQHook")
    blocks = {b.name: b for b in hook.session.last_calibration.reconstruction.blocks}
    for name in ("encoder.layers.0", "encoder.layers.1", "decoder.layers.2", "bbox_head.cls_branches.2",
                 "bbox_head.reg_branches.2", "memory_trans_fc"):
        assert blocks[name].skipped is None and blocks[name].loss_after <= blocks[name].loss_before, name
    assert "bbox_head" not in blocks
    # in call order: the query-position MLP before the first decoder layer, fit to every layer's call; the box
    # branch that refines the first layer's reference points before the second layer, fit to that call and to
    # the head's (a fit to the first call alone left the head's boxes on rounding learned for other inputs)
    order = list(blocks)
    layers = runner.model.decoder.num_layers
    assert order.index("memory_trans_fc") < order.index("decoder.ref_point_head") < order.index("decoder.layers.0")
    assert order.index("bbox_head.reg_branches.0") < order.index("decoder.layers.1")
    assert blocks["decoder.ref_point_head"].calls == layers and blocks["bbox_head.reg_branches.0"].calls == 2
    assert blocks["bbox_head.cls_branches.0"].calls == 1
    # the decoder runs on the top-k encoder proposals, which the quantized model picks differently: its blocks
    # and the decoder layers' branches are fit to the float block on the quantized input; the branch scoring
    # the encoder's proposals (index num_layers) and everything before the pick to the float model
    for name in ("decoder.layers.0", "decoder.ref_point_head", "bbox_head.reg_branches.0", f"bbox_head.cls_branches.{layers - 1}"):
        assert blocks[name].target == "float block", name
    for name in ("encoder.layers.1", "memory_trans_fc", f"bbox_head.cls_branches.{layers}"):
        assert blocks[name].target == "float model", name
    # no load_from: the log says the config's initial weights were quantized
    assert any(w.startswith("DetQHook: PTQ in Runner.test() of a model no checkpoint was loaded into") for w in warnings)


def test_mmdet_ptq_fits_a_two_stage_deformable_detrs_decoder_to_the_float_block(tmp_path):
    """Two-stage Deformable DETR (box refinement) picks its queries from the encoder's top-k proposals and embeds
    them with ``pos_trans_fc``: those, the decoder and the decoder layers' branches are fit to the float block on
    the quantized input; the proposal branch (index ``num_layers``) and the encoder to the float model."""
    pytest.importorskip("mmdet")
    pytest.importorskip("mmcv.ops")
    from mmengine.runner import Runner

    from test_mmdet import CONFIGS, hook_recipe, load_cfg
    from detq_hooks.tools.data import make_synthetic_dataset

    config = tmp_path / "deformable_detr_two_stage_r18_synthetic_w4a8.py"
    config.write_text(textwrap.dedent(f"""
        _base_ = ['mmdet::deformable_detr/deformable-detr-refine-twostage_r50_16xb2-50e_coco.py',
                  '{CONFIGS / "synthetic_coco.py"}', '{CONFIGS / "detq_w4a8.py"}']
        model = dict(num_queries=20,
                     backbone=dict(depth=18, init_cfg=None, norm_cfg=dict(type='BN', requires_grad=True), norm_eval=False),
                     neck=dict(in_channels=[128, 256, 512]), encoder=dict(num_layers=1), decoder=dict(num_layers=2),
                     bbox_head=dict(num_classes={{{{_base_.synth_num_classes}}}}), test_cfg=dict(max_per_img=20))
        train_dataloader = {{{{_base_.synth_train_dataloader}}}}
        val_dataloader = {{{{_base_.synth_val_dataloader}}}}
        test_dataloader = {{{{_base_.synth_val_dataloader}}}}
        val_evaluator = {{{{_base_.synth_val_evaluator}}}}
        test_evaluator = {{{{_base_.synth_val_evaluator}}}}
        """))
    synth = make_synthetic_dataset(tmp_path / "synth", num_train=8, num_val=4, imgsz=96, seed=0)
    recipe = {"preset": "w4a8-ptq", "calibration": {"num_batches": 2}, "ptq": {"method": "adaround", **FAST, "batch_size": 2}}
    runner = Runner.from_cfg(hook_recipe(load_cfg(str(config), synth, tmp_path / "work"), recipe))
    runner.model.init_weights()  # Runner.test() runs none: level_embed would stay uninitialised memory
    runner.test()
    hook = next(h for h in runner.hooks if type(h).__name__ == "DetQHook")
    blocks = {b.name: b for b in hook.session.last_calibration.reconstruction.blocks}
    assert runner.model.as_two_stage and "pos_trans_fc" in blocks
    for name in ("pos_trans_fc", "decoder.layers.0", "decoder.layers.1", "bbox_head.reg_branches.0", "bbox_head.cls_branches.1"):
        assert blocks[name].target == "float block" and blocks[name].loss_after <= blocks[name].loss_before, name
    for name in ("encoder.layers.0", "bbox_head.cls_branches.2", "bbox_head.reg_branches.2"):
        assert blocks[name].target == "float model", name
    # the proposal branches run before the pick, so before pos_trans_fc and the decoder
    order = list(blocks)
    assert order.index("bbox_head.cls_branches.2") < order.index("pos_trans_fc") < order.index("decoder.layers.0")


def test_mmdet_decoder_of_dtr_is_the_heads_own():
    """DTR's boxes and scores per prior on an MMDetection dense head are those of the head's own
    ``predict_by_feat`` before NMS (every prior and class kept), up to its clipping to the image (``predict`` clips
    to [0, image size]; DTR compares unclipped boxes; here the image is made large enough that only 0 clips)."""
    pytest.importorskip("mmdet")
    pytest.importorskip("mmcv.ops")
    from mmengine.config import Config, ConfigDict
    from mmengine.registry import init_default_scope
    from mmdet.registry import MODELS

    from detq_hooks.detectors.mmdet import MMDetFamily

    init_default_scope("mmdet")
    torch.manual_seed(0)
    model = MODELS.build(Config.fromfile(str(INTEGRATIONS / "mmdet" / "rtmdet_tiny_synthetic.py")).model).eval()
    family = MMDetFamily()
    assert family.head_block(model) == "bbox_head"
    with torch.no_grad():
        cls_scores, bbox_preds = model(torch.rand(2, 3, 64, 64), mode="tensor")
        boxes, scores = family.decode_head_output(model, (cls_scores, bbox_preds))
        metas = [dict(img_shape=(10_000, 10_000), ori_shape=(64, 64), scale_factor=(1.0, 1.0))] * 2
        theirs = model.bbox_head.predict_by_feat(cls_scores, bbox_preds, batch_img_metas=metas, rescale=False,
                                                 with_nms=False, cfg=ConfigDict(score_thr=0.0, nms_pre=10**9))
    num_classes = model.bbox_head.num_classes
    assert boxes.shape == (2, 8 * 8 + 4 * 4 + 2 * 2, 4) and scores.shape == (2, boxes.shape[1], num_classes)
    for image, result in enumerate(theirs):
        # ours per (prior, class): box and score; theirs: the same pairs in score order
        ours = torch.cat([scores[image].reshape(-1, 1), boxes[image].clamp(min=0).repeat_interleave(num_classes, 0)], 1)
        other = torch.cat([result.scores[:, None], result.bboxes], 1)
        assert len(other) == len(ours)
        torch.testing.assert_close(_rows_sorted(ours), _rows_sorted(other))


MMDET_DENSE_HEADS = ["gfl/gfl_r50_fpn_1x_coco.py", "atss/atss_r50_fpn_1x_coco.py", "tood/tood_r50_fpn_1x_coco.py",
                     "fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py", "autoassign/autoassign_r50-caffe_fpn_1x_coco.py",
                     "vfnet/vfnet_r50_fpn_1x_coco.py"]


def _mmdet_zoo_model(config: str):
    """A model of MMDetection's own config zoo (shipped in its wheel), ResNet-18 in place of ResNet-50, 3 classes,
    random weights."""
    import mmdet
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmdet.registry import MODELS

    init_default_scope("mmdet")
    cfg = Config.fromfile(str(Path(mmdet.__file__).parent / ".mim" / "configs" / config)).model
    cfg.backbone.update(depth=18, init_cfg=None)
    cfg.neck.in_channels = [64, 128, 256, 512][-len(cfg.neck.in_channels):]
    cfg.bbox_head.num_classes = 3
    torch.manual_seed(0)
    return MODELS.build(cfg).eval()


@pytest.mark.parametrize("config", MMDET_DENSE_HEADS)
def test_mmdet_decoder_of_dtr_follows_each_heads_own_inference(config):
    """Heads whose inference is not plain box coder + sigmoid: GFL (the integral of a box distribution), TOOD (boxes
    in stride units, scores already probabilities), FCOS/ATSS centerness and AutoAssign objectness (score factors
    that multiply the class scores), VFNet (its refined boxes). Every (prior, class) pair of ours is one of the head's own ``predict_by_feat``
    before NMS; clipping to the image as there (not for TOOD, which does not clip)."""
    pytest.importorskip("mmdet")
    pytest.importorskip("mmcv.ops")
    from mmengine.config import ConfigDict

    from detq_hooks.detectors.mmdet import MMDetFamily

    model = _mmdet_zoo_model(config)
    family = MMDetFamily()
    assert family.head_block(model) == "bbox_head"
    with torch.no_grad():
        outs = model(torch.rand(2, 3, 128, 128), mode="tensor")
        boxes, scores = family.decode_head_output(model, outs)
        metas = [dict(img_shape=(10_000, 10_000), ori_shape=(128, 128), scale_factor=(1.0, 1.0))] * 2
        theirs = model.bbox_head.predict_by_feat(*outs, batch_img_metas=metas, rescale=False, with_nms=False,
                                                 cfg=ConfigDict(score_thr=0.0, nms_pre=10**9, max_per_img=10**9))
    if not config.startswith("tood"):
        boxes = boxes.clamp(min=0)
    for image, result in enumerate(theirs):
        ours = torch.cat([boxes[image].repeat_interleave(3, 0), scores[image].reshape(-1, 1)], 1)
        other = torch.cat([result.bboxes, result.scores[:, None]], 1)
        assert len(other) == len(ours) == scores.shape[1] * 3
        # box first: a score folded from two outputs differs in its last bit, which would reorder near-ties
        torch.testing.assert_close(_rows_sorted(ours), _rows_sorted(other), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("config", ["paa/paa_r50_fpn_1x_coco.py", "foveabox/fovea_r50_fpn_4xb4-1x_coco.py"])
def test_mmdet_heads_decoding_their_own_way_are_refused_clearly(config):
    """A dense head whose ``predict_by_feat`` decodes its own way: TASKQ runs without DTR (no head block) and
    distillation's head terms fail naming it, instead of decoding it wrongly."""
    pytest.importorskip("mmdet")
    pytest.importorskip("mmcv.ops")
    from detq_hooks.detectors import UnsupportedDetectorError
    from detq_hooks.detectors.mmdet import MMDetFamily

    model = _mmdet_zoo_model(config)
    family = MMDetFamily()
    assert family.head_block(model) is None
    with pytest.raises(UnsupportedDetectorError, match=rf"a decoding this family knows.*\({type(model.bbox_head).__name__}\)"):
        family.head_taps(model)


def test_mmdet_two_stage_detector_is_refused_for_head_terms_naming_what_works():
    """Faster R-CNN (rpn_head + roi_head, no bbox_head): head terms and the critical objective are refused with a
    message that says so and what still works; TASKQ finds no head block (runs without DTR)."""
    pytest.importorskip("mmdet")
    pytest.importorskip("mmcv.ops")
    import mmdet
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmdet.registry import MODELS

    from detq_hooks.detectors import UnsupportedDetectorError, family_for

    init_default_scope("mmdet")
    cfg = Config.fromfile(str(Path(mmdet.__file__).parent / ".mim" / "configs" / "faster_rcnn" /
                              "faster-rcnn_r50_fpn_1x_coco.py")).model
    cfg.backbone.update(depth=18, init_cfg=None)
    cfg.neck.in_channels = [64, 128, 256, 512]
    model = MODELS.build(cfg).eval()
    family = family_for(model)
    assert family.name == "mmdet" and family.head_block(model) is None
    with pytest.raises(UnsupportedDetectorError, match=r"FasterRCNN is a two-stage detector \(rpn_head \+ roi_head\).*"
                       r"relational_weight/logit_weight/box_weight to 0"):
        family.head_taps(model)


def _rows_sorted(t: torch.Tensor) -> torch.Tensor:
    """Rows in lexicographic order (score first, then the box), ties and all."""
    for col in reversed(range(t.shape[1])):
        t = t[torch.argsort(t[:, col], stable=True)]
    return t


# ============================================================================================ Lightning
def validate_with_callback(tmp_path, callback):
    """``trainer.validate()`` of a tiny torchvision FCOS with ``callback``: PTQ as Lightning runs it, under
    inference mode. Returns the module."""
    import lightning.pytorch as pl

    from test_lightning import TinyFCOS, det_loader

    class FCOSWithVal(TinyFCOS):
        def validation_step(self, batch, batch_idx):
            self.log("val_loss", torch.tensor(0.0))

    module = FCOSWithVal()
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, callbacks=[callback])
    trainer.validate(module, det_loader(n=4))
    return module


def test_lightning_adaround_ptq_from_validate(tmp_path):
    pytest.importorskip("lightning.pytorch")
    from detq_hooks.lightning import DetQCallback

    torch.manual_seed(0)
    cb = DetQCallback({"preset": "w4a8-ptq", "calibration": {"num_batches": 2}, "ptq": {"method": "adaround", **FAST}},
                      target="model")
    module = validate_with_callback(tmp_path, cb)
    result = cb.last_calibration.reconstruction
    done = [b for b in result.blocks if b.skipped is None]
    assert len(done) >= 5 and all(b.loss_after <= b.loss_before for b in done)
    # the float copy ran in the target's place during reconstruction, and the module holds the quantized model again
    assert dq.is_quantized(module.model) and cb.session.float_copy is None


def _tiny_retinanet():
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN

    from test_lightning import TinyBody

    fpn = BackboneWithFPN(TinyBody(), {"layer2": "0", "layer3": "1", "layer4": "2"}, [16, 16, 16], 32)  # + max-pool level
    anchors = AnchorGenerator(((8, 11), (16, 22), (32, 45), (64, 90)), ((0.5, 1.0, 2.0),) * 4)
    return RetinaNet(fpn, 4, min_size=64, max_size=64, anchor_generator=anchors)


@pytest.mark.parametrize("detector", ["fcos", "retinanet", "ssdlite"])
def test_torchvision_decoder_of_dtr_keeps_the_real_anchors_iou_and_the_postprocess_scores(detector):
    """The torchvision head's output has lost its image and feature sizes, so DTR decodes every anchor's box at a
    unit anchor: the IoU of a quantized and a float box of one anchor must be the one at the real anchors, and the
    scores those the detector's own postprocess ranks by (every anchor and class kept, NMS off)."""
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large

    from test_lightning import det_loader, tiny_fcos
    from detq_hooks.detectors import family_for
    from detq_hooks.distill import elementwise_iou
    from detq_hooks.recording import record

    torch.manual_seed(0)
    det = {"fcos": tiny_fcos, "retinanet": _tiny_retinanet,
           "ssdlite": lambda: ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=4)}[detector]()
    det.eval()
    family = family_for(det)
    assert family.head_block(det) == "head"
    images = next(iter(det_loader()))[0]
    with torch.no_grad(), record(det, family.head_taps(det)) as rec:
        family.teacher_forward(det, (images,))
    anchors = rec.output("anchor_generator")
    # head outputs of the recorded shapes with a spread a trained head has (random-init SSDlite's are ~1e-15)
    output = {k: torch.randn_like(v) for k, v in rec.output("head").items()}
    if detector == "fcos":  # left, top, right, bottom distances in anchor sizes, after the head's ReLU
        output["bbox_regression"] = torch.rand_like(output["bbox_regression"]) * 2
    shifted = {k: v + 0.2 * torch.randn_like(v) for k, v in output.items()}  # a "quantized" head output
    shifted["bbox_regression"] = shifted["bbox_regression"].clamp_min(0) if detector == "fcos" else shifted["bbox_regression"]
    boxes, scores = family.decode_head_output(det, output)
    boxes_q, _ = family.decode_head_output(det, shifted)
    if detector == "fcos":  # BoxLinearCoder decodes a batch
        real = [det.box_coder.decode(o["bbox_regression"], torch.stack(anchors)) for o in (output, shifted)]
    else:
        real = [torch.stack([det.box_coder.decode_single(o["bbox_regression"][i], a) for i, a in enumerate(anchors)])
                for o in (output, shifted)]
    iou = elementwise_iou(boxes_q, boxes)
    assert boxes.shape == real[0].shape and 0.05 < float(iou.mean()) < 0.95  # the shift moved the boxes, not all
    torch.testing.assert_close(iou, elementwise_iou(*real), atol=2e-4, rtol=0)  # float32 rounding at pixel scale

    # the detector's own postprocess with nothing dropped: its scores are ours, every (anchor, class) once
    det.score_thresh, det.topk_candidates, det.nms_thresh, det.detections_per_img = -1.0, 10**6, 1.0, 10**6
    if detector == "ssdlite":
        theirs = det.postprocess_detections(output, anchors, [(64, 64)] * len(images))
    else:  # FCOS and RetinaNet take their outputs and anchors per level
        sizes = _anchors_per_level(det, images, output["cls_logits"].shape[1])
        theirs = det.postprocess_detections({k: list(v.split(sizes, dim=1)) for k, v in output.items()},
                                            [list(a.split(sizes)) for a in anchors], [(64, 64)] * len(images))
    for i, result in enumerate(theirs):
        assert len(result["scores"]) == scores.shape[1] * scores.shape[2]
        torch.testing.assert_close(result["scores"].sort().values, scores[i].flatten().sort().values)


def _anchors_per_level(det, images, total: int) -> list[int]:
    """Anchors per level of a torchvision FCOS/RetinaNet on the batch's images, as its ``forward`` splits them."""
    with torch.no_grad():
        image_list, _ = det.transform(images)
        locations = [f.shape[-2] * f.shape[-1] for f in det.backbone(image_list.tensors).values()]
    return [n * (total // sum(locations)) for n in locations]


def test_lightning_taskq_on_torchvision_fcos_reconstructs_its_head_with_dtr(tmp_path):
    """TASKQ on a torchvision detector runs detection-aware task regularisation on the whole head, last."""
    import warnings

    pytest.importorskip("lightning.pytorch")
    from detq_hooks.lightning import DetQCallback

    torch.manual_seed(0)
    cb = DetQCallback({"preset": "w4a8-taskq", "calibration": {"num_batches": 2}, "ptq": {**FAST, "iterations": 40}},
                      target="model")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = validate_with_callback(tmp_path, cb)
    assert not [w for w in caught if "names no head block" in str(w.message)]
    blocks = cb.last_calibration.reconstruction.blocks
    # the family's blocks end with the head towers; the whole head comes once more, last, only for DTR
    assert blocks[-1].name == "head" and blocks[-1].skipped is None
    assert blocks[-1].loss_after < blocks[-1].loss_before
    # validate() runs under inference mode: the sparse outlier quantizers TASKQ adds there must still be ordinary
    # tensors (a block put back after reconstruction loads its state into them in place)
    sparse = [n for n, t in module.model.state_dict().items() if "ratio_state" in n]
    assert len(sparse) >= 10 and not [n for n, t in module.model.state_dict().items() if t.is_inference()]


def test_taskq_on_a_family_without_a_head_decoder_runs_without_dtr_unless_asked():
    torch.manual_seed(0)
    batches = [torch.randn(8, 3, 16, 16) for _ in range(2)]
    model = ConvNet().eval()
    with pytest.warns(UserWarning, match=r"names no head block.*TASKQ runs without detection-aware"):
        dq.ptq(model, batches, {"preset": "w4a8-taskq", "calibration": {"num_batches": 2}, "ptq": FAST}, progress=False)
    assert [b.name for b in model.detq_ptq.reconstruction.blocks] == ["stem", "body", "head"]
    other = ConvNet().eval()
    from detq_hooks.detectors import UnsupportedDetectorError

    with pytest.raises(UnsupportedDetectorError, match=r"`ptq.dtr` needs the head of ConvNet"):
        dq.ptq(other, batches, {"preset": "w4a8-taskq", "calibration": {"num_batches": 2}, "ptq": {**FAST, "dtr": True}},
               progress=False)
    assert not dq.is_quantized(other)


def test_rtdetr_ptq_reconstructs_its_decoder_by_parts(tmp_path):
    """RT-DETR's head returns its decoder layers stacked in front of the batch, so it is not one block: its input
    projections, encoder-output heads, query position head and each decoder layer with its box and score heads
    are (a TASKQ run on it failed with "every tensor of its output must have the batch as leading dimension")."""
    pytest.importorskip("ultralytics")
    from ultralytics import RTDETR

    from test_ultralytics import rtdetr_tiny_yaml
    from detq_hooks.detectors import family_for
    from detq_hooks.ultralytics.trainer import calibration_forward

    model = RTDETR(rtdetr_tiny_yaml(tmp_path / "rtdetr-tiny.yaml")).model.eval()
    blocks = family_for(model).reconstruction_blocks(model)
    head = [b for b in blocks if b.startswith("model.28")]
    assert "model.28" not in blocks and blocks[:28] == [f"model.{i}" for i in range(28)]
    assert head[:3] == ["model.28.input_proj.0", "model.28.input_proj.1", "model.28.input_proj.2"]
    assert head[-3:] == ["model.28.decoder.layers.1", "model.28.dec_bbox_head.1", "model.28.dec_score_head.1"]
    torch.manual_seed(0)
    batches = [torch.rand(4, 3, 64, 64)]
    dq.ptq(model, batches, {"preset": "w4a8-ptq", "calibration": {"num_batches": 1},
                            "ptq": {"method": "qdrop", "iterations": 20, "batch_size": 4}},
           forward_fn=calibration_forward, progress=False)
    done = {b.name: b for b in model.detq_ptq.reconstruction.blocks}
    for name in ("model.28.decoder.layers.0", "model.28.decoder.layers.1", "model.28.dec_score_head.1", "model.28.enc_output"):
        assert done[name].quantized_layers > 0 and done[name].loss_after <= done[name].loss_before, (name, done[name])
    # the decoder runs on the top-k encoder proposals: fit to the float block on the quantized model's queries
    assert {n: b.target for n, b in done.items() if n.startswith("model.28.")} == {
        n: "float block" if n.split(".")[2] in ("decoder", "query_pos_head", "dec_bbox_head", "dec_score_head") else "float model"
        for n in done if n.startswith("model.28.")}
    assert done["model.28.query_pos_head"].calls == len(model.model[28].decoder.layers)
