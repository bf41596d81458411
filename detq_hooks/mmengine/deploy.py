"""MMDetection models out of a DetQHook run and into onnxruntime / OpenVINO: load, export, evaluate.

    model = load_quantized_detector("my_config.py", "work_dirs/my_config/epoch_12.pth")   # quantized, eval mode
    dq.export_openvino(exportable(model), torch.zeros(1, 3, 640, 640), "model.xml")      # or dq.export_onnx(...)
    evaluate_exported(model, make_runner("model.xml", "openvino"), "my_config.py")      # COCO mAP of the file

The exported graph is the detector from the preprocessed image (what ``model.data_preprocessor`` gives:
normalised, padded) to its head's raw outputs (per level class scores and box regressions, as ``bbox_head``
returns them). The box decoding and NMS stay outside the graph, in the head's own ``predict_by_feat`` — the same
split as MMDeploy's SDK and as :func:`evaluate_exported`, which runs that decoding on the runtime's outputs with
the config's test pipeline and evaluator, so the exported model's mAP is measured exactly like ``Runner.test()``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from ..checkpoint import CHECKPOINT_KEY, CheckpointMismatchError, read_state
from ..export import ExportError
from ..session import QuantSession

ConfigLike = Union[str, Path, Any]


def _config(config: ConfigLike, cfg_options: Optional[dict] = None):
    from mmengine.config import Config

    cfg = Config.fromfile(str(config)) if isinstance(config, (str, Path)) else config.copy()
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg


def load_quantized_detector(config: ConfigLike, checkpoint: Union[str, Path], *, cfg_options: Optional[dict] = None,
                            device: str = "cpu") -> nn.Module:
    """The MMDetection model of ``config`` with a checkpoint written by a run with ``DetQHook`` (QAT, or PTQ's
    ``detq_<recipe>.pth``): converted by the checkpoint's own recipe and per-layer plan, weights and quantizer
    state loaded strictly, in ``eval()`` mode. (A float checkpoint is refused: use ``mmdet.apis.init_detector``.)

    Raises:
        CheckpointMismatchError: the checkpoint has no detq state, or does not fit the config's model (naming
            the layer); the model is not returned half-loaded.
    """
    from mmengine.registry import init_default_scope
    from mmengine.runner.checkpoint import _load_checkpoint

    from mmdet.registry import MODELS

    # the safe checkpoint loader is registered by importing detq_hooks.mmengine, which this module is part of
    cfg = _config(config, cfg_options)
    init_default_scope(cfg.get("default_scope", "mmdet"))
    source = str(checkpoint)
    ckpt = _load_checkpoint(source, map_location="cpu")
    meta = ckpt.get("meta") or {}
    entry = read_state(meta.get(CHECKPOINT_KEY), source=source)
    if entry is None:
        raise CheckpointMismatchError(
            f"{source}: no detq quantization state in its meta (was it written by a run with DetQHook?); load a "
            "float checkpoint with mmdet.apis.init_detector")
    model = MODELS.build(cfg.model)
    state_dict = ckpt.get("state_dict", ckpt)
    session = QuantSession(entry["recipe"])
    session.restore(model, entry, source=source)
    session.verify(model, state_dict, entry, source=source)
    model.load_state_dict(state_dict, strict=True)
    session.load_state(model, entry, source=source, resume=False)
    model.cfg = cfg
    if "dataset_meta" in meta:
        model.dataset_meta = meta["dataset_meta"]
    return model.to(device).eval()


class HeadOutputs(nn.Module):
    """A single-stage MMDetection detector as an exportable graph: preprocessed images in, the head's raw
    outputs out, flattened to one tuple (``grouping`` records how they regroup: e.g. ``[3, 3]`` for RTMDet's
    class scores and box regressions at three levels)."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        kind = type(detector).__name__
        if hasattr(detector, "forward_transformer"):
            raise ExportError(
                f"{kind}: DETR-family detectors are not exportable here yet (their transformer reads per-image "
                "padding masks from the data samples); single-stage dense detectors (RTMDet, RetinaNet, FCOS, "
                "YOLOX, ...) are")
        if hasattr(detector, "roi_head") or not (hasattr(detector, "bbox_head") and hasattr(detector, "extract_feat")):
            raise ExportError(f"{kind}: only single-stage detectors (a `bbox_head` on `extract_feat`) are exportable "
                              "here; two-stage detectors are not")
        self.detector = detector
        self.grouping: Optional[list[int]] = None

    def forward(self, inputs: torch.Tensor) -> tuple:
        groups = self.detector.bbox_head(self.detector.extract_feat(inputs))
        groups = [list(g) if isinstance(g, (list, tuple)) else [g] for g in groups]
        self.grouping = [len(g) for g in groups]
        return tuple(t for g in groups for t in g)

    def regroup(self, flat: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
        if self.grouping is None:
            raise RuntimeError("HeadOutputs.regroup before any forward: run the module once (export does)")
        if len(flat) != sum(self.grouping):
            raise ValueError(f"{len(flat)} outputs, the head gives {sum(self.grouping)} ({self.grouping})")
        out, i = [], 0
        for n in self.grouping:
            out.append(list(flat[i:i + n]))
            i += n
        return out


def exportable(detector: nn.Module) -> HeadOutputs:
    """``detector`` as :class:`HeadOutputs`, the module to hand to ``dq.export_onnx`` / ``dq.export_openvino``."""
    return HeadOutputs(detector)


def example_input(detector: nn.Module, config: ConfigLike, *, split: str = "test") -> torch.Tensor:
    """One preprocessed image of the config's ``<split>_dataloader`` (batch 1): the export's example input, of
    the shape the test pipeline gives."""
    batch = next(iter(_dataloader(_config(config), split, batch_size=1)))
    return detector.data_preprocessor(batch, False)["inputs"]


def _dataloader(cfg, split: str, batch_size: Optional[int] = None):
    from mmengine.registry import init_default_scope
    from mmengine.runner import Runner

    init_default_scope(cfg.get("default_scope", "mmdet"))
    loader = cfg.get(f"{split}_dataloader")
    if not loader:
        raise ValueError(f"the config has no `{split}_dataloader`")
    loader = dict(loader)
    if batch_size is not None:
        loader["batch_size"] = batch_size
    return Runner.build_dataloader(loader)


def evaluate_exported(detector: nn.Module, run: Optional[Callable[[np.ndarray], Sequence[np.ndarray]]],
                      config: ConfigLike, *, split: str = "test", predictions: Optional[list] = None) -> dict[str, float]:
    """COCO metrics of an exported model: the config's ``<split>_dataloader`` images through the detector's
    data preprocessor, ``run`` (``detq_hooks.deploy.make_runner``: onnxruntime or OpenVINO, batch 1), the
    head's own ``predict_by_feat`` (decoding, NMS, rescaling) and the config's ``<split>_evaluator`` — what
    ``Runner.test()`` does with the PyTorch model. ``detector`` is the model that was exported (its head
    decodes; its weights are not used). Pass ``run=None`` to score the PyTorch model the same way. A list given
    as ``predictions`` receives each image's detections (``img_id``, ``bboxes`` in original-image pixels,
    ``scores``, ``labels`` as numpy arrays)."""
    from mmengine.evaluator import Evaluator

    cfg = _config(config)
    loader = _dataloader(cfg, split)
    evaluator = Evaluator(cfg.get(f"{split}_evaluator"))
    evaluator.dataset_meta = loader.dataset.metainfo
    wrapper = HeadOutputs(detector).eval()
    shape = None
    with torch.no_grad():
        for batch in loader:
            data = detector.data_preprocessor(batch, False)
            inputs, samples = data["inputs"], data["data_samples"]
            flat_outputs: list[list[torch.Tensor]] = []
            for i in range(inputs.shape[0]):
                x = inputs[i:i + 1]
                if run is None:
                    flat_outputs.append(list(wrapper(x)))
                    continue
                if shape is None:
                    wrapper(x)  # the head's output grouping
                    shape = tuple(x.shape)
                if tuple(x.shape) != shape:
                    raise ValueError(f"image {i} of a batch preprocesses to {tuple(x.shape)}, not {shape}: an exported "
                                     "graph has one input shape; give the test pipeline a fixed size (Resize + Pad)")
                flat_outputs.append([torch.from_numpy(np.asarray(o)) for o in run(x.numpy())])
            batched = [torch.cat(per_output) for per_output in zip(*flat_outputs)]
            groups = wrapper.regroup(batched)
            results = detector.bbox_head.predict_by_feat(*groups, batch_img_metas=[s.metainfo for s in samples],
                                                         rescale=True)
            samples = detector.add_pred_to_datasample(samples, results)
            if predictions is not None:
                predictions += [{"img_id": s.metainfo.get("img_id"),
                                 **{k: getattr(s.pred_instances, k).numpy() for k in ("bboxes", "scores", "labels")}}
                                for s in samples]
            evaluator.process(data_samples=samples, data_batch=batch)
    return evaluator.evaluate(len(loader.dataset))


__all__ = ["load_quantized_detector", "exportable", "HeadOutputs", "example_input", "evaluate_exported"]
