"""COCO evaluation of an Ultralytics detection model, in PyTorch or as an ONNX file, with one postprocessing.

Both paths read the same val images (resized to ``imgsz``, RGB, [0, 1]), run the raw network, apply
Ultralytics' ``non_max_suppression`` (anchor heads) or a top-k on end-to-end outputs, map boxes back to the
image size, and score with :func:`detq_hooks.evaluation.coco_evaluate`. So a PyTorch vs ONNX comparison
measures only the exported graph, not different pre/postprocessing.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

IMG_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def load_images(images_dir, imgsz: int) -> list[tuple[str, np.ndarray, tuple[int, int]]]:
    """``(stem, CHW float32 array in [0, 1] resized to imgsz, (h, w) of the file)`` for each image."""
    import cv2

    out = []
    for p in sorted(Path(images_dir).iterdir()):
        if p.suffix.lower() not in IMG_SUFFIXES:
            continue
        im = cv2.imread(str(p))
        h, w = im.shape[:2]
        if (h, w) != (imgsz, imgsz):
            im = cv2.resize(im, (imgsz, imgsz), interpolation=cv2.INTER_LINEAR)
        im = np.ascontiguousarray(im[..., ::-1].transpose(2, 0, 1), dtype=np.float32) / 255.0
        out.append((p.stem, im, (h, w)))
    return out


def _first(out):
    while isinstance(out, (list, tuple)):
        out = out[0]
    if isinstance(out, dict):
        out = next(iter(out.values()))
    return out


def postprocess(raw: torch.Tensor, head_type: str, imgsz: int, conf: float = 0.001, iou: float = 0.7, max_det: int = 300):
    """Per image ``(boxes_xyxy in input pixels, scores, labels)``."""
    from ultralytics.utils.nms import non_max_suppression
    from ultralytics.utils.ops import xywh2xyxy

    raw = torch.as_tensor(raw).float()
    results = []
    if head_type == "RTDETRDecoder":  # [B, Q, 4 + nc]: normalised xywh, sigmoid scores
        for r in raw:
            boxes = xywh2xyxy(r[:, :4]) * imgsz
            scores, labels = r[:, 4:].max(-1)
            keep = scores > conf
            order = scores[keep].argsort(descending=True)[:max_det]
            results.append((boxes[keep][order], scores[keep][order], labels[keep][order]))
        return results
    if raw.dim() == 3 and raw.shape[-1] == 6 and raw.shape[1] != 6:  # end-to-end [B, N, 6] (x1 y1 x2 y2 conf cls)
        for r in raw:
            keep = r[:, 4] > conf
            r = r[keep][:max_det]
            results.append((r[:, :4], r[:, 4], r[:, 5].long()))
        return results
    # multi_label: one box may score for several classes, as Ultralytics' validator does (higher mAP)
    dets = non_max_suppression(raw, conf_thres=conf, iou_thres=iou, max_det=max_det, multi_label=True)
    return [(d[:, :4], d[:, 4], d[:, 5].long()) for d in dets]


def predict_coco(
    run: Callable[[np.ndarray], torch.Tensor],
    images,
    gt_json,
    head_type: str,
    imgsz: int,
    batch: int = 8,
    label_to_category=None,
) -> tuple[list[dict], float]:
    """Run ``run(batch_array) -> raw output`` over ``images`` and return (COCO detections, ms per image)."""
    from ..evaluation import detections_from_tensors, image_id_by_filename

    ids = image_id_by_filename(gt_json)
    image_ids, boxes, scores, labels = [], [], [], []
    elapsed = 0.0
    for i in range(0, len(images), batch):
        chunk = images[i : i + batch]
        x = np.stack([c[1] for c in chunk])
        t = time.perf_counter()
        raw = run(x)
        elapsed += time.perf_counter() - t
        for (stem, _, (h, w)), (b, s, l) in zip(chunk, postprocess(raw, head_type, imgsz)):
            b = b.clone()
            b[:, [0, 2]] *= w / imgsz
            b[:, [1, 3]] *= h / imgsz
            image_ids.append(ids[stem])
            boxes.append(b)
            scores.append(s)
            labels.append(l)
    dets = detections_from_tensors(image_ids, boxes, scores, labels, label_to_category)
    return dets, 1000.0 * elapsed / max(len(images), 1)


def torch_runner(model: nn.Module) -> Callable[[np.ndarray], torch.Tensor]:
    model = model.float().eval()
    device = next(model.parameters()).device

    @torch.no_grad()
    def run(x: np.ndarray) -> torch.Tensor:
        return _first(model(torch.from_numpy(x).to(device))).cpu()

    return run


def onnx_runner(path, threads: Optional[int] = None) -> Callable[[np.ndarray], torch.Tensor]:
    from ..export import onnx_session

    sess = onnx_session(path, threads=threads)
    name = sess.get_inputs()[0].name

    def run(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(sess.run(None, {name: x})[0])

    return run


def head_type_of(model: nn.Module) -> str:
    return type(model.model[-1]).__name__


def evaluate(model_or_onnx, images_dir, gt_json, imgsz: int, head_type: Optional[str] = None, batch: int = 8,
             images=None, ov_precision: Optional[str] = None):
    """COCO metrics (``EvalResult``) and ms/image of a PyTorch Ultralytics model, an ONNX file or an OpenVINO
    ``.xml`` IR (run one image at a time, as exported with batch 1; ``ov_precision``: OpenVINO's inference
    precision hint, e.g. ``f32``, default its own: bf16 on CPUs that have it)."""
    from ..evaluation import coco_evaluate

    images = images if images is not None else load_images(images_dir, imgsz)
    if isinstance(model_or_onnx, nn.Module):
        head_type = head_type or head_type_of(model_or_onnx)
        run = torch_runner(model_or_onnx)
    elif str(model_or_onnx).endswith(".xml"):  # OpenVINO IR
        from ..deploy import make_runner

        ov_run = make_runner(model_or_onnx, "openvino", precision=ov_precision)
        run = lambda x: torch.from_numpy(np.concatenate([ov_run(x[i:i + 1])[0] for i in range(len(x))]))  # noqa: E731
    else:
        run = onnx_runner(model_or_onnx)
    dets, ms = predict_coco(run, images, gt_json, head_type or "Detect", imgsz, batch=batch)
    return coco_evaluate(gt_json, dets), ms


def export_model_onnx(model: nn.Module, path, imgsz: int, batch: int = 1, dynamic_batch: bool = True):
    """Export an Ultralytics detection model (float or quantized) to ONNX; quantized ones as QDQ graphs.

    The head is put in export mode (one output tensor, as Ultralytics' own exporter does)."""
    import copy

    from ..export import export_onnx

    m = copy.deepcopy(model).float().eval()
    for mod in m.modules():
        if hasattr(mod, "export") and isinstance(getattr(mod, "export"), bool):
            mod.export = True
        if hasattr(mod, "format"):
            mod.format = "onnx"
    x = torch.zeros(batch, 3, imgsz, imgsz)
    axes = {"images": {0: "batch"}, "output0": {0: "batch"}} if dynamic_batch else None
    return export_onnx(m, x, path, input_names=["images"], output_names=["output0"], dynamic_axes=axes)


__all__ = ["evaluate", "export_model_onnx", "load_images", "predict_coco", "postprocess", "torch_runner", "onnx_runner"]
