"""Core of CR-QAT: curriculum schedule and freezing, teacher, distillation losses (trainer-free)."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

import detq_hooks as dq
from detq_hooks.curriculum import CurriculumSchedule, Stage
from detq_hooks.distill import (
    Assignment, DistillationLoss, HeadOutputs, Teacher, box_consistency_loss, elementwise_iou,
    hungarian_match, logit_loss, pkd_loss, relational_loss,
)
from detq_hooks.recipe import RecipeError, load_recipe
from detq_hooks.recording import Taps, capture_outputs, record

from core_models import TinyDetector

STAGES = [Stage("backbone", ["backbone"], ["backbone"]), Stage("neck+head", ["neck", "cls_head", "box_head", "pool_fc"])]


def _student_and_teacher():
    torch.manual_seed(0)
    model = TinyDetector()
    teacher = Teacher.from_model(model)
    dq.quantize(model, "w4a4", prediction_layers=["cls_head", "box_head", "pool_fc"])
    dq.calibrate(model, [torch.randn(2, 3, 32, 32)])
    return model, teacher


def test_schedule_boundaries_and_recipe_defaults():
    sched = CurriculumSchedule.from_recipe(load_recipe("w4a4-crqat").curriculum, STAGES)
    assert sched.boundaries == [pytest.approx(1 / 3)]
    assert [sched.stage_at(p) for p in (0.0, 0.3, 0.34, 1.0)] == [0, 0, 1, 1]
    with pytest.raises(RecipeError, match="boundaries"):
        load_recipe({"curriculum": {"enabled": True, "boundaries": [0.7, 0.2]}})
    with pytest.raises(RecipeError, match="one boundary fewer than stages"):
        load_recipe({"curriculum": {"stages": [{"name": "a", "modules": ["x"]}], "boundaries": [0.5]}})
    with pytest.raises(RecipeError, match="ptq"):
        load_recipe({"mode": "ptq", "distillation": {"enabled": True}})


def test_stage_one_keeps_later_stage_float_and_frozen_then_stage_two_quantizes_it():
    model, _ = _student_and_teacher()
    sched = CurriculumSchedule(STAGES, [1 / 3])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    assert sched.update(model, 0.0) and sched.current == 0
    assert model.backbone[0].weight_quantizer.enabled and not model.cls_head.weight_quantizer.enabled
    assert not model.neck[2].input_quantizer.enabled
    head_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("neck", "cls_head", "box_head"))}
    bb_before = model.backbone[3].weight.detach().clone()
    model.train()
    for _ in range(3):
        opt.zero_grad()
        out = model(torch.randn(2, 3, 32, 32))
        sum(o.square().mean() for o in out).backward()
        assert model.cls_head.weight.grad.abs().sum() == 0  # frozen: gradient zeroed as it is produced
        assert model.backbone[3].weight.grad.abs().sum() > 0  # gradient flows through the frozen float stage
        opt.step()
        sched.after_optimizer_step(model)
    after = model.state_dict()
    assert all(torch.equal(head_before[k], after[k]) for k in head_before)  # weight decay/momentum undone
    assert not torch.equal(bb_before, model.backbone[3].weight)
    assert not sched.update(model, 0.2)  # same stage: nothing to do
    assert sched.update(model, 0.5) and sched.current == 1
    assert model.cls_head.weight_quantizer.enabled and model.neck[2].input_quantizer.enabled
    opt.zero_grad()
    sum(o.square().mean() for o in model(torch.randn(2, 3, 32, 32))).backward()
    assert model.cls_head.weight.grad.abs().sum() > 0


def test_frozen_stage_with_fixed_parameters_applies_and_stays_put():
    """A later stage holding a parameter the host keeps fixed (requires_grad=False, like YOLO's DFL conv) is
    frozen without a gradient hook on it, and it does not move."""
    model, _ = _student_and_teacher()
    model.box_head.weight.requires_grad_(False)
    fixed = model.box_head.weight.detach().clone()
    sched = CurriculumSchedule(STAGES, [1 / 3])
    assert sched.update(model, 0.0) and sched.current == 0
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=1e-2)
    sum(o.square().mean() for o in model(torch.randn(2, 3, 32, 32))).backward()
    assert model.box_head.weight.grad is None and model.cls_head.weight.grad.abs().sum() == 0
    opt.step()
    sched.after_optimizer_step(model)
    assert torch.equal(model.box_head.weight, fixed)
    assert sched.update(model, 0.5) and sched.current == 1


def test_schedule_state_resumes_the_same_stage():
    model, _ = _student_and_teacher()
    sched = CurriculumSchedule(STAGES, [1 / 3])
    sched.update(model, 0.0)
    state = sched.state_dict()
    model2 = copy.deepcopy(model)
    dq.set_quantization_enabled(model2, weights=True, activations=True)
    sched2 = CurriculumSchedule(STAGES, [1 / 3])
    sched2.load_state_dict(state, model2)
    assert sched2.current == 0 and not model2.cls_head.weight_quantizer.enabled
    with pytest.raises(RecipeError, match="differs from this run"):
        CurriculumSchedule(STAGES, [0.5]).load_state_dict(state, model2)


def test_resume_refuses_stages_that_hold_other_layers():
    """Same stage names and boundaries but other layers per stage (a changed recipe, or a family whose default
    stages changed between versions): resuming must not silently freeze other layers."""
    model, _ = _student_and_teacher()
    sched = CurriculumSchedule(STAGES, [1 / 3])
    sched.update(model, 0.0)
    state = sched.state_dict()
    assert state["prefixes"] == [["backbone"], ["neck", "cls_head", "box_head", "pool_fc"]]
    # Other prefixes selecting the same parameters are the same curriculum.
    same = [Stage("backbone", ["backbone.*", "re:^backbone$"]), Stage("neck+head", ["neck", "cls_head", "box_head", "pool_fc"])]
    resumed = CurriculumSchedule(same, [1 / 3])
    resumed.load_state_dict(state, copy.deepcopy(model))
    assert resumed.current == 0
    moved = [Stage("backbone", ["backbone", "neck"]), Stage("neck+head", ["cls_head", "box_head", "pool_fc"])]
    other = copy.deepcopy(model)
    before = {n: q.enabled for n, q in other.named_modules() if n.endswith("_quantizer")}
    with pytest.raises(RecipeError, match=r"hold other layers than this run's \(\d+ differ, e\.g\. \['neck\.[^']* \(neck\+head "
                       r"in the checkpoint, backbone now\)'.*curriculum\.stages = \[\{'name': 'backbone', 'modules': \['backbone'\]"):
        CurriculumSchedule(moved, [1 / 3]).load_state_dict(state, other)
    assert {n: q.enabled for n, q in other.named_modules() if n.endswith("_quantizer")} == before  # nothing applied
    with pytest.raises(RecipeError, match=r"neck\+head: \['neck', 'cls_head', 'box_head', 'pool_fc'\] in the checkpoint"):
        CurriculumSchedule(moved, [1 / 3]).load_state_dict(state)  # no model: the prefixes themselves must agree
    # A checkpoint written before the prefixes were saved resumes mid-curriculum with a warning, not silently.
    old = {k: v for k, v in state.items() if k not in ("prefixes", "outputs")}
    with pytest.warns(UserWarning, match=r"stage 1/2, 'backbone'\) does not record which layers each stage holds"):
        CurriculumSchedule(moved, [1 / 3]).load_state_dict(old, copy.deepcopy(model))


def test_stage_matching_errors():
    model, _ = _student_and_teacher()
    with pytest.raises(RecipeError, match="matches no parameter"):
        CurriculumSchedule([Stage("a", ["backbone"]), Stage("b", ["nothing_here"])], [0.5]).update(model, 0.0)
    with pytest.raises(RecipeError, match="belong to no curriculum stage"):
        CurriculumSchedule([Stage("a", ["backbone"]), Stage("b", ["neck"])], [0.5]).update(model, 0.0)


def test_teacher_is_frozen_outside_the_student_and_not_picklable():
    model, teacher = _student_and_teacher()
    n_student = sum(1 for _ in model.parameters())
    assert all(not p.requires_grad for p in teacher.module.parameters())
    assert not dq.is_quantized(teacher.module)
    assert sum(1 for _ in model.parameters()) == n_student
    with pytest.raises(TypeError, match="not picklable"):
        pickle.dumps(teacher)
    assert isinstance(copy.deepcopy(teacher), Teacher)
    with pytest.raises(ValueError, match="must be the float model"):
        Teacher.from_model(model)


def test_losses_are_zero_at_equality_and_positive_otherwise():
    torch.manual_seed(0)
    f = torch.randn(2, 8, 5, 5)
    assert pkd_loss([f], [f]).item() == pytest.approx(0.0, abs=1e-6)
    assert pkd_loss([f], [f * 3 + 1]).item() == pytest.approx(0.0, abs=1e-6)  # Pearson: scale/shift invariant
    assert pkd_loss([f], [torch.randn_like(f)]).item() > 0.5
    logits = torch.randn(2, 6, 4)
    assert logit_loss(logits, logits).item() == pytest.approx(0.0, abs=1e-6)
    assert logit_loss(logits, logits + 1).item() > 0
    assert logit_loss(logits, logits.flip(-1), kind="softmax").item() > 0
    boxes = torch.tensor([[0.0, 0, 10, 10], [5, 5, 15, 15]])
    assert elementwise_iou(boxes, boxes).tolist() == pytest.approx([1.0, 1.0])
    assert elementwise_iou(boxes[:1], torch.tensor([[5.0, 0, 15, 10]])).item() == pytest.approx(1 / 3, rel=1e-4)
    assert box_consistency_loss(boxes, boxes).item() == pytest.approx(0.0, abs=1e-6)
    emb = torch.randn(1, 6, 8)
    anchors = torch.randn(3, 8)
    labels = torch.tensor([[0, 0, 1, 1, 2, 2]])
    pos = torch.tensor([[True, True, True, False, True, True]])
    assert relational_loss(emb, emb, anchors, labels, pos).item() == pytest.approx(0.0, abs=1e-6)
    assert relational_loss(emb, torch.randn_like(emb), anchors, labels, pos).item() > 0
    # one-element class groups still have the anchor-to-region relation
    assert relational_loss(emb[:, :1], torch.randn(1, 1, 8), anchors, labels[:, :1], pos[:, :1]).item() > 0


def test_hungarian_match_recovers_a_permutation():
    torch.manual_seed(0)
    xy = torch.rand(5, 2) * 50
    tb = torch.cat([xy, xy + 10 + torch.rand(5, 2) * 10], 1)
    tl = torch.randn(5, 3)
    perm = torch.tensor([3, 0, 4, 1, 2])
    rows, cols = hungarian_match(tb[perm] + 0.1, tl[perm], tb, tl)
    assert torch.equal(perm[rows], cols)



def test_pkd_gradient_stays_bounded_for_a_channel_without_spread():
    """A student channel that is (nearly) constant -- dead, or a 1x1 level over two images -- must not blow its
    gradient up by 1/eps; healthy channels are standardised exactly as the plain Pearson formula does."""
    torch.manual_seed(0)
    teacher = torch.randn(2, 8, 1, 1)
    grads = {}
    for spread in (1.0, 1e-6, 0.0):
        student = (torch.randn(1, 8, 1, 1) + spread * torch.randn(2, 8, 1, 1)).requires_grad_()
        pkd_loss([student], [teacher]).backward()
        grads[spread] = student.grad.abs().max().item()
    assert grads[1e-6] < 100 and grads[0.0] < 100, grads  # 4e4 with the std floored only by eps
    f, g = torch.randn(2, 8, 5, 5), torch.randn(2, 8, 5, 5)

    def plain(x):
        flat = x.transpose(0, 1).reshape(8, -1)
        return (flat - flat.mean(1, keepdim=True)) / (flat.std(1, keepdim=True) + 1e-6)

    assert pkd_loss([f], [g]).item() == pytest.approx(((plain(f) - plain(g)) ** 2).mean().item() / 2, rel=1e-6)


def test_pkd_keeps_only_the_student_map_for_backward_and_matches_autograd():
    """The PKD term recomputes the standardisation in its backward: what it holds for backward is the student map
    and the teacher's standardised map (2 maps, was 5), and its value and gradient are autograd's through the plain
    formula, a floored (constant) channel included."""
    from detq_hooks.distill import _channel_standardize

    torch.manual_seed(0)
    shapes = [(4, 16, 10, 10), (4, 32, 5, 5)]
    students = [torch.randn(*sh).requires_grad_() for sh in shapes]
    with torch.no_grad():
        students[0][:, 3] = 0.7  # a dead channel: the std floor is active there
    teachers = [torch.randn(*sh) for sh in shapes]
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = pkd_loss(students, teachers)
    assert sum(saved.values()) == 2 * sum(s.numel() * 4 for s in students)
    loss.backward()
    reference = [s.detach().clone().requires_grad_() for s in students]
    expected = sum(torch.nn.functional.mse_loss(_channel_standardize(s), _channel_standardize(t)) / 2
                   for s, t in zip(reference, teachers)) / len(shapes)
    expected.backward()
    assert loss.item() == expected.item()
    for s, r in zip(students, reference):
        torch.testing.assert_close(s.grad, r.grad, rtol=0, atol=0)
    assert students[0].grad[:, 3].abs().max() < 1.0  # the floored channel's gradient stays bounded
    # a double backward through it is refused, not silently wrong (nothing in the project asks for one)
    s = torch.randn(2, 4, 3, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="pkd_loss has no double backward"):
        torch.autograd.grad(pkd_loss([s], [torch.randn(2, 4, 3, 3)]), s, create_graph=True)


def test_distillation_terms_follow_the_stage_and_give_gradients_only_to_the_student():
    model, teacher = _student_and_teacher()
    x = torch.randn(2, 3, 32, 32)
    with capture_outputs(teacher.module, ["backbone", "neck"]) as t_out:
        t_cls, t_box, _ = teacher(x)
    with capture_outputs(model, ["backbone", "neck"]) as s_out:
        s_cls, s_box, _ = model(x)

    def head(cls, box, neck, anchors):
        B, C = cls.shape[:2]
        logits = cls.flatten(2).transpose(1, 2)
        boxes = box.flatten(2).transpose(1, 2).abs().cumsum(-1)  # any xyxy-shaped boxes
        emb = neck.flatten(2).transpose(1, 2)
        return HeadOutputs(logits, boxes, emb, anchors)

    anchors = teacher.module.cls_head.weight[:, :, 0, 0]
    sh = head(s_cls, s_box, s_out["neck"], anchors)
    th = head(t_cls, t_box, t_out["neck"], anchors)
    labels = th.cls_logits.argmax(-1)
    assign = Assignment(th.cls_logits.sigmoid().amax(-1) > 0.5, labels)
    assert assign.positives.any()
    loss_fn = DistillationLoss(load_recipe("w4a4-crqat").distillation, num_stages=2)
    feats = dict(student_feats=[[s_out["backbone"]]], teacher_feats=[[t_out["backbone"]]])
    total0, terms0 = loss_fn(stage=0, student_head=sh, teacher_head=th, assignment=assign, **feats)
    assert set(terms0) == {"pkd_stage1"}
    total1, terms1 = loss_fn(stage=1, student_head=sh, teacher_head=th, assignment=assign, **feats)
    assert set(terms1) == {"pkd_stage1", "relational", "logit", "box"}  # stage-1 term stays on
    assert all(v > 0 for v in terms1.values()), terms1
    model.zero_grad()
    total1.backward()
    assert model.backbone[0].weight.grad.abs().sum() > 0 and model.cls_head.weight.grad.abs().sum() > 0
    assert model.backbone[3].weight_quantizer.scale.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.module.parameters())


def test_stop_after_ends_the_forward_once_every_named_module_ran():
    from torch import nn

    from detq_hooks.recording import Taps, record, stop_after

    class Swallows(nn.Module):  # model code that catches every Exception must not catch the stop
        def __init__(self):
            super().__init__()
            self.inner = nn.Sequential(nn.Linear(4, 4), nn.ReLU())

        def forward(self, x):
            try:
                return self.inner(x)
            except Exception:  # noqa: BLE001
                return torch.full_like(x, float("nan"))

    model = nn.Sequential(nn.Linear(4, 4), Swallows(), nn.Linear(4, 4), nn.Linear(4, 2))
    ran = []
    for i, m in enumerate(model):
        m.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
    hooks = [len(m._forward_hooks) for m in model.modules()]
    x = torch.randn(3, 4)
    with stop_after(model, ["1.inner"]):  # raised inside Swallows' try block
        model(x)
        pytest.fail("the forward should have been stopped")
    assert ran == [0]  # Swallows never returned: its except clause did not catch the stop
    ran.clear()
    with record(model, Taps(outputs=["2"])) as rec, stop_after(model, ["1.inner", "2"]):
        model(x)
        pytest.fail("the forward should have been stopped")
    assert ran == [0, 1, 2]  # the last layer never ran
    torch.testing.assert_close(rec.output("2"), model[2](model[1](model[0](x))))
    ran.clear()
    with stop_after(model, []):  # no names: the whole forward
        out = model(x)
    assert ran == [0, 1, 2, 3] and out.shape == (3, 2)
    assert [len(m._forward_hooks) for m in model.modules()] == hooks  # every hook it added is gone
    with pytest.raises(KeyError, match=r"no sub-module named \['neck'\]"):
        with stop_after(model, ["neck"]):
            pass


def _point_detector_session(stage_boundary=0.5, **distillation):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from own_detector import LitPointDetector, PointDetectorFamily, synthetic_batches

    from detq_hooks.session import QuantSession

    module = LitPointDetector()
    data = synthetic_batches(8)
    batch = (torch.stack([img for img, _ in data]), [t for _, t in data])
    teacher_state = copy.deepcopy(module.state_dict())
    session = QuantSession({"preset": "w4a8", "curriculum": {"enabled": True, "boundaries": [stage_boundary]},
                            "distillation": {"enabled": True, **distillation}}, family=PointDetectorFamily())
    session.convert(module)
    session.set_teacher_weights(teacher_state, "test")
    session.calibrate(module, [batch], forward_fn=lambda m, b: m(b[0]))
    return module, session, batch


def test_before_the_last_stage_the_teacher_runs_only_as_far_as_the_started_stages_read():
    """CR-QAT's first stage distils the backbone only: the teacher stops after its backbone (neck and head are
    not computed), no head is read, and the loss equals PKD on a full teacher forward's backbone output; in
    the last stage the teacher runs whole and the head terms come on."""
    from detq_hooks.distill import pkd_loss

    module, session, batch = _point_detector_session()
    teacher = session.teacher.module
    calls = {"neck": 0, "head": 0}
    teacher.detector.neck.register_forward_hook(lambda *a: calls.__setitem__("neck", calls["neck"] + 1))
    teacher.detector.head.register_forward_hook(lambda *a: calls.__setitem__("head", calls["head"] + 1))
    session.start_training(module, progress=0.0)
    assert session.stage == 0
    module.train()
    module(batch[0])
    session.loss_terms(module, batch)  # the first call traces the whole teacher once (which BatchNorms fold)
    calls.update(neck=0, head=0)
    module(batch[0])
    terms = session.loss_terms(module, batch)
    assert calls == {"neck": 0, "head": 0}
    assert set(session.last_terms) == {"distill", "distill_pkd_stage1"}
    with torch.no_grad(), capture_outputs(teacher, ["detector.backbone"]) as t_out:
        teacher(batch[0])
    with capture_outputs(module, ["detector.backbone"]) as s_out:
        module(batch[0])
    expected = session.recipe.distillation.feature_weight * pkd_loss([s_out["detector.backbone"]], [t_out["detector.backbone"]])
    torch.testing.assert_close(terms["distill"], expected)
    terms["distill"].backward()
    assert module.detector.backbone[0].weight.grad.abs().sum() > 0
    calls.update(neck=0, head=0)
    session.before_step(module, 0.9)
    assert session.stage == 1
    module(batch[0])
    session.loss_terms(module, batch)
    assert calls == {"neck": 1, "head": 1}
    assert set(session.last_terms) >= {"distill_pkd_stage1", "distill_relational", "distill_logit", "distill_box"}


def test_session_resume_with_stages_that_moved_is_refused_before_anything_is_loaded():
    """A checkpoint whose stages hold other layers (here the neck moved into the first stage) is refused by the
    session before its quantizer state is copied: the model's quantizers keep their values and flags."""
    module, session, batch = _point_detector_session()
    session.start_training(module, progress=0.0)
    entry = session.state(module, quantizer_state=True)
    entry["curriculum"]["prefixes"][0].append("detector.neck")
    entry["curriculum"]["prefixes"][1].remove("detector.neck")
    for k, v in entry["quantizer_state"].items():
        entry["quantizer_state"][k] = v * 2 if torch.is_tensor(v) and v.is_floating_point() else v
    before = {k: v.clone() for k, v in module.state_dict().items()}
    flags = [q.enabled for n, q in module.named_modules() if n.endswith("_quantizer")]
    with pytest.raises(RecipeError, match=r"hold other layers than this run's \(\d+ differ, e\.g\. \['detector\.neck\."
                                          r"[^']* \(backbone in the checkpoint, neck_head now\)'"):
        session.load_state(module, entry)
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())
    assert [q.enabled for n, q in module.named_modules() if n.endswith("_quantizer")] == flags


def test_the_teacher_runs_whole_when_a_distilled_module_runs_twice_per_forward():
    """A stage output module called twice per forward (a shared block) is read at its last call: the teacher
    is not cut short after the first one."""
    from torch import nn

    from detq_hooks.detectors import DetectorFamily
    from detq_hooks.loss_terms import DistillationTerm, StepContext
    from detq_hooks.recording import Recorder, Taps

    class SharedBlockNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, 1, 1)
            self.block = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1), nn.SiLU())
            self.head = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.head(self.block(self.block(self.stem(x))))

    class Fam(DetectorFamily):
        def teacher_forward(self, teacher, batch):
            teacher(batch)

    torch.manual_seed(0)
    student = SharedBlockNet()
    teacher = Teacher.from_model(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cfg = load_recipe({"preset": "w4a8", "distillation": {"enabled": True, "relational_weight": 0, "logit_weight": 0,
                                                           "box_weight": 0}}).distillation
    term = DistillationTerm(Fam(), teacher, DistillationLoss(cfg, num_stages=2),
                            [Stage("a", ["stem", "block"], ["block"]), Stage("b", ["head"])])
    x = torch.randn(2, 3, 16, 16)
    recorder = Recorder(student, Taps(outputs=["block"]))
    student.train()
    student(x)
    assert len(recorder.outputs["block"]) == 2
    got = term(StepContext(student, x, recorder.recorded, stage=0))["distill"]
    with torch.no_grad(), capture_outputs(teacher.module, ["block"]) as t_out:
        teacher(x)
    expected = cfg.feature_weight * pkd_loss([recorder.outputs["block"][-1]], [t_out["block"]])
    torch.testing.assert_close(got, expected)


def _relational_reference(student_emb, teacher_emb, class_anchors, labels, positives, anchor_index=None):
    """The definition, one (image, class[, group]) at a time: mean of Σ smoothL1(S^s_c − S^t_c) / |X_c|²."""
    total, groups = student_emb.new_zeros(()), 0
    for b in range(student_emb.shape[0]):
        pos = positives[b].nonzero().flatten()
        lab = labels[b, pos]
        grp = anchor_index[pos] if anchor_index is not None else torch.zeros_like(lab)
        for c, g in torch.stack([lab, grp], 1).unique(dim=0).tolist():
            sel = pos[(lab == c) & (grp == g)]
            t_c = class_anchors[g, c] if class_anchors.dim() == 3 else class_anchors[c]
            xs = F.normalize(torch.cat([t_c[None], student_emb[b, sel]]), dim=1)
            xt = F.normalize(torch.cat([t_c[None], teacher_emb[b, sel]]), dim=1)
            total = total + F.smooth_l1_loss(xs @ xs.T, xt @ xt.T, reduction="sum") / xs.shape[0] ** 2
            groups += 1
    return total / max(groups, 1)


@pytest.mark.parametrize("chunk", [1024, 7])
@pytest.mark.parametrize("grouped", [False, True])
def test_relational_loss_equals_its_per_class_definition(monkeypatch, chunk, grouped):
    """The batched relational loss (an image's classes in a few matrix products, chunked) gives the per-class
    definition's value and student gradient; with a chunk of 7 positives, groups larger than a chunk and
    groups split across chunk boundaries are exercised."""
    import detq_hooks.distill as distill

    monkeypatch.setattr(distill, "_RELATIONAL_CHUNK", chunk)
    torch.manual_seed(0)
    B, A, D, C, L = 3, 60, 16, 5, 3
    s = torch.randn(B, A, D, requires_grad=True)
    t = s.detach() + 0.3 * torch.randn(B, A, D)
    anchors = torch.randn(L, C, D) if grouped else torch.randn(C, D)
    labels = torch.randint(C, (B, A))
    labels[0, :20] = 1  # one class with 20 positives: larger than a 7-positive chunk
    positives = torch.rand(B, A) < 0.5
    positives[0, :20] = True
    positives[2] = False  # an image without positives
    index = torch.randint(L, (A,)) if grouped else None
    got = relational_loss(s, t, anchors, labels, positives, index)
    (g_got,) = torch.autograd.grad(got, s)
    want = _relational_reference(s, t, anchors, labels, positives, index)
    (g_want,) = torch.autograd.grad(want, s)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-8)
    assert got > 0
    assert relational_loss(s, t, anchors, labels, torch.zeros(B, A, dtype=torch.bool), index) == 0


@pytest.mark.parametrize("shape", [(4, 16, 10, 10), (2, 8, 1, 1), (1, 4, 1, 1)])
def test_channel_standardisation_is_the_floored_std_formula(shape):
    """The standardisation computed from one centred map equals the definition with torch.std (Bessel-corrected per
    channel where a channel has more than one element, floored at STD_FLOOR of the whole map's population std), in
    value and gradient, with a constant channel's gradient finite."""
    from detq_hooks.distill import STD_FLOOR, _channel_standardize

    def definition(f, eps=1e-6):
        flat = f.transpose(0, 1).reshape(f.shape[1], -1)
        std = flat.std(1, keepdim=True, correction=1 if flat.shape[1] > 1 else 0)
        std = torch.maximum(std, STD_FLOOR * flat.std(correction=0))
        return (flat - flat.mean(1, keepdim=True)) / (std + eps)

    torch.manual_seed(0)
    f = torch.randn(*shape) * 3 + 1
    f[:, 0] = 0.7  # constant channel: the floor holds
    target = torch.randn(shape[1], f.numel() // shape[1])
    a, b = f.clone().requires_grad_(), f.clone().requires_grad_()
    out_a, out_b = _channel_standardize(a), definition(b)
    torch.testing.assert_close(out_a, out_b, rtol=1e-5, atol=1e-5)
    torch.nn.functional.mse_loss(out_a, target).backward()
    torch.nn.functional.mse_loss(out_b, target).backward()
    assert torch.isfinite(a.grad).all()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


class _FoldCases(torch.nn.Module):
    """One conv→BN pair of each kind the teacher's folding must tell apart."""

    def __init__(self):
        from torchvision.ops.misc import FrozenBatchNorm2d

        super().__init__()
        nn = torch.nn
        self.plain, self.plain_bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)  # folds
        self.residual, self.residual_bn = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)  # output read twice
        self.frozen, self.frozen_bn = nn.Conv2d(8, 8, 1), FrozenBatchNorm2d(8)  # torchvision's: folds
        self.batch_stats, self.batch_stats_bn = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8, track_running_stats=False)
        self.shared, self.shared_bn = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)  # called twice, same BN each time: folds
        self.tapped, self.tapped_bn = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)  # its output is read by a hook (keep)
        self.two_norms, self.norm_a, self.norm_b = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.BatchNorm2d(8)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d) and m.track_running_stats:
                    m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.3, 3.0)
                    m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.3, 0.3)
            self.frozen_bn.running_mean.uniform_(-0.5, 0.5), self.frozen_bn.running_var.uniform_(0.3, 3.0)
            self.frozen_bn.weight.uniform_(0.5, 1.5), self.frozen_bn.bias.uniform_(-0.3, 0.3)

    def forward(self, x):
        x = torch.relu(self.plain_bn(self.plain(x)))
        r = self.residual(x)
        x = torch.relu(self.residual_bn(r) + r)
        x = self.frozen_bn(self.frozen(x))
        x = self.batch_stats_bn(self.batch_stats(x))
        x = self.shared_bn(self.shared(x))
        x = self.shared_bn(self.shared(x))
        x = self.tapped_bn(self.tapped(x))
        t = self.two_norms(x)
        return self.norm_a(t) + self.norm_b(t)


def test_teacher_folds_exactly_the_batchnorms_that_only_read_a_conv():
    """The distillation teacher runs a copy with eval BatchNorms folded into their convs (channels-last on CPU):
    only pairs where nothing else reads the conv's output and the BN uses running statistics, not a conv a hook
    reads; the copy computes what the teacher computes (to float rounding), shares the other tensors, keeps every
    module name, and is rebuilt when the teacher's weights change."""
    from detq_hooks.distill import Teacher, conv_batchnorm_pairs

    torch.manual_seed(0)
    model, x = _FoldCases().eval(), torch.randn(2, 3, 12, 12)
    assert conv_batchnorm_pairs(model, lambda m: m(x), keep=["tapped"]) == [
        ("plain", "plain_bn"), ("frozen", "frozen_bn"), ("shared", "shared_bn")]
    teacher = Teacher.from_model(model)
    fast = teacher.inference_module(lambda m: m(x), keep=["tapped"])
    assert fast is not teacher.module and isinstance(fast.plain_bn, torch.nn.Identity)
    assert isinstance(fast.tapped_bn, torch.nn.BatchNorm2d) and isinstance(fast.residual_bn, torch.nn.BatchNorm2d)
    assert fast.plain.weight.is_contiguous(memory_format=torch.channels_last)
    assert fast.residual.weight.data_ptr() == teacher.module.residual.weight.data_ptr()  # shared, not copied
    assert set(dict(fast.named_modules())) == set(dict(teacher.module.named_modules()))
    expected = teacher(x)
    torch.testing.assert_close(teacher.run(lambda m: m(x), fast), expected, rtol=1e-5, atol=1e-5)
    assert teacher.inference_module(lambda m: m(x), keep=["tapped"]) is fast  # cached while the weights stay
    assert all(not isinstance(m, torch.nn.Identity) for m in teacher.module.modules())  # the teacher as given

    state = {k: v.clone() for k, v in teacher.state_dict().items()}
    state["plain_bn.running_var"] *= 4
    teacher.load_state_dict(state)
    rebuilt = teacher.inference_module(lambda m: m(x), keep=["tapped"])
    assert rebuilt is not fast
    torch.testing.assert_close(teacher.run(lambda m: m(x), rebuilt), teacher(x), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        teacher.module.frozen_bn.bias.add_(1.0)  # written in place, not through load_state_dict
    torch.testing.assert_close(teacher.run(lambda m: m(x), teacher.inference_module(lambda m: m(x), keep=["tapped"])),
                               teacher(x), rtol=1e-5, atol=1e-5)


def test_plain_teacher_switch_runs_the_teacher_as_given(monkeypatch):
    import detq_hooks.distill as distill

    model, x = _FoldCases().eval(), torch.randn(2, 3, 12, 12)
    teacher = distill.Teacher.from_model(model)
    monkeypatch.setattr(distill, "_FAST_TEACHER", False)  # DETQ_PLAIN_TEACHER=1
    assert teacher.inference_module(lambda m: m(x)) is teacher.module


def test_half_precision_teacher_runs_under_autocast_and_gives_the_same_loss_to_its_rounding():
    """`distillation.teacher_precision: bfloat16` runs the teacher's forward under autocast: its features come
    out in bf16 and the distillation loss stays within bf16 rounding of the float32 teacher's."""
    losses = {}
    for precision in ("float32", "bfloat16"):
        torch.manual_seed(0)
        module, session, batch = _point_detector_session(teacher_precision=precision)
        assert session.teacher.precision == precision
        session.start_training(module, progress=1.0)  # the last stage: every feature and head term
        module.train()
        module(batch[0])
        read, head_outputs = [], session.family.head_outputs
        session.family.head_outputs = lambda m, rec, b: read.append(rec) or head_outputs(m, rec, b)
        losses[precision] = session.loss_terms(module, batch)["distill"].item()
        # the teacher's recorded outputs reach the family's decoding in float32 (rounded once to bf16)
        assert {t.dtype for rec in read for outs in rec.outputs.values() for t in outs if torch.is_tensor(t)} == {torch.float32}
        with record(session.teacher.module, Taps(outputs=["detector.backbone"])) as seen:
            session.teacher(batch[0])
        assert seen.output("detector.backbone").dtype == getattr(torch, precision)
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=2e-2) and losses["bfloat16"] != losses["float32"]


def test_teacher_runs_ahead_in_a_worker_thread_where_a_core_is_idle(monkeypatch):
    """With a core the trainer leaves idle (Ultralytics runs cores − 1 threads), `batch_ready` starts the
    teacher's forward in a worker thread before the student's forward; the loss call takes that result, the same
    loss bit for bit as the teacher run in the loss call. A prefetch for another batch is dropped."""
    import os
    import threading

    import detq_hooks.loss_terms as loss_terms

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two cores")
    module, session, batch = _point_detector_session()
    ran_in = []
    session.teacher.module.register_forward_hook(lambda *a: ran_in.append(threading.current_thread().name))
    session.start_training(module, progress=1.0)
    module.train()
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # as Ultralytics on two cores: one core idle
    session.batch_ready(batch)  # the first step traces the teacher: nothing runs ahead yet
    module(batch[0])
    session.loss_terms(module, batch)
    assert ran_in == ["MainThread", "MainThread"]  # the trace, then the pass

    ran_in.clear()
    session.batch_ready(batch)
    module(batch[0])
    ahead = session.loss_terms(module, batch)["distill"]
    assert len(ran_in) == 1 and ran_in[0].startswith("detq-teacher")
    monkeypatch.setattr(loss_terms, "_TEACHER_THREAD", False)  # DETQ_TEACHER_THREAD=0
    ran_in.clear()
    session.batch_ready(batch)
    module(batch[0])
    assert torch.equal(session.loss_terms(module, batch)["distill"], ahead) and ran_in == ["MainThread"]

    monkeypatch.setattr(loss_terms, "_TEACHER_THREAD", True)
    other = (batch[0].clone(), batch[1])  # another batch: its prefetched pass is not this step's
    ran_in.clear()
    session.batch_ready(other)
    module(batch[0])
    assert torch.equal(session.loss_terms(module, batch)["distill"], ahead)
    assert ran_in[0].startswith("detq-teacher") and ran_in[1:] == ["MainThread"]
    session.batch_ready(batch)
    session.end_training(module)  # waits for the pass nobody takes and ends the worker
    term = next(t for t in session.terms if isinstance(t, loss_terms.DistillationTerm))
    assert term._pending is None and term._worker is None
