"""Ultralytics segment / pose / OBB models through ``DetQTrainer``: real (tiny) training runs with each task's
own Ultralytics trainer, loss and validator; the task's own prediction layers kept at 8 bits; the exported
integer ONNX computing the fake-quant model's outputs (boxes, classes and the task's extra outputs).

The labels are the synthetic data set's boxes written in each task's format: a box's corners as its polygon
(segment, OBB with angle 0) and as 4 visible keypoints (pose).
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")

import numpy as np
import pytest
import torch

pytest.importorskip("ultralytics")

from ultralytics import YOLO  # noqa: E402
from ultralytics.models.yolo.obb import OBBTrainer  # noqa: E402
from ultralytics.models.yolo.pose import PoseTrainer  # noqa: E402
from ultralytics.models.yolo.segment import SegmentationTrainer  # noqa: E402
from ultralytics.nn.tasks import load_checkpoint  # noqa: E402

from detq_hooks import is_quantized  # noqa: E402
from detq_hooks.detectors.base import UnsupportedDetectorError  # noqa: E402
from detq_hooks.modules import is_quantized_module  # noqa: E402
from detq_hooks.ultralytics import (DetQConfigError, DetQOBBTrainer, DetQPoseTrainer,  # noqa: E402
                                    DetQSegmentationTrainer, DetQTrainer, excluded_layers, prediction_layers)

IMGSZ = 64
COMMON = dict(imgsz=IMGSZ, batch=8, amp=False, plots=False, workers=0, device="cpu", verbose=False,
              exist_ok=True, seed=0, deterministic=True, val=True)
TASKS = {  # task: (model yaml, our trainer, Ultralytics' trainer of the task, its extra validation metric)
    "segment": ("yolo11n-seg.yaml", DetQSegmentationTrainer, SegmentationTrainer, "metrics/mAP50-95(M)"),
    "pose": ("yolo11n-pose.yaml", DetQPoseTrainer, PoseTrainer, "metrics/mAP50-95(P)"),
    "obb": ("yolo11n-obb.yaml", DetQOBBTrainer, OBBTrainer, "metrics/mAP50-95(B)"),
}


def write_task_dataset(ds, task: str, out: Path) -> Path:
    """The synthetic data set's images with its boxes as ``task`` labels; returns the data yaml."""
    import yaml

    for split in ("train", "val"):
        (out / "labels" / split).mkdir(parents=True)
        shutil.copytree(ds.root / "images" / split, out / "images" / split)
        for f in (ds.root / "labels" / split).glob("*.txt"):
            lines = []
            for row in f.read_text().split("\n"):
                if not row.strip():
                    continue
                c, x, y, w, h = row.split()
                x, y, w, h = map(float, (x, y, w, h))
                corners = [(x - w / 2, y - h / 2), (x + w / 2, y - h / 2), (x + w / 2, y + h / 2), (x - w / 2, y + h / 2)]
                if task == "pose":
                    lines.append(f"{c} {x} {y} {w} {h} " + " ".join(f"{a:.6f} {b:.6f} 2" for a, b in corners))
                else:
                    lines.append(c + " " + " ".join(f"{a:.6f} {b:.6f}" for a, b in corners))
            (out / "labels" / split / f.name).write_text("\n".join(lines) + "\n")
    data = yaml.safe_load(ds.yolo_yaml.read_text())
    data["path"] = str(out)
    if task == "pose":
        data.update(kpt_shape=[4, 3], flip_idx=[1, 0, 3, 2])
    (out / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return out / "data.yaml"


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    from detq_hooks.tools.data import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("synth"), num_train=16, num_val=8, imgsz=IMGSZ, seed=0)


@pytest.fixture(scope="module")
def task_data(ds, tmp_path_factory):
    cache = {}

    def get(task):
        if task not in cache:
            cache[task] = write_task_dataset(ds, task, tmp_path_factory.mktemp(task))
        return cache[task]

    return get


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def trained(task_data, project):
    cache = {}

    def get(task):
        if task not in cache:
            model = YOLO(TASKS[task][0])
            model.train(data=str(task_data(task)), trainer=DetQTrainer, detq="w4a8", epochs=2, project=str(project),
                        name=task, **COMMON)
            cache[task] = model.trainer
        return cache[task]

    return get


def task_layers(model) -> list[str]:
    """The layers that make the task's own outputs: mask coefficients and prototypes, keypoints, angles."""
    head = model.model[-1]
    names = [f"model.{len(model.model) - 1}.cv4.{i}.{len(b) - 1}" for i, b in enumerate(head.cv4)]
    if hasattr(head, "proto"):
        names.append(f"model.{len(model.model) - 1}.proto.cv3.conv")
    return names


@pytest.mark.parametrize("task", list(TASKS))
def test_task_model_trains_quantized_with_its_own_trainer(trained, task):
    trainer = trained(task)
    _, ours, theirs, metric = TASKS[task]
    assert type(trainer) is ours and isinstance(trainer, theirs)  # the task's data pipeline, loss and validator
    assert metric in trainer.metrics, sorted(trainer.metrics)
    model, _ = load_checkpoint(str(trainer.best))
    assert is_quantized(model) and model.task == task
    layers = dict(model.named_modules())
    preds = prediction_layers(model)
    assert set(task_layers(model)) <= set(preds), (task_layers(model), preds)
    for n in preds:
        assert is_quantized_module(layers[n]) and layers[n].weight_quantizer.bits == 8, n
    body = [m for m in model.modules() if is_quantized_module(m) and getattr(m, "detq_layer_role", "") == "body"]
    assert len(body) > 50 and all(m.weight_quantizer.bits == 4 for m in body)
    result = YOLO(str(trainer.best)).predict(str(Path(trainer.data["val"])), imgsz=IMGSZ, conf=0.0, verbose=False)[0]
    extra = {"segment": result.masks, "pose": result.keypoints, "obb": result.obb}[task]
    assert extra is not None and len(extra) > 0


@pytest.mark.parametrize("task", list(TASKS))
def test_task_model_exports_its_integer_model(trained, task, tmp_path):
    """``YOLO(best.pt).export(format="onnx")``: int8 weight codes, no quantizer arithmetic, and onnxruntime
    computing the fake-quant model's outputs: class scores and keypoint visibilities within 2e-3, boxes within
    1 px (the export's stated tolerances), keypoints within 0.1 px, angles within 1e-3 rad, mask coefficients and
    prototypes within 0.1 % of their range, a third of one 8-bit step (measured here: 1e-7 of the range)."""
    import onnx

    from detq_hooks.deploy import make_runner
    from detq_hooks.onnx_graph import graph_summary
    from detq_hooks.ultralytics.evaluate import load_images

    best = tmp_path / "best.pt"
    shutil.copy(trained(task).best, best)
    model, _ = load_checkpoint(str(best))
    path = YOLO(str(best)).export(format="onnx", imgsz=IMGSZ)
    graph = onnx.load(path)
    s = graph_summary(graph)
    n_conv = sum(1 for m in model.modules() if is_quantized_module(m) and not isinstance(m, torch.nn.ConvTranspose2d))
    assert s["quantized_convs"] == n_conv
    producer = {o: n.op_type for n in graph.graph.node for o in n.output}
    transposed = [[producer.get(i) for i in n.input[:2]] for n in graph.graph.node if n.op_type == "ConvTranspose"]
    assert transposed == ([["DequantizeLinear"] * 2] if task == "segment" else [])  # the prototypes' upsampling
    assert (s["Round"], s["Clip"], s["Cast"]) == (0, 0, 0)
    assert s["integer_bytes"] > 20 * s["float_bytes"]

    m = copy.deepcopy(model).fuse().eval()
    m.model[-1].export, m.model[-1].format = True, "onnx"
    x = load_images(Path(trained(task).data["val"]), IMGSZ)[0][1][None]
    with torch.no_grad():
        ref = m(torch.from_numpy(x))
    ref = [t.numpy() for t in (ref if isinstance(ref, (tuple, list)) else [ref])]
    got = make_runner(path, "onnxruntime")(x)
    assert len(got) == len(ref)
    nc = model.model[-1].nc
    y, r = got[0], ref[0]  # (1, 4 + nc + extra, anchors)
    assert np.abs(y[:, 4:4 + nc] - r[:, 4:4 + nc]).max() <= 2e-3
    assert np.abs(y[:, :4] - r[:, :4]).max() <= 1.0
    if task == "pose":  # keypoints: x, y in pixels, visibility as a probability
        kx = np.abs(y[:, 4 + nc:] - r[:, 4 + nc:]).reshape(-1, 3, y.shape[-1])
        assert kx[:, :2].max() <= 0.1 and kx[:, 2].max() <= 2e-3
    elif task == "obb":  # the angle in radians
        assert np.abs(y[:, 4 + nc:] - r[:, 4 + nc:]).max() <= 1e-3
    else:  # mask coefficients, then the prototypes (a second output)
        for a, b in ((y[:, 4 + nc:], r[:, 4 + nc:]), (got[1], ref[1])):
            assert np.abs(a - b).max() <= 1e-3 * np.ptp(b)


def test_yolo26_pose_keeps_training_only_branches_float(task_data, project):
    """YOLO26 pose: the keypoint-sigma convs and the RealNVP flow run only inside the training loss (never in
    eval, calibration or export), so they stay float; the network's keypoint convs are prediction layers."""
    model = YOLO("yolo26n-pose.yaml")
    model.train(data=str(task_data("pose")), trainer=DetQTrainer, detq="w4a8", epochs=1, project=str(project),
                name="pose26", **COMMON)
    q, _ = load_checkpoint(str(model.trainer.best))
    head, prefix = q.model[-1], f"model.{len(q.model) - 1}"
    layers = dict(q.named_modules())
    float_only = [n for n in excluded_layers(q) if "cv4_sigma." in n or ".flow_model." in n]
    assert len(float_only) == 2 * head.nl + sum(1 for m in head.flow_model.modules() if isinstance(m, torch.nn.Linear))
    assert not any(is_quantized_module(layers[n]) for n in float_only)
    kpts = [f"{prefix}.{b}.{i}" for b in ("cv4_kpts", "one2one_cv4_kpts") for i in range(head.nl)]
    assert all(layers[n].weight_quantizer.bits == 8 for n in kpts)


def test_obb_head_terms_refused_before_conversion(task_data, project):
    """CR-QAT's head terms read boxes axis-aligned; an OBB head's are rotated: refused, the user's model as it was."""
    model = YOLO("yolo11n-obb.yaml")
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    with pytest.raises(UnsupportedDetectorError, match="rotated by a predicted angle"):
        model.train(data=str(task_data("obb")), trainer=DetQTrainer, detq="w4a8-crqat", epochs=1, project=str(project),
                    name="obb-crqat", **COMMON)
    assert not is_quantized(model.model)
    assert all(torch.equal(before[k], v) for k, v in model.model.state_dict().items())


def test_classification_model_is_refused_by_name(ds, project):
    with pytest.raises(DetQConfigError, match="task is 'classify'"):
        YOLO("yolo11n-cls.yaml").train(data=str(ds.root), trainer=DetQTrainer, detq="w4a8", epochs=1,
                                       project=str(project), name="cls", **COMMON)
