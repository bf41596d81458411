"""Float reference detectors trained on the synthetic data, cached so benchmarks train them once.

Quantization results are only meaningful against a float model that learned something, and training
one takes minutes on a CPU. :func:`cached_float_checkpoint` trains an Ultralytics model from its yaml
(random init) on a :class:`~detq_hooks.tools.data.SynthDataset` and keeps ``best.pt`` under
``~/.cache/detq-hooks/float_refs/<key>/`` (``DETQ_CACHE_DIR`` moves the root), where ``key`` hashes
everything that changes the result: the data set's generation parameters, the model, the budget, the
image size, batch, seed and the Ultralytics and torch versions. A later call with the same arguments
returns the cached checkpoint at once.

Example::

    from detq_hooks.tools.data import make_synthetic_dataset
    from detq_hooks.tools.zoo import cached_float_checkpoint
    ds = make_synthetic_dataset("/tmp/synth", num_train=512, num_val=64)
    ref = cached_float_checkpoint(ds, "yolo11n.yaml", epochs=12)
    YOLO(ref.checkpoint)  # a trained float YOLO11n; ref.metrics["map50_95"] is its COCO mAP on val
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .data import SynthDataset, exclusive_lock
from ..evaluation import EvalResult, coco_evaluate, image_id_by_filename

__all__ = ["FROM_SCRATCH_HYPERPARAMETERS", "FloatReference", "cached_float_checkpoint", "evaluate_ultralytics",
           "float_refs_dir", "predict_ultralytics_coco", "synthetic_data_dir"]

ZOO_VERSION = 2  # bump when the training recipe below changes, so old checkpoints are not reused

# Ultralytics' defaults are tuned for long runs: with nbs=64 a batch of 16 accumulates 4 batches per
# optimizer step and optimizer="auto" picks AdamW at lr 0.00083 for 8 classes, so a few-minute CPU run
# from scratch makes only tens of small steps and learns nothing. Step every batch, at a larger rate,
# with a short warm-up. Mosaic shrinks objects (four images in one, then a random rescale of +-50 %), which
# at 160 px turns the small shapes into 2-4 px specks: rescale by +-30 % only, and train the last 10 epochs
# without mosaic. On 2 CPU cores YOLO11n goes from mAP50-95 0.33 (30 epochs, lr 0.002, old settings) to
# 0.52 in 60 epochs (~14 min) on 512 images at 160 px.
FROM_SCRATCH_HYPERPARAMETERS = dict(optimizer="AdamW", lr0=0.003, nbs=16, warmup_epochs=1.0, close_mosaic=10,
                                    scale=0.3)


@dataclass(frozen=True)
class FloatReference:
    """A cached float checkpoint and its COCO metrics on the data set's val split."""

    checkpoint: Path  # .../<key>/best.pt
    metrics: dict  # EvalResult.to_dict() of the checkpoint, plus "train_seconds" and "epochs_run"
    key: str
    cached: bool  # True when it came from the cache without training

    @property
    def map50_95(self) -> float:
        return self.metrics["map50_95"]

    @property
    def map50(self) -> float:
        return self.metrics["map50"]


def _cache_root() -> Path:
    return Path(os.environ.get("DETQ_CACHE_DIR") or Path.home() / ".cache" / "detq-hooks").expanduser()


def float_refs_dir() -> Path:
    """Root of the checkpoint cache: ``$DETQ_CACHE_DIR/float_refs`` or ``~/.cache/detq-hooks/float_refs``."""
    return _cache_root() / "float_refs"


def synthetic_data_dir(num_train: int, num_val: int, imgsz: int, seed: int = 0) -> Path:
    """Where the benchmarks keep the synthetic data set of these parameters (next to the float references),
    e.g. ``~/.cache/detq-hooks/synth/n512_v96_s160_seed0``; pass it to :func:`make_synthetic_dataset`."""
    return _cache_root() / "synth" / f"n{num_train}_v{num_val}_s{imgsz}_seed{seed}"


def cached_float_checkpoint(
    dataset: SynthDataset,
    model: str = "yolo11n.yaml",
    *,
    epochs: int = 12,
    minutes: float | None = None,
    imgsz: int | None = None,
    batch: int = 16,
    seed: int = 0,
    force: bool = False,
    verbose: bool = True,
) -> FloatReference:
    """Train (once) a float Ultralytics model on ``dataset`` and return its cached ``best.pt``.

    Args:
        dataset: the synthetic data set to train and validate on.
        model: an Ultralytics model yaml (random init, e.g. ``"yolo11n.yaml"``) or a ``.pt`` to fine-tune.
        epochs: training epochs.
        minutes: wall-clock budget instead of a fixed epoch count (Ultralytics' ``time=`` argument,
            which fits the learning-rate schedule to the budget). Part of the cache key.
        imgsz: training size; default the data set's image size.
        batch: batch size.
        seed: training seed.
        force: retrain even if a cached checkpoint exists.
        verbose: show Ultralytics' training output.

    Returns:
        A :class:`FloatReference` (checkpoint path, COCO metrics via pycocotools, cache key).
    """
    if not isinstance(dataset, SynthDataset):
        raise TypeError(f"`dataset` must be a SynthDataset from make_synthetic_dataset, got {type(dataset).__name__}")
    if epochs < 1:
        raise ValueError(f"`epochs` must be >= 1, got {epochs}")
    if minutes is not None and minutes <= 0:
        raise ValueError(f"`minutes` must be > 0 or None, got {minutes}")
    imgsz = dataset.imgsz if imgsz is None else int(imgsz)
    model_path = Path(model)
    if model_path.suffix == ".pt" and not model_path.is_file():
        raise FileNotFoundError(f"`model` {model} does not exist (weights cannot be downloaded here: "
                                "pass a model yaml such as 'yolo11n.yaml' to train from scratch)")

    key_fields = _key_fields(dataset, model, epochs, minutes, imgsz, batch, seed)
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
    directory = float_refs_dir() / key
    directory.mkdir(parents=True, exist_ok=True)
    checkpoint, metrics_file = directory / "best.pt", directory / "metrics.json"

    with exclusive_lock(directory / ".lock"):  # a second benchmark waits instead of training the same model
        if not force and checkpoint.is_file() and metrics_file.is_file():
            return FloatReference(checkpoint, json.loads(metrics_file.read_text())["metrics"], key, cached=True)
        for stale in (checkpoint, metrics_file):
            stale.unlink(missing_ok=True)
        (directory / "key.json").write_text(json.dumps(key_fields, indent=2, sort_keys=True) + "\n")

        started = time.time()
        best, epochs_run = _train(dataset, model, directory / "run", epochs, minutes, imgsz, batch, seed, verbose)
        train_seconds = time.time() - started
        shutil.copyfile(best, directory / "best.pt.tmp")
        os.replace(directory / "best.pt.tmp", checkpoint)  # no half-written best.pt for a reader to find
        metrics = evaluate_ultralytics(checkpoint, dataset, imgsz=imgsz).to_dict()
        metrics.update(train_seconds=round(train_seconds, 1), epochs_run=epochs_run)
        # metrics.json last: its presence marks a complete entry
        metrics_file.write_text(json.dumps({"key": key_fields, "metrics": metrics}, indent=2) + "\n")
        shutil.rmtree(directory / "run", ignore_errors=True)
    return FloatReference(checkpoint, metrics, key, cached=False)


def evaluate_ultralytics(weights, dataset: SynthDataset, imgsz: int | None = None, split: str = "val",
                         conf: float = 0.001, iou: float = 0.7, max_det: int = 300, batch: int = 16) -> EvalResult:
    """COCO mAP (pycocotools) of an Ultralytics detector -- a path or a loaded ``YOLO`` -- on a split.

    The predictions are the ones Ultralytics' own validation makes (multi-label NMS at ``conf=0.001``,
    as for its mAP). ``model.predict`` keeps only the best class per box, which starves the rare classes
    of a long-tailed data set: on the synthetic data it reports the tail classes at AP 0.
    """
    detections = predict_ultralytics_coco(weights, dataset, imgsz, split, conf, iou, max_det, batch)
    return coco_evaluate(dataset.coco_json(split), detections)


def predict_ultralytics_coco(weights, dataset: SynthDataset, imgsz: int | None = None, split: str = "val",
                             conf: float = 0.001, iou: float = 0.7, max_det: int = 300, batch: int = 16) -> list[dict]:
    """The COCO result dicts (ids of ``dataset``'s annotation file) that :func:`evaluate_ultralytics` scores."""
    import tempfile

    from ultralytics import YOLO
    from ultralytics.models.yolo.detect import DetectionValidator

    class CollectingValidator(DetectionValidator):
        def eval_json(self, stats):  # keep predictions.json; scoring is pycocotools'
            return stats

    model = weights if hasattr(weights, "val") else YOLO(str(weights))
    ids = image_id_by_filename(dataset.coco_json(split))
    with tempfile.TemporaryDirectory(prefix="detq_eval_") as tmp:
        model.val(data=str(dataset.yolo_yaml), split=split, imgsz=imgsz or dataset.imgsz, batch=batch, conf=conf,
                  iou=iou, max_det=max_det, device="cpu", workers=0, plots=False, save_json=True, verbose=False,
                  project=tmp, name="val", exist_ok=True, validator=CollectingValidator)
        predictions_file = Path(tmp) / "val" / "predictions.json"
        predictions = json.loads(predictions_file.read_text()) if predictions_file.is_file() else []
    detections = []
    for det in predictions:  # Ultralytics ids images by file stem; the COCO file by its own ids
        stem = Path(det["file_name"]).stem
        if stem not in ids:
            raise ValueError(f"Ultralytics predicted on {det['file_name']}, which is not in {dataset.coco_json(split)}")
        detections.append({"image_id": ids[stem], "category_id": int(det["category_id"]), "bbox": det["bbox"],
                           "score": det["score"]})
    return detections


# ----------------------------------------------------------------------------------------------------


def _key_fields(dataset, model, epochs, minutes, imgsz, batch, seed) -> dict:
    import torch
    import ultralytics

    model_id = str(model)
    if Path(model).suffix == ".pt":  # a user's checkpoint: key on its content, not its name
        model_id = hashlib.sha256(Path(model).read_bytes()).hexdigest()
    return {"zoo_version": ZOO_VERSION, "hyperparameters": FROM_SCRATCH_HYPERPARAMETERS, "data": dataset.params(),
            "model": model_id, "epochs": int(epochs),
            "minutes": minutes, "imgsz": imgsz, "batch": int(batch), "seed": int(seed),
            "ultralytics": ultralytics.__version__, "torch": torch.__version__.split("+")[0]}


def _train(dataset, model, project, epochs, minutes, imgsz, batch, seed, verbose):
    os.environ.setdefault("YOLO_OFFLINE", "1")  # nothing can be downloaded here; fail rather than hang
    os.environ.setdefault("YOLO_AUTOINSTALL", "false")
    from ultralytics import YOLO

    yolo = YOLO(str(model))
    arguments = dict(data=str(dataset.yolo_yaml), imgsz=imgsz, epochs=epochs, batch=batch, workers=0, amp=False,
                     plots=False, device="cpu", project=str(project), name="train", exist_ok=True, seed=seed,
                     deterministic=True, verbose=verbose, val=True, **FROM_SCRATCH_HYPERPARAMETERS)
    if minutes is not None:
        arguments["time"] = minutes / 60.0  # hours; Ultralytics then ignores `epochs`
    yolo.train(**arguments)
    trainer = yolo.trainer
    best = Path(trainer.best) if Path(trainer.best).is_file() else Path(trainer.last)
    if not best.is_file():
        raise RuntimeError(f"Ultralytics training in {project} produced no checkpoint")
    return best, int(trainer.epoch) + 1
