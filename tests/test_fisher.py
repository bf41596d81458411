"""Fisher-aware quantization core (issue 12, part 1): the critical-category objective, critical mAP, Fisher and
Hutchinson traces (and their DDP reduction), the exact mixed-precision program, and the Fisher-trace
regulariser's Hessian-vector-product gradient. Tiny models only."""

import copy
import itertools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import detq_hooks as dq
from detq_hooks import fisher
from detq_hooks.checkpoint import layer_plan
from detq_hooks.evaluation import coco_evaluate
from detq_hooks.fisher import FisherError, FisherRegularizer
from detq_hooks.fisher_report import ap_drop_table, bits_table, save_ap_drop_plot, save_bits_plot
from detq_hooks.loss_terms import StepContext
from detq_hooks.quantizers import quantizer_mode
from detq_hooks.ranges import calibrate_weight_quantizer
from detq_hooks.recipe import RecipeError, load_recipe
from detq_hooks.session import QuantSession
from detq_hooks.surgery import quantized_layers, set_quantization_enabled

from core_models import TinyDetector


def mlp(seed=0, quantize="w4a8", act=nn.Tanh):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 16), act(), nn.Linear(16, 16), act(), nn.Linear(16, 2))
    if not quantize:
        return net
    dq.quantize(net, quantize)
    with torch.no_grad():  # activation ranges from one batch (what calibration would do)
        net(torch.randn(32, 4, generator=torch.Generator().manual_seed(99)))
    return net


def data(n=3, seed=0, batch=8):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 4, generator=g), torch.randn(batch, 2, generator=g)) for _ in range(n)]


def mse(model, batch):
    x, y = batch
    return (model(x) - y).pow(2).mean()


def ctx_for(model, batch):
    return StepContext(model=model, batch=batch, recorded=None)


# ------------------------------------------------------------------------------------------------ recipe
def test_fisher_presets_and_sections():
    r = load_recipe("w4a4-fisher")
    assert r.mixed_precision.enabled and r.mixed_precision.budget == {"avg_weight_bits": 4.0}
    assert r.mixed_precision.candidates == [2, 4, 8] and r.fisher_regularizer.enabled
    assert r.fisher_regularizer.every == 12  # amortised cost near 1.25x plain QAT
    assert (r.quantization.weight.bits, r.quantization.activation.bits) == (4, 4)
    assert load_recipe("w4a8-fisher").quantization.activation.bits == 8
    # Mixed precision lives in the saved per-layer plan, not in the fingerprint.
    assert load_recipe("w4a8-fisher").fingerprint() == load_recipe("w4a8").fingerprint()
    # Old recipes load unchanged, with the new sections off.
    old = load_recipe({"preset": "w4a8", "calibration": {"num_batches": 2}})
    assert not old.mixed_precision.enabled and not old.fisher_regularizer.enabled and old.critical.classes == []
    assert load_recipe(r.to_dict()) == r


@pytest.mark.parametrize("bad, match", [
    ({"mixed_precision": {"candidates": [2, 4, 9]}}, r"`mixed_precision.candidates` = 9 is out of range"),
    ({"mixed_precision": {"candidates": [1, 4]}}, r"`mixed_precision.candidates` = 1 is out of range"),
    ({"mixed_precision": {"enabled": True}}, r"`mixed_precision.budget` is missing"),
    ({"mixed_precision": {"budget": {"avg_bits": 4}}}, r"`mixed_precision.budget` = \{'avg_bits': 4\} must hold exactly one"),
    ({"mixed_precision": {"budget": {"bops_ratio": 1.5}}}, r"`mixed_precision.budget.bops_ratio` = 1.5"),
    ({"mixed_precision": {"objective": "crit"}}, r"`mixed_precision.objective` = 'crit'"),
    ({"critical": {"classes": ["car", "car"]}}, r"`critical.classes` names 'car' twice"),
    ({"critical": {"merge": "sum"}}, r"`critical.merge` = 'sum'"),
    ({"fisher_regularizer": {"hvp": "exact"}}, r"`fisher_regularizer.hvp` = 'exact'"),
    ({"fisher_regularizer": {"every": 0}}, r"`fisher_regularizer.every` = 0"),
    ({"fisher_regularizer": {"max_share": 0}}, r"`fisher_regularizer.max_share` = 0 must be a number > 0"),
    ({"fisher_regularizer": {"max_share": "1"}}, r"`fisher_regularizer.max_share` = '1' must be a number"),
    ({"mode": "ptq", "fisher_regularizer": {"enabled": True}}, r"`fisher_regularizer.enabled` needs `mode: qat`"),
])
def test_fisher_recipe_errors_name_field_and_value(bad, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe({"preset": "w4a8", **bad})


# ------------------------------------------------------------------------------------------------ critical objective
def test_softmax_transform_keeps_probability_mass():
    torch.manual_seed(0)
    z = torch.randn(2, 5, 7) * 3  # 6 object classes + no-object (last)
    crit = [1, 4]
    out = fisher.critical_logits(z, crit, "softmax", no_object=-1)
    assert out.shape == (2, 5, 4)
    p, q = z.softmax(-1), out.softmax(-1)
    torch.testing.assert_close(q[..., :2], p[..., crit])
    torch.testing.assert_close(q[..., 2], p[..., [0, 2, 3, 5]].sum(-1))  # "other": the non-critical mass
    torch.testing.assert_close(q[..., 3], p[..., 6])  # no-object kept
    torch.testing.assert_close(q.sum(-1), torch.ones(2, 5))
    mx = fisher.critical_logits(z, crit, "softmax", merge="max", no_object=-1)
    torch.testing.assert_close(mx[..., 2], z[..., [0, 2, 3, 5]].amax(-1))
    # integer labels: critical -> position, non-critical -> other, no-object -> last
    labels = torch.tensor([1, 4, 0, 6, 5])
    assert fisher.critical_targets(labels, crit, "softmax", num_classes=7, no_object=-1).tolist() == [0, 1, 2, 3, 2]
    onehot = torch.nn.functional.one_hot(labels, 7).float()
    torch.testing.assert_close(fisher.critical_targets(onehot, crit, "softmax", no_object=-1).argmax(-1),
                               torch.tensor([0, 1, 2, 3, 2]))


def test_sigmoid_transform_matches_definition():
    torch.manual_seed(1)
    z = torch.randn(3, 10, 5)
    t = torch.rand(3, 10, 5)
    crit = [0, 3]
    out = fisher.critical_logits(z, crit, "sigmoid")
    torch.testing.assert_close(out[..., :2], z[..., crit])
    torch.testing.assert_close(out[..., 2].sigmoid(), z[..., [1, 2, 4]].sigmoid().amax(-1))
    tt = fisher.critical_targets(t, crit, "sigmoid")
    torch.testing.assert_close(tt[..., 2], t[..., [1, 2, 4]].amax(-1))
    assert fisher.critical_box_mask(torch.tensor([0, 1, 3, 4]), crit).tolist() == [True, False, True, False]
    with pytest.raises(FisherError, match=r"critical class ids \[7\]"):
        fisher.critical_logits(z, [7], "sigmoid")


def test_resolve_critical_classes():
    names = ["person", "car", "dog"]
    assert fisher.resolve_critical_classes(["dog", 0], names) == [0, 2]
    assert fisher.resolve_critical_classes(["car"], {0: "person", 1: "car", 2: "dog"}) == [1]  # Ultralytics names
    assert fisher.resolve_critical_classes([], names) == [0, 1, 2]
    with pytest.raises(FisherError, match=r"'cat', which is not a class of the data set; known classes: \['person', 'car', 'dog'\]"):
        fisher.resolve_critical_classes(["cat"], names)
    with pytest.raises(FisherError, match=r"index 3 is out of range"):
        fisher.resolve_critical_classes([3], names)
    with pytest.raises(FisherError, match=r"names 'dog' but the trainer gives no class names"):
        fisher.resolve_critical_classes(["dog"], None)


# ------------------------------------------------------------------------------------------------ critical mAP
def _coco_case():
    cats = [{"id": i, "name": n} for i, n in ((1, "person"), (2, "car"), (3, "dog"))]
    images = [{"id": i, "width": 100, "height": 100, "file_name": f"{i}.jpg"} for i in (1, 2)]
    anns, dets, k = [], [], 0
    g = np.random.default_rng(0)
    for img in (1, 2):
        for cat in (1, 2, 3):
            for _ in range(2):
                x, y = g.uniform(0, 60, 2)
                k += 1
                anns.append({"id": k, "image_id": img, "category_id": cat, "bbox": [x, y, 30, 30], "area": 900.0, "iscrowd": 0})
                shift = g.uniform(-6, 6, 2) * cat  # dogs localised worst
                dets.append({"image_id": img, "category_id": cat, "bbox": [x + shift[0], y + shift[1], 30, 30],
                             "score": float(g.uniform(0.3, 1.0))})
    return {"images": images, "annotations": anns, "categories": cats}, dets


def test_critical_map_equals_pycocotools_by_hand():
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt, dets = _coco_case()
    res = coco_evaluate(gt, dets, critical_category_ids=[2, 3])
    coco = COCO()
    coco.dataset = copy.deepcopy(gt)
    coco.createIndex()
    ev = COCOeval(coco, coco.loadRes(copy.deepcopy(dets)), "bbox")
    ev.params.catIds = [2, 3]
    ev.evaluate(), ev.accumulate(), ev.summarize()
    assert res.critical_map50_95 == pytest.approx(ev.stats[0], abs=1e-12)
    assert res.critical_map50 == pytest.approx(ev.stats[1], abs=1e-12)
    assert res.critical_categories == ["car", "dog"]
    assert res.map50_95 == pytest.approx(coco_evaluate(gt, dets).map50_95, abs=1e-12)
    assert res.critical_map50_95 != pytest.approx(res.map50_95)  # the restriction matters in this case
    with pytest.raises(ValueError, match=r"`critical_category_ids` \[9\]"):
        coco_evaluate(gt, dets, critical_category_ids=[9])


def test_ap_drop_table_and_plot(tmp_path):
    gt, dets = _coco_case()
    float_res = coco_evaluate(gt, dets)
    worse = [dict(d, bbox=[d["bbox"][0] + 8, d["bbox"][1], 30, 30]) if d["category_id"] == 1 else d for d in dets]
    quant_res = coco_evaluate(gt, worse)
    rows = ap_drop_table(float_res, quant_res, critical=["person"])
    assert rows[0].category == "person" and rows[0].critical and rows[0].drop > 0.1
    assert rows[0].drop == pytest.approx(float_res.per_category["person"] - quant_res.per_category["person"])
    assert {r.drop for r in rows[1:]} == {0.0}
    assert save_ap_drop_plot(rows, tmp_path / "ap_drop.png").stat().st_size > 1000


# ------------------------------------------------------------------------------------------------ traces
def test_fisher_traces_match_hand_computation_and_leave_the_model_alone():
    net = mlp()
    batches = data()
    before = copy.deepcopy(net.state_dict())
    traces = fisher.fisher_traces(net, batches, mse)
    layers = quantized_layers(net)
    sums = {n: 0.0 for n, _ in layers}
    ref = copy.deepcopy(net).eval()
    for b in batches:
        ref.zero_grad()
        mse(ref, b).backward()
        for n, m in quantized_layers(ref):
            sums[n] += m.weight.grad.pow(2).sum().item()
    expected = {n: s / len(batches) for n, s in sums.items()}
    assert traces.keys() == expected.keys()
    for n in traces:
        assert traces[n] == pytest.approx(expected[n], rel=1e-5)
    assert all(v > 0 for v in traces.values())
    assert all(p.grad is None for p in net.parameters())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert fisher.fisher_traces(net, batches, mse, num_batches=1)["0"] == pytest.approx(
        fisher.fisher_traces(net, batches[:1], mse)["0"])


def test_hutchinson_trace_is_exact_for_a_diagonal_hessian():
    torch.manual_seed(0)
    net = dq.quantize(nn.Sequential(nn.Linear(3, 2, bias=False)), {"preset": "w8a8", "quantization": {"first_layer_bits": None, "prediction_layer_bits": None}})
    set_quantization_enabled(net, weights=False, activations=False)  # plain maths: H = I_out ⊗ XᵀX/B
    x = torch.diag(torch.tensor([1.0, 2.0, 3.0]))  # XᵀX diagonal: vᵀHv = tr H for every Rademacher v
    tr = fisher.hutchinson_traces(net, [x], lambda m, b: 0.5 * m(b).pow(2).sum(1).mean(), samples=3)
    assert tr["0"] == pytest.approx(2 * (1 + 4 + 9) / 3, rel=1e-6)


def test_fisher_on_a_float_model_is_refused():
    with pytest.raises(FisherError, match=r"Sequential has no quantized layer"):
        fisher.fisher_traces(mlp(quantize=None), data(), mse)
    with pytest.raises(FisherError, match=r"no quantized layer"):
        FisherRegularizer(lambda ctx: mse(ctx.model, ctx.batch)).check(mlp(quantize=None))


DDP_SCRIPT = r"""
import json, os, sys, torch, torch.distributed as dist
sys.path.insert(0, os.environ["TESTS_DIR"])
from test_fisher import mlp, data, mse
from detq_hooks import fisher
dist.init_process_group("gloo")
rank = dist.get_rank()
try:
    net = mlp()
    batches = data(4, seed=0)[2 * rank: 2 * rank + 2]  # each rank sees different batches
    traces = fisher.fisher_traces(net, batches, mse)
    hutch = fisher.hutchinson_traces(net, batches, mse, seed=rank)
    with open(os.path.join(os.environ["OUT"], f"rank{rank}.json"), "w") as f:
        json.dump({"fisher": traces, "hutchinson": hutch}, f)
finally:
    dist.destroy_process_group()
"""


@pytest.mark.ddp
def test_ddp_fisher_estimate_identical_on_both_ranks(tmp_path):
    import json

    script = tmp_path / "fisher_ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "TESTS_DIR": str(Path(__file__).parent), "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv-backend=c10d",
                    "--rdzv-endpoint=localhost:0", str(script)], check=True, env=env, timeout=240)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1  # bit-identical on both ranks
    single = fisher.fisher_traces(mlp(), data(4, seed=0), mse)  # the mean over all four batches
    for n, v in single.items():
        assert r0["fisher"][n] == pytest.approx(v, rel=1e-6)


# ------------------------------------------------------------------------------------------------ mixed precision
# A case where the greedy "best Ω reduction per extra bit" allocation is suboptimal (found by exhaustive search).
SIZES = {"a": 2, "b": 2, "c": 1}
OMEGA = {"a": {2: 8.2, 4: 4.0, 8: 0.5}, "b": {2: 16.0, 4: 2.0, 8: 0.5}, "c": {2: 8.0, 4: 6.0, 8: 0.5}}


def greedy(omega, sizes, cap, cands=(2, 4, 8)):
    bits = {n: cands[0] for n in sizes}
    while True:
        used = sum(sizes[n] * bits[n] for n in sizes)
        options = []
        for n in sizes:
            i = cands.index(bits[n])
            if i + 1 < len(cands) and used + sizes[n] * (cands[i + 1] - bits[n]) <= cap:
                nb = cands[i + 1]
                options.append(((omega[n][bits[n]] - omega[n][nb]) / (sizes[n] * (nb - bits[n])), n, nb))
        if not options:
            return bits
        _, n, nb = max(options)
        bits[n] = nb


def total(omega, bits):
    return sum(omega[n][b] for n, b in bits.items() if n in omega)


def test_ilp_is_exact_meets_the_budget_and_beats_greedy_and_uniform():
    alloc = fisher.allocate_bits(OMEGA, SIZES, [2, 4, 8], {"avg_weight_bits": 4.0})
    brute = min((dict(zip(SIZES, bb)) for bb in itertools.product([2, 4, 8], repeat=3)
                 if sum(SIZES[n] * b for n, b in zip(SIZES, bb)) <= 4 * 5), key=lambda b: total(OMEGA, b))
    assert alloc.bits == brute == {"a": 2, "b": 4, "c": 8}
    assert alloc.objective == pytest.approx(10.7)
    assert alloc.used == 4.0  # the budget met exactly: (2·2 + 2·4 + 1·8) / 5
    g = greedy(OMEGA, SIZES, 20)
    assert g == {"a": 4, "b": 4, "c": 4}  # b first (3.5 per bit), then a (1.05), then c (1.0): budget spent
    assert total(OMEGA, g) == 12.0 > alloc.objective
    assert total(OMEGA, {n: 4 for n in SIZES}) == 12.0 > alloc.objective


def test_ilp_counts_pinned_layers_and_other_budgets():
    sizes = {**SIZES, "first": 5}
    alloc = fisher.allocate_bits(OMEGA, sizes, [2, 4, 8], {"avg_weight_bits": 5.0}, {"first": 8})
    assert alloc.bits["first"] == 8
    used_bits = sum(sizes[n] * b for n, b in alloc.bits.items())
    assert used_bits <= 5.0 * 10 and alloc.used == used_bits / 10
    brute = min((dict(zip(SIZES, bb)) for bb in itertools.product([2, 4, 8], repeat=3)
                 if 40 + sum(SIZES[n] * b for n, b in zip(SIZES, bb)) <= 50), key=lambda b: total(OMEGA, b))
    assert total(OMEGA, alloc.bits) == total(OMEGA, brute)
    # size: 10 elements of fixed float data + weights; 1 MB = 8e6 bits
    big = {n: s * 1_000_000 for n, s in SIZES.items()}
    a = fisher.allocate_bits(OMEGA, big, [2, 4, 8], {"size_mb": 2.5}, fixed_bits=0)
    assert sum(big[n] * b for n, b in a.bits.items()) <= 2.5 * 8e6 and a.bits == {"a": 2, "b": 4, "c": 8}
    # BOPs relative to every weight at 8 bits
    macs = {"a": 10, "b": 10, "c": 5}
    a = fisher.allocate_bits(OMEGA, SIZES, [2, 4, 8], {"bops_ratio": 0.5}, macs=macs)
    assert sum(macs[n] * b for n, b in a.bits.items()) <= 0.5 * 8 * 25 and a.objective == pytest.approx(10.7)


def test_infeasible_budget_names_the_smallest_feasible_one():
    sizes = {**SIZES, "first": 5}
    # smallest: (5·8 + 5·2) / 10 = 5.0
    with pytest.raises(FisherError, match=r"`mixed_precision.budget.avg_weight_bits` = 4 cannot be met: with candidates "
                                          r"\[2, 4, 8\] and 1 pinned layer\(s\) at \[8\] bits the smallest feasible budget "
                                          r"is avg_weight_bits = 5\b"):
        fisher.allocate_bits(OMEGA, sizes, [2, 4, 8], {"avg_weight_bits": 4.0}, {"first": 8})
    with pytest.raises(FisherError, match=r"`mixed_precision.candidates` = 9 is out of range"):
        fisher.allocate_bits(OMEGA, SIZES, [2, 4, 9], {"avg_weight_bits": 4.0})


def test_quantization_error_refits_the_range_for_each_width():
    net = mlp()
    layer = net[2]
    before = copy.deepcopy(layer.weight_quantizer.state_dict())
    errs = {b: fisher.quantization_error(layer, b) for b in (2, 4, 8)}
    assert errs[2] > errs[4] > errs[8] > 0
    q = copy.deepcopy(layer.weight_quantizer)
    q.bits = 2
    calibrate_weight_quantizer(q, layer.weight, "mse", 2.4)
    assert errs[2] == pytest.approx((q(layer.weight) - layer.weight).pow(2).sum().item(), rel=1e-6)
    assert all(torch.equal(before[k], v) for k, v in layer.weight_quantizer.state_dict().items())


def test_mixed_precision_on_a_converted_model_survives_the_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = TinyDetector()
    loss = lambda m, b: sum(o.pow(2).mean() for o in m(b))
    session = QuantSession("w4a8-fisher", critical_loss=loss)
    session.convert(model)
    x = [torch.randn(2, 3, 32, 32) for _ in range(2)]
    traces = fisher.fisher_traces(model, x, loss)
    plan = fisher.plan_mixed_precision(model, traces, budget={"avg_weight_bits": 4.0})
    roles = {n: m.detq_layer_role for n, m in quantized_layers(model)}
    assert {n for n, r in roles.items() if r != "body"} == set(plan.pinned) and set(plan.pinned.values()) == {8}
    fisher.apply_bits(model, plan.allocation)
    assert fisher.average_weight_bits(model) == pytest.approx(plan.used) and plan.used <= 4.0
    assert len({b for n, b in plan.allocation.items() if n not in plan.pinned}) > 1  # really mixed
    assert plan.objective <= plan.uniform_objective[4]
    for n, m in quantized_layers(model):  # ranges re-fitted for the new widths
        q = copy.deepcopy(m.weight_quantizer)
        calibrate_weight_quantizer(q, m.weight, "mse", 2.4)
        torch.testing.assert_close(q.scale, m.weight_quantizer.scale)
    state, weights = session.state(model), model.state_dict()
    torch.manual_seed(1)
    fresh = TinyDetector()
    other = QuantSession("w4a8-fisher", critical_loss=loss)
    other.restore(fresh, state)
    fresh.load_state_dict(weights, strict=True)
    assert {n: v["weight_bits"] for n, v in layer_plan(fresh).items()} == plan.allocation
    rows = bits_table(plan)
    assert [r.bits for r in rows] == list(plan.allocation.values()) and rows[0].pinned
    assert save_bits_plot(plan, tmp_path / "bits.png").stat().st_size > 1000


def test_all_zero_traces_spend_the_budget_by_quantization_error_and_warn():
    """No layer reached by the objective (a random SSDlite's untrained BatchNorms zero it): every allocation ties,
    so the plan must not be the narrowest bits with the budget unspent, and the user is told."""
    torch.manual_seed(0)
    model = TinyDetector()
    QuantSession("w4a8-fisher", critical_loss=lambda m, b: m(b)[0].sum()).convert(model)
    traces = {n: 0.0 for n, _ in quantized_layers(model)}
    with pytest.warns(UserWarning, match=r"every free layer's Fisher trace is 0.*quantization error alone"):
        plan = fisher.plan_mixed_precision(model, traces, budget={"avg_weight_bits": 4.0})
    uniform = fisher.plan_mixed_precision(model, {n: 1.0 for n in traces}, budget={"avg_weight_bits": 4.0})
    assert plan.allocation == uniform.allocation  # equal weights: least quantization error within the budget
    assert 3.8 < plan.used <= 4.0  # the free layers can come no closer to 4.0 here


def test_apply_bits_is_all_or_nothing():
    net = mlp()
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(FisherError, match=r"names 'nope', which is not a quantized layer"):
        fisher.apply_bits(net, {"2": 2, "nope": 4})
    with pytest.raises(FisherError, match=r"`allocation\['2'\]` = 9 is out of range"):
        fisher.apply_bits(net, {"0": 2, "2": 9})
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    with pytest.raises(FisherError, match=r"no quantized layer"):
        fisher.plan_mixed_precision(mlp(quantize=None), {}, budget={"avg_weight_bits": 4.0})


# ------------------------------------------------------------------------------------------------ regulariser
def _grads_of(term, model, batch):
    model.zero_grad()
    term(ctx_for(model, batch))[term.name].backward()
    return [m.weight.grad.clone() for _, m in quantized_layers(model)]


def test_regulariser_gradient_is_the_hessian_vector_product():
    # Float64 maths with the quantizers off: the gradient of ‖∇L‖² checked by central differences of the value.
    net = mlp(quantize="w8a8").double()
    set_quantization_enabled(net, weights=False, activations=False)
    batch = tuple(t.double() for t in data(1)[0])
    loss = lambda ctx: mse(ctx.model, ctx.batch)
    double = FisherRegularizer(loss, weight=1.0, hvp="double")
    fd = FisherRegularizer(loss, weight=1.0, hvp="finite_difference", epsilon=1e-6)
    g_double, g_fd = _grads_of(double, net, batch), _grads_of(fd, net, batch)
    weights = [m.weight for _, m in quantized_layers(net)]
    torch.manual_seed(3)
    d = [torch.randn_like(w) for w in weights]
    h = 1e-5

    def value_at(sign):
        with torch.no_grad():
            for w, di in zip(weights, d):
                w.add_(sign * h * di)
        v = double.trace(ctx_for(net, batch)).item()
        with torch.no_grad():
            for w, di in zip(weights, d):
                w.sub_(sign * h * di)
        return v

    numeric = (value_at(1) - value_at(-1)) / (2 * h)
    analytic = sum((g * di).sum().item() for g, di in zip(g_double, d))
    assert analytic == pytest.approx(numeric, rel=1e-6)
    for a, b in zip(g_double, g_fd):
        # a one-sided difference: error O(ε) relative to the gradient's scale
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * a.abs().max().item())
    assert double.method == "double" and fd.method == "finite_difference"


def test_regulariser_through_the_straight_through_estimator():
    net = mlp()
    batch = data(1)[0]
    loss = lambda ctx: mse(ctx.model, ctx.batch)
    g_double = _grads_of(FisherRegularizer(loss, weight=1.0, hvp="double"), net, batch)
    g_fd = _grads_of(FisherRegularizer(loss, weight=1.0, hvp="finite_difference", epsilon=1e-4), net, batch)
    a, b = torch.cat([g.flatten() for g in g_double]), torch.cat([g.flatten() for g in g_fd])
    assert a.norm() > 0 and torch.nn.functional.cosine_similarity(a, b, 0) > 0.99


def test_auto_falls_back_to_finite_difference_for_ops_without_double_backward():
    class OnceDifferentiable(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return torch.tanh(x)

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * (1 - torch.tanh(x) ** 2)

    net = mlp()
    batch = data(1)[0]
    term = FisherRegularizer(lambda ctx: OnceDifferentiable.apply(ctx.model(ctx.batch[0])).pow(2).mean(), weight=1.0)
    grads = _grads_of(term, net, batch)
    assert term.method == "finite_difference" and sum(g.norm() for g in grads) > 0


def test_regulariser_schedule_every_k_and_warmup():
    net = mlp()
    batch = data(1)[0]
    term = FisherRegularizer(lambda ctx: mse(ctx.model, ctx.batch), weight=2.0, every=2, warmup=0.5)
    term.set_progress(0.25)
    first = term(ctx_for(net, batch))["fisher_reg"]
    assert first.item() == pytest.approx(1.0 * term.last_trace, rel=1e-6)  # λ half-way through the warm-up
    skipped = term(ctx_for(net, batch))["fisher_reg"]
    assert skipped.item() == 0.0 and not skipped.requires_grad
    term.set_progress(0.9)
    assert term(ctx_for(net, batch))["fisher_reg"].item() == pytest.approx(2.0 * term.last_trace, rel=1e-6)


@pytest.mark.parametrize("hvp", ["double", "finite_difference"])
def test_regulariser_cap_scales_penalty_and_gradient_to_the_task_loss(hvp):
    net = mlp()
    batch = data(1)[0]
    loss = lambda ctx: mse(ctx.model, ctx.batch)

    def step(max_share, task_loss):
        term = FisherRegularizer(loss, weight=50.0, hvp=hvp, max_share=max_share)
        net.zero_grad()
        ctx = StepContext(model=net, batch=batch, recorded=None, task_loss=task_loss)
        value = term(ctx)["fisher_reg"]
        value.backward()
        return term, ctx, value.item(), torch.cat([m.weight.grad.flatten() for _, m in quantized_layers(net)])

    raw, _, raw_value, raw_grad = step(None, 0.2)
    assert raw_value == pytest.approx(50.0 * raw.last_trace, rel=1e-6) and raw_value > 0.2 and raw.last_scale == 1.0
    # above the cap: the penalty is max_share x the task loss, the gradient scaled by the same factor
    capped, ctx, value, grad = step(0.5, 0.2)
    assert value == pytest.approx(0.1, rel=1e-6) and capped.last_task_loss == 0.2
    assert capped.last_scale == pytest.approx(0.1 / raw_value, rel=1e-6)
    assert ctx.logs["fisher_reg_scale"] == capped.last_scale
    torch.testing.assert_close(grad, raw_grad * capped.last_scale, rtol=1e-5, atol=1e-9)
    # below the cap: exactly the uncapped term
    loose, _, value, grad = step(1e6, 0.2)
    assert loose.last_scale == 1.0 and value == raw_value and torch.equal(grad, raw_grad)
    # no task loss from the trainer: the critical loss of the batch is the yardstick
    bare, _, value, _ = step(0.5, None)
    assert bare.last_loss == pytest.approx(mse(net, batch).item(), rel=1e-5)
    assert value == pytest.approx(0.5 * bare.last_loss, rel=1e-5)


def test_session_passes_the_task_loss_to_the_terms():
    assert load_recipe("w4a4-fisher").fisher_regularizer.max_share == 1.0  # the presets' default cap
    net, session = session_mlp({"preset": "w4a8", "fisher_regularizer": {"enabled": True, "weight": 50.0,
                                                                         "warmup": 0.0, "max_share": 0.5}})
    term = session.add_fisher_regularizer(net, lambda ctx: mse(ctx.model, ctx.batch))
    session.start_training(net)
    terms = session.loss_terms(net, data(1)[0], task_loss=torch.tensor([0.1, 0.3]))  # a loss vector is summed
    assert term.last_task_loss == pytest.approx(0.4) and terms["fisher_reg"].item() == pytest.approx(0.2, rel=1e-6)
    assert session.last_terms["fisher_reg_scale"] < 1.0


def test_regulariser_changes_the_weights_and_lowers_the_trace():
    batches = data(4, seed=1, batch=16)

    def train(weight):
        net = mlp(seed=0)
        for _, m in quantized_layers(net):
            m.weight_quantizer.enabled = True
        opt = torch.optim.SGD([m.weight for _, m in quantized_layers(net)], lr=0.05)
        term = FisherRegularizer(lambda ctx: mse(ctx.model, ctx.batch), weight=weight, hvp="auto")
        for step in range(30):
            b = batches[step % len(batches)]
            loss = mse(net, b) + term(ctx_for(net, b))["fisher_reg"]
            opt.zero_grad()
            loss.backward()
            opt.step()
        return net

    start = sum(fisher.fisher_traces(mlp(seed=0), batches, mse).values())
    plain, reg = train(0.0), train(1.0)
    t_plain = sum(fisher.fisher_traces(plain, batches, mse).values())
    t_reg = sum(fisher.fisher_traces(reg, batches, mse).values())
    assert not torch.equal(plain[2].weight, reg[2].weight)
    assert t_reg < 0.7 * t_plain and t_reg < start


def test_double_hvp_on_an_op_without_double_backward_is_a_clear_error():
    class Once(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, g):
            return g * 2

    net = mlp()
    term = FisherRegularizer(lambda ctx: Once.apply(ctx.model(ctx.batch[0])).pow(2).mean(), hvp="double")
    with pytest.raises(FisherError, match=r"`fisher_regularizer.hvp` = 'double' but autograd node 'Error'"):
        term(ctx_for(net, data(1)[0]))


# ------------------------------------------------------------------------------------------------ session seams
def session_mlp(recipe, calibrate=True):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                        nn.Linear(16, 2))
    session = QuantSession(recipe, critical_loss=mse)
    session.convert(net)
    if calibrate:
        session.calibrate(net, data(2), lambda m, b: m(b[0]))
    return net, session


def test_session_mixed_precision_from_the_recipe_and_its_bad_budgets():
    net, session = session_mlp({"preset": "w4a8-fisher", "mixed_precision": {"budget": {"avg_weight_bits": 5.0}}})
    plan = session.mixed_precision(net, data(2), mse)
    assert plan is session.last_mixed_precision and plan.used <= 5.0
    assert fisher.average_weight_bits(net) == pytest.approx(plan.used)
    assert {n: v["weight_bits"] for n, v in session.state(net)["layers"].items()} == plan.allocation
    assert plan.allocation["0"] == plan.allocation["6"] == 8  # first and prediction layers pinned
    # hutchinson estimator and a BOPs budget
    net2, s2 = session_mlp({"preset": "w4a8-fisher", "mixed_precision": {"estimator": "hutchinson",
                                                                          "budget": {"bops_ratio": 0.75}}})
    macs = fisher.layer_macs(net2, data(1)[0][0])
    assert macs["2"] == 16 * 16 * 8 and macs["0"] == 4 * 16 * 8  # per sample, times the 8-bit input
    plan2 = s2.mixed_precision(net2, data(2), mse, macs=macs)
    assert sum(macs[n] * b for n, b in plan2.allocation.items()) <= 0.75 * 8 * sum(macs.values())
    # infeasible: the pinned 8-bit layers alone exceed it; the model keeps its bits
    net3, s3 = session_mlp({"preset": "w4a8-fisher", "mixed_precision": {"budget": {"avg_weight_bits": 2.0}}},
                           calibrate=False)
    before = layer_plan(net3)
    with pytest.raises(FisherError, match=r"avg_weight_bits` = 2 cannot be met.*smallest feasible budget is "
                                          r"avg_weight_bits = 2\.947369$"):  # (96·8 + 512·2) / 608, rounded up
        s3.calibrate(net3, data(2), lambda m, b: m(b[0]))  # calibration runs the recipe's mixed precision
    assert layer_plan(net3) == before
    s3.recipe.mixed_precision.budget = {"avg_weight_bits": 2.947369}  # the budget it names is feasible
    assert s3.mixed_precision(net3, data(2), mse).allocation == {"0": 8, "2": 2, "4": 2, "6": 8}
    assert QuantSession("w4a8").mixed_precision(net3, data(1), mse) is None  # not enabled: nothing done
    # the line each trainer logs
    assert s3.last_mixed_precision.summary() == ("2.947 average weight bits (budget {'avg_weight_bits': 2.947369}), "
                                                 "bits [2, 8] over 4 layers")


def test_session_fisher_regulariser_term_and_critical_classes():
    net, session = session_mlp("w4a8-fisher")
    term = session.add_fisher_regularizer(net, lambda ctx: mse(ctx.model, ctx.batch))
    session.start_training(net)
    session.before_step(net, 0.05)  # half-way through the 10 % warm-up
    assert term.current_weight() == pytest.approx(0.005)
    terms = session.loss_terms(net, data(1)[0])
    assert terms["fisher_reg"].requires_grad and terms["fisher_reg"].item() == pytest.approx(0.005 * term.last_trace)
    with pytest.raises(FisherError, match=r"Sequential has no quantized layer"):
        QuantSession("w4a8-fisher").add_fisher_regularizer(mlp(quantize=None), lambda ctx: 0)
    s = QuantSession({"preset": "w4a8-fisher", "critical": {"classes": ["dog", 0]}})
    assert s.critical_class_ids(net, ["person", "car", "dog"]) == [0, 2]
    with pytest.raises(FisherError, match=r"'dog' but the trainer gives no class names"):
        s.critical_class_ids(net)  # the generic family knows no class names


def test_regulariser_leaves_out_the_curriculum_stages_still_frozen():
    """In curriculum stage 1 the later stages are float and frozen: the penalty is the trace over the first
    stage's weights only, and its gradient there is that trace's Hessian-vector product, with no push from the
    frozen stages' gradient norm (the curriculum's gradient hooks zero their gradients inside the penalty's own
    `autograd.grad` too)."""
    stages = [{"name": "first", "modules": ["0"]}, {"name": "rest", "modules": ["2", "4", "6"]}]
    net, session = session_mlp({"preset": "w4a8-fisher", "curriculum": {"enabled": True, "stages": stages,
                                                                       "boundaries": [0.5]}})
    term = session.add_fisher_regularizer(net, lambda ctx: mse(ctx.model, ctx.batch))
    term.every = 1
    session.start_training(net)
    batch = data(1)[0]
    first = net[0].weight

    def by_hand(weights):  # the trace and its gradient on `first`, as the term computes them (eval, reference)
        net.eval()
        with quantizer_mode("reference"):
            grads = torch.autograd.grad(mse(net, batch), weights, create_graph=True)
            trace = sum(g.pow(2).sum() for g in grads)
            (hv,) = torch.autograd.grad(trace, [first])
        net.train()
        return trace.item(), hv

    full_trace = by_hand([m.weight for _, m in quantized_layers(net)])[0]
    session.before_step(net, 0.2)  # stage 1 of 2, λ past the 10 % warm-up
    net.zero_grad()
    penalty = session.loss_terms(net, batch)["fisher_reg"]
    penalty.backward()
    trace, hv = by_hand([first])
    assert term.last_trace == pytest.approx(trace, rel=1e-5) and full_trace > 1.5 * trace
    torch.testing.assert_close(first.grad, term.weight * term.last_scale * hv, rtol=1e-4, atol=1e-7)
    assert all(float(net[i].weight.grad.abs().max()) == 0.0 for i in (2, 4, 6))  # the curriculum's hooks
    session.before_step(net, 0.9)  # last stage: every quantized weight
    session.loss_terms(net, batch)
    assert term.last_trace == pytest.approx(by_hand([m.weight for _, m in quantized_layers(net)])[0], rel=1e-5)


@pytest.mark.parametrize("hvp", ["double", "finite_difference"])
def test_regulariser_leaves_batchnorm_statistics_and_weights_as_they_were(hvp):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8),
                        nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 2))
    dq.quantize(net, "w4a8")
    x = torch.randn(4, 3, 8, 8)
    net(x)  # ranges
    net.train()
    before = copy.deepcopy(net.state_dict())
    term = FisherRegularizer(lambda ctx: ctx.model(ctx.batch).pow(2).mean(), weight=1.0, hvp=hvp)
    value = term(ctx_for(net, x))["fisher_reg"]
    assert value.item() > 0 and term.method == hvp
    for k, v in net.state_dict().items():
        assert torch.equal(before[k], v), k
    value.backward()
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for _, m in quantized_layers(net))


def test_ilp_equals_dynamic_programming_on_a_random_instance():
    rng = np.random.default_rng(7)
    names = [f"l{i}" for i in range(12)]
    sizes = {n: int(rng.integers(1, 21)) for n in names}
    omega = {}
    for n in names:
        e2 = float(rng.uniform(1, 100))
        omega[n] = {2: e2, 4: e2 * float(rng.uniform(0.05, 0.4)), 8: e2 * float(rng.uniform(0.0, 0.02))}
    cap = int(3.5 * sum(sizes.values()))
    best = {0: 0.0}  # exact knapsack DP: used bits -> least Σ Ω
    for n in names:
        nxt = {}
        for used, val in best.items():
            for b in (2, 4, 8):
                u = used + sizes[n] * b
                if u <= cap and val + omega[n][b] < nxt.get(u, float("inf")):
                    nxt[u] = val + omega[n][b]
        best = nxt
    alloc = fisher.allocate_bits(omega, sizes, [2, 4, 8], {"avg_weight_bits": 3.5})
    assert alloc.objective == pytest.approx(min(best.values()), rel=1e-9)
    assert sum(sizes[n] * b for n, b in alloc.bits.items()) <= cap
    assert alloc.objective <= total(omega, greedy(omega, sizes, cap))


def test_sensitivity_objectives_and_printed_tables():
    from rich.console import Console

    from detq_hooks.fisher_report import print_ap_drop, print_bits_table

    a = lambda m, b: torch.tensor(2.0)
    c = lambda m, b: torch.tensor(3.0)
    assert fisher.sensitivity_loss("mix", a, c, alpha=0.5)(None, None).item() == 4.0
    assert fisher.sensitivity_loss("critical", a, c)(None, None).item() == 3.0
    assert fisher.sensitivity_loss("all", a, None)(None, None).item() == 2.0
    with pytest.raises(FisherError, match=r"`mixed_precision.objective` = 'mix' needs `critical_loss`"):
        fisher.sensitivity_loss("mix", a, None)
    net = mlp()
    plan = fisher.plan_mixed_precision(net, fisher.fisher_traces(net, data(2), mse), budget={"avg_weight_bits": 6.0})
    console = Console(record=True, width=200)
    print_bits_table(plan, console)
    text = console.export_text()
    assert "Fisher-aware mixed precision" in text and all(n in text for n in plan.allocation)
    gt, dets = _coco_case()
    res = coco_evaluate(gt, dets)
    print_ap_drop(ap_drop_table(res, res, ["dog"]), console)
    assert "dog" in console.export_text()


def test_layers_a_recipe_rule_gives_bits_are_pinned():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                        nn.Linear(16, 2))
    dq.quantize(net, {"preset": "w4a8", "quantization": {"rules": [{"name": "2", "weight_bits": 6}]}})
    plan = fisher.plan_mixed_precision(net, {n: 1.0 for n in ("0", "2", "4", "6")}, budget={"avg_weight_bits": 5.0})
    assert plan.pinned == {"0": 8, "2": 6, "6": 8} and plan.allocation["2"] == 6
    assert plan.allocation["4"] == 2  # (64·8 + 256·6 + 256·b + 32·8) / 608 <= 5 leaves b = 2


# ------------------------------------------------------------------------------------------------ critical objective
def _dense_head(seed=0):
    from detq_hooks.distill import HeadOutputs

    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    points = torch.stack([xs.flatten(), ys.flatten()], 1) * 8 + 4  # 64 anchors on a 64-px image
    boxes = torch.cat([points - 6, points + 6], 1)[None].repeat(2, 1, 1) + torch.randn(2, 64, 4, generator=g)
    logits = torch.randn(2, 64, 4, generator=g)
    return HeadOutputs(logits.requires_grad_(), boxes.requires_grad_(), score_kind="sigmoid", points=points)


def test_critical_objective_reads_only_critical_boxes_and_transformed_scores():
    from detq_hooks.critical import CriticalObjective

    head = _dense_head()
    gts = ([torch.tensor([[2.0, 2, 30, 30], [34, 34, 62, 62]]), torch.tensor([[10.0, 10, 50, 40]])],
           [torch.tensor([0, 3]), torch.tensor([1])])
    crit = CriticalObjective(None, [0, 1])
    everyone = CriticalObjective(None, [0, 1, 2, 3])
    assert float(everyone.loss(head, gts, "critical")) == pytest.approx(float(crit.loss(head, gts, "all")))
    assert float(crit.loss(head, gts, "mix")) == pytest.approx(float(crit.loss(head, gts, "all") + crit.loss(head, gts, "critical")))
    # box terms only on critical ground truths: no box gradient at the positives of class 3 for L_crit, for L_all there is
    from detq_hooks.critical import assign_to_ground_truth

    a = assign_to_ground_truth(head, *gts)
    other, mine = a.positives & (a.labels == 3), a.positives & (a.labels <= 1)
    assert other.any() and mine.any()
    g_crit = torch.autograd.grad(crit.loss(head, gts, "critical"), head.boxes)[0]
    g_all = torch.autograd.grad(crit.loss(head, gts, "all"), head.boxes)[0]
    assert g_crit[other].abs().sum() == 0 and (g_crit[mine].abs().sum(-1) > 0).all()
    assert (g_all[other].abs().sum(-1) > 0).all()
    # the score term is the BCE of the transformed logits: other = max of classes 2, 3
    loss = crit.loss(head, gts, "critical")
    g_logits, g_boxes = torch.autograd.grad(loss, [head.cls_logits, head.boxes])
    top = head.cls_logits[..., 2:].argmax(-1)
    assert torch.all(g_logits[..., 2:].gather(-1, top[..., None]) != 0)  # the max non-critical logit is trained
    assert torch.all(g_logits[..., 2:].abs().sum(-1) == g_logits[..., 2:].gather(-1, top[..., None]).abs().squeeze(-1))
    assert g_boxes.abs().sum() > 0


def test_critical_objective_on_a_softmax_query_head_uses_hungarian_positives():
    from detq_hooks.critical import CriticalObjective, assign_to_ground_truth
    from detq_hooks.distill import HeadOutputs

    g = torch.Generator().manual_seed(0)
    boxes = torch.rand(1, 10, 2, generator=g) * 0.5
    boxes = torch.cat([boxes, boxes + 0.3], -1).requires_grad_()
    logits = torch.randn(1, 10, 5, generator=g).requires_grad_()  # 4 classes + no-object
    head = HeadOutputs(logits, boxes, score_kind="softmax")
    gts = ([torch.tensor([[0.1, 0.1, 0.4, 0.4], [0.5, 0.5, 0.9, 0.8]])], [torch.tensor([1, 2])])
    a = assign_to_ground_truth(head, *gts)
    assert int(a.positives.sum()) == 2 and sorted(a.labels[a.positives].tolist()) == [1, 2]
    crit = CriticalObjective(None, [1], merge="logsumexp")
    loss = crit.loss(head, gts, "critical")
    # by hand: 3 columns (class 1, other = logsumexp of 0, 2, 3, no-object); DETR's 0.1 weight on no-object
    z = torch.stack([logits[..., 1], torch.logsumexp(logits[..., [0, 2, 3]], -1), logits[..., 4]], -1)[0]
    target = torch.full((10,), 2)
    target[a.positives[0]] = torch.where(a.labels[0][a.positives[0]] == 1, 0, 1)
    ce = torch.nn.functional.cross_entropy(z, target, weight=torch.tensor([1.0, 1.0, 0.1]))
    from detq_hooks.critical import generalized_iou

    q = a.positives[0] & (a.labels[0] == 1)
    box = (1 - generalized_iou(boxes[0][q], gts[0][0][a.gt_index[0][q]])).mean()
    assert float(loss) == pytest.approx(float(ce + box), rel=1e-6)
