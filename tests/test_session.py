"""The core QuantSession and the one checkpoint state, without any trainer: plan authority on rebuild,
verification before loading, legacy formats, the loss-term seam and the random stream around calibration."""

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import detq_hooks as dq
from detq_hooks.checkpoint import STATE_KEYS, CheckpointMismatchError, layer_plan, read_state
from detq_hooks.detectors import DetectorFamily, UnsupportedDetectorError, family_for
from detq_hooks.loss_terms import FunctionTerm
from detq_hooks.session import QuantSession

from core_models import TinyDetector

FIXTURES = Path(__file__).parent / "fixtures" / "legacy_0.1.0"


def batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 32, 32, generator=g) for _ in range(n)]


def converted(recipe="w4a8"):
    torch.manual_seed(0)
    model = TinyDetector()
    session = QuantSession(recipe)
    session.convert(model)
    session.calibrate(model, batches())
    return model, session


def test_changed_bits_survive_state_and_rebuild():
    model, session = converted()
    model.neck[2].weight_quantizer.bits = 6  # what mixed precision does after conversion
    model.neck[2].input_quantizer.enabled = False
    state, weights = session.state(model), model.state_dict()
    assert set(state) == set(STATE_KEYS) and state["version"] == 2
    assert state["layers"]["neck.2"]["weight_bits"] == 6 and state["layers"]["neck.2"]["input_enabled"] is False

    torch.manual_seed(1)
    fresh = TinyDetector()
    other = QuantSession("w4a8")
    other.restore(fresh, state)
    other.verify(fresh, weights, state)
    fresh.load_state_dict(weights, strict=True)
    assert fresh.neck[2].weight_quantizer.bits == 6 and not fresh.neck[2].input_quantizer.enabled
    assert layer_plan(fresh) == state["layers"]
    x = batches(1, seed=5)[0]
    model.eval(), fresh.eval()
    assert torch.equal(model(x)[0], fresh(x)[0])


def test_recipe_fingerprint_is_unchanged_by_per_layer_bits():
    model, session = converted()
    before = dq.recipe_of(model).fingerprint()
    model.neck[2].weight_quantizer.bits = 2
    assert dq.recipe_of(model).fingerprint() == before
    with pytest.raises(CheckpointMismatchError, match=r"layer 'neck.2' has weight_bits = 2 in the checkpoint and 4"):
        _, plain = converted()
        plain_model = TinyDetector()
        QuantSession("w4a8").convert(plain_model)
        QuantSession("w4a8").verify(plain_model, model.state_dict(), session.state(model))


def test_plan_naming_a_missing_layer_fails_and_leaves_the_model_float():
    model, session = converted()
    state = session.state(model)
    state["layers"]["head.extra"] = dict(state["layers"]["neck.2"])
    fresh = TinyDetector()
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(CheckpointMismatchError, match=r"'head.extra'"):
        QuantSession("w4a8").restore(fresh, state, source="ckpt.pt")
    assert not dq.is_quantized(fresh)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


def test_weight_shape_mismatch_names_the_layer_before_anything_is_loaded():
    model, session = converted()
    other = TinyDetector(width=8)
    QuantSession("w4a8").convert(other)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(CheckpointMismatchError, match=r"layer 'backbone.0' has weight shape \(16, 3, 3, 3\)"):
        QuantSession("w4a8").verify(other, model.state_dict(), session.state(model), source="ckpt.pt")
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_another_recipe_is_refused_with_the_difference():
    model, session = converted("w4a8")
    with pytest.raises(CheckpointMismatchError, match=r"recipe 'w4a8', this run asks for 'w8a8' \(differs in \['weight'\]\)"):
        QuantSession("w8a8").restore(TinyDetector(), session.state(model))


@pytest.mark.parametrize("fixture, locate", [
    ("lightning_tinydet_w4a8.ckpt", lambda c: (c["detq"], c.get("detq_teacher"))),
    ("mmengine_toydet_w4a8.pth", lambda c: (c["meta"]["detq"], None)),
    ("ultralytics_yolo11tiny_w4a8.pt", lambda c: (c["detq"], None)),
])
def test_every_0_1_format_reads_as_the_current_one(fixture, locate):
    ckpt = torch.load(FIXTURES / fixture, map_location="cpu", weights_only=False)
    entry, teacher = locate(ckpt)
    state = read_state(entry, source=fixture, legacy_teacher=teacher)
    assert set(state) == set(STATE_KEYS) and state["version"] == 2 and state["recipe"]["name"] == "w4a8"
    assert state["layers"] and all(v["weight_bits"] in (4, 8) for v in state["layers"].values())
    assert sum(v["weight_bits"] == 4 for v in state["layers"].values()) > 0


def test_unknown_state_version_says_what_to_do():
    model, session = converted()
    state = session.state(model)
    state["version"] = 3
    with pytest.raises(CheckpointMismatchError, match="upgrade detq-hooks"):
        read_state(state, source="new.ckpt")


def test_head_terms_on_an_unknown_detector_fail_before_the_model_is_touched():
    model = TinyDetector()
    before = copy.deepcopy(model.state_dict())
    recipe = {"preset": "w4a8-crqat", "curriculum": {"stages": [{"name": "a", "modules": ["backbone"]},
                                                                 {"name": "b", "modules": ["neck", "cls_head", "box_head", "pool_fc"]}]}}
    with pytest.raises(UnsupportedDetectorError, match=r"TinyDetector .*DetectorFamily"):
        QuantSession(recipe).convert(model)
    assert not dq.is_quantized(model) and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert type(family_for(model)) is DetectorFamily


def test_curriculum_anchor_keeps_disabled_quantizer_scales_in_the_graph():
    model = TinyDetector()
    recipe = {"preset": "w4a8", "curriculum": {"enabled": True, "stages": [
        {"name": "a", "modules": ["backbone"]}, {"name": "b", "modules": ["neck", "cls_head", "box_head", "pool_fc"]}]}}
    session = QuantSession(recipe)
    session.convert(model)
    session.calibrate(model, batches())
    session.start_training(model, progress=0.0)
    model.train()
    out = model(batches(1)[0])
    terms = session.loss_terms(model, batches(1)[0])
    assert set(terms) == {"_ddp_anchor"} and float(terms["_ddp_anchor"].detach()) == 0.0
    (out[0].mean() + terms["_ddp_anchor"]).backward()
    disabled = model.neck[2].weight_quantizer.scale
    assert not model.neck[2].weight_quantizer.enabled and disabled.grad is not None and float(disabled.grad.abs().sum()) == 0.0
    assert float(model.backbone[3].weight_quantizer.scale.grad.abs().sum()) > 0


def test_user_loss_terms_join_through_the_same_seam():
    model, session = converted()
    session.add_loss_term(FunctionTerm("l2", lambda ctx: {"l2": sum(p.pow(2).sum() for p in ctx.model.parameters()) * 1e-4}))
    with pytest.raises(ValueError, match="'l2' is already registered"):
        session.add_loss_term(FunctionTerm("l2", lambda ctx: {}))
    session.start_training(model)
    terms = session.loss_terms(model, None)
    assert set(terms) == {"l2"} and session.last_terms["l2"] == pytest.approx(float(terms["l2"].detach()))


def test_calibration_leaves_the_training_random_stream_as_it_was():
    def draw_and_forward(m, batch):
        torch.rand(1000)  # augmentation or dropout in the user's forward consume random numbers
        return m(batch)

    torch.manual_seed(123)
    expected = torch.rand(5)
    model, session = converted()
    torch.manual_seed(123)
    session.calibrate(model, batches(), draw_and_forward)
    assert torch.equal(torch.rand(5), expected)


def test_calibration_batches_override_the_recipe():
    model = TinyDetector()
    session = QuantSession("w4a8", calibration_batches=2)
    session.convert(model)
    assert session.calibrate(model, batches(5)).num_batches == 2
    with pytest.raises(ValueError, match=r"`calibration_batches` = 0"):
        QuantSession("w4a8", calibration_batches=0)


def test_a_family_instance_that_is_not_a_family_is_refused():
    with pytest.raises(TypeError, match=r"`family` = 'yolo'"):
        QuantSession("w4a8", family="yolo")


def test_ptq_session_is_calibration_only():
    model = TinyDetector()
    float_weights = {k: v.clone() for k, v in model.state_dict().items()}
    session = QuantSession("w8a8-ptq")
    assert session.ptq
    session.convert(model, training=False)
    result = session.run_ptq(model, batches())
    assert result.num_batches == 3 and all(q.initialized for _, q in dq.iter_quantizers(model))
    assert all(torch.equal(float_weights[k], v) for k, v in model.state_dict().items() if k in float_weights)


def test_restore_of_a_pickled_module_reads_its_plan(tmp_path):
    model, session = converted()
    model.neck[2].weight_quantizer.bits = 5
    path = tmp_path / "m.pt"
    torch.save(model, path)
    loaded = torch.load(path, weights_only=False)
    from detq_hooks.checkpoint import module_state

    assert module_state(loaded)["layers"]["neck.2"]["weight_bits"] == 5
    fresh = TinyDetector()
    QuantSession("w4a8").restore(fresh, module_state(loaded))
    fresh.load_state_dict(loaded.state_dict(), strict=True)
    assert fresh.neck[2].weight_quantizer.bits == 5


def test_family_answers_set_prediction_and_float_layers():
    class Fam(DetectorFamily):
        def prediction_layers(self, model):
            return ["cls_head"]

        def float_layers(self, model):
            return ["pool_fc"]

    model = TinyDetector()
    QuantSession("w4a8", family=Fam()).convert(model)
    assert isinstance(model.pool_fc, nn.Linear) and not dq.is_quantized(model.pool_fc)
    assert model.cls_head.weight_quantizer.bits == 8 and model.box_head.weight_quantizer.bits == 4


def test_one_optimizer_step_at_most_halves_a_step_size():
    """An overshoot that lands near zero, on either side of it, would leave the layer dead (a tiny YOLO11n after
    one QAT epoch had an activation step size of 1e-6 and 0.2 dB): after ``before_step`` the session keeps each
    step size at no less than half its value before the step, and leaves ordinary steps alone."""
    model, session = converted()
    session.before_step(model, 0.0)
    scales = [q.scale for _, q in dq.quantizers.iter_quantizers(model) if q.scale.requires_grad]
    with torch.no_grad():
        before = [s.detach().clone() for s in scales]
        scales[0].mul_(1e-4)  # collapsed towards zero
        scales[1].mul_(-1e-4)  # just past it
        scales[2].mul_(0.8)  # an ordinary step
        scales[3].mul_(1.5)
    session.after_optimizer_step(model)
    assert torch.allclose(scales[0], 0.5 * before[0]) and torch.allclose(scales[1], 0.5 * before[1])
    assert torch.allclose(scales[2], 0.8 * before[2]) and torch.allclose(scales[3], 1.5 * before[3])
    assert all(torch.equal(s, b) for s, b in zip(scales[4:], before[4:]))
    session.after_optimizer_step(model)  # called again without a step in between (gradient accumulation): no change
    assert torch.allclose(scales[0], 0.5 * before[0]) and torch.allclose(scales[2], 0.8 * before[2])


def test_optimizer_step_past_zero_leaves_step_sizes_positive():
    """A plain SGD step on a small calibrated scale overshoots zero; the session reflects it back after the step
    (all three trainers call ``after_optimizer_step``), so no layer ends up quantizing to nothing."""
    model, session = converted()
    scales = [q.scale for _, q in dq.quantizers.iter_quantizers(model) if q.scale.requires_grad]
    assert len(scales) > 4
    with torch.no_grad():
        before = [s.detach().clone() for s in scales]
        scales[0].sub_(3 * scales[0].abs().max())  # what one too-large step does
        scales[1].neg_()
    session.after_optimizer_step(model)
    assert all((s > 0).all() for s in scales)
    assert torch.allclose(scales[1], before[1])
    assert torch.allclose(scales[0], 3 * before[0].max() - before[0])
    assert all(torch.equal(s, b) for s, b in zip(scales[2:], before[2:]))
