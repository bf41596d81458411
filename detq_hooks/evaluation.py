"""COCO detection metrics through pycocotools, for any detector's predictions.

The trainer adapters turn their predictions into COCO result dicts (``image_id``, ``category_id``,
``bbox`` as ``[x, y, w, h]`` in pixels, ``score``) -- :func:`detections_from_tensors` does it from
per-image xyxy tensors -- and :func:`coco_evaluate` scores them against a COCO annotation file, such as
the ones :func:`detq_hooks.tools.data.make_synthetic_dataset` writes (``category_id = class_index + 1``).

Example::

    from detq_hooks.evaluation import coco_evaluate, detections_from_tensors, image_id_by_filename
    ids = image_id_by_filename(ds.coco_val_json)
    dets = detections_from_tensors([ids[p.stem] for p in paths], boxes, scores, labels)
    res = coco_evaluate(ds.coco_val_json, dets)
    print(res.map50_95, res.map50, res.per_category)
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

__all__ = ["EvalResult", "ImageMatches", "bootstrap_map", "coco_evaluate", "detections_from_tensors",
           "image_id_by_filename", "load_coco", "match_per_image"]

_IOU_TYPES = ("bbox", "segm")
# order of COCOeval.stats
_STAT_NAMES = ("map50_95", "map50", "map75", "map_small", "map_medium", "map_large",
               "ar1", "ar10", "ar100", "ar_small", "ar_medium", "ar_large")


@dataclass
class EvalResult:
    """COCO metrics of one evaluation. Values pycocotools reports as -1 (no ground truth in that
    area range) are ``nan`` here; categories without ground truth are left out of ``per_category``."""

    map50_95: float
    map50: float
    map75: float
    map_small: float
    map_medium: float
    map_large: float
    ar100: float
    per_category: dict = field(default_factory=dict)  # category name -> AP50-95
    per_category_ap50: dict = field(default_factory=dict)  # category name -> AP50
    num_images: int = 0
    num_detections: int = 0
    stats: list = field(default_factory=list)  # the 12 numbers of COCOeval.stats, -1 kept as nan
    # COCO AP restricted to the critical categories (pycocotools `params.catIds`), when they were named
    critical_map50_95: float | None = None
    critical_map50: float | None = None
    critical_categories: list = field(default_factory=list)  # their names

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        crit = ("" if self.critical_map50_95 is None else
                f"  critical mAP50-95 {self.critical_map50_95:.4f}  critical mAP50 {self.critical_map50:.4f}")
        return (f"mAP50-95 {self.map50_95:.4f}  mAP50 {self.map50:.4f}{crit}  ({self.num_detections} detections on "
                f"{self.num_images} images)")


def load_coco(gt, verbose: bool = False):
    """A ``pycocotools.coco.COCO`` from a path, a COCO object or an annotation dict."""
    from pycocotools.coco import COCO

    if isinstance(gt, COCO):
        return gt
    with _quiet(not verbose):
        if isinstance(gt, (str, Path)):
            path = Path(gt)
            if not path.is_file():
                raise FileNotFoundError(f"COCO annotation file {path} does not exist")
            return COCO(str(path))
        if isinstance(gt, Mapping):
            coco = COCO()
            coco.dataset = copy.deepcopy(dict(gt))
            coco.createIndex()
            return coco
    raise TypeError(f"ground truth must be a path, a pycocotools COCO or a dict, got {type(gt).__name__}")


def coco_evaluate(
    gt,
    detections: Sequence[Mapping],
    category_ids: Sequence[int] | None = None,
    iou_type: str = "bbox",
    image_ids: Sequence[int] | None = None,
    verbose: bool = False,
    critical_category_ids: Sequence[int] | None = None,
) -> EvalResult:
    """COCO mAP50-95, mAP50 and per-category AP of ``detections`` against ``gt``, computed by pycocotools.

    Args:
        gt: COCO annotation JSON path, ``pycocotools.coco.COCO`` object, or annotation dict.
        detections: COCO result dicts with ``image_id``, ``category_id``, ``bbox`` ``[x, y, w, h]`` (pixels)
            and ``score``. Not modified. Empty means nothing was detected: every AP is 0.
        category_ids: evaluate only these categories (default: all in ``gt``).
        iou_type: ``"bbox"`` (or ``"segm"`` for results carrying ``segmentation``).
        image_ids: evaluate only these images (default: all in ``gt``).
        verbose: let pycocotools print its usual tables.
        critical_category_ids: also report mAP50-95 and mAP50 over these categories only
            (``critical_map50_95``, ``critical_map50``), beside the overall figures.

    Returns:
        An :class:`EvalResult`.

    Example::

        res = coco_evaluate("annotations/instances_val.json", dets)
        res.map50_95, res.per_category["ring"]
    """
    from pycocotools.cocoeval import COCOeval

    if iou_type not in _IOU_TYPES:
        raise ValueError(f"`iou_type` must be one of {_IOU_TYPES}, got {iou_type!r}")
    coco_gt = load_coco(gt, verbose)
    known_categories = set(coco_gt.getCatIds())
    known_images = set(coco_gt.getImgIds())
    categories = sorted(known_categories) if category_ids is None else [int(c) for c in category_ids]
    unknown = sorted(set(categories) - known_categories)
    if unknown or not categories:
        raise ValueError(f"`category_ids` {list(category_ids)} must be a non-empty subset of the ground truth's "
                         f"category ids {sorted(known_categories)}; unknown: {unknown}")
    images = sorted(known_images) if image_ids is None else [int(i) for i in image_ids]
    unknown = sorted(set(images) - known_images)
    if unknown:
        raise ValueError(f"`image_ids` not in the ground truth: {unknown[:10]}")

    if critical_category_ids is not None:
        crit = [int(c) for c in critical_category_ids]
        unknown = sorted(set(crit) - set(categories))
        if unknown or not crit:
            raise ValueError(f"`critical_category_ids` {list(critical_category_ids)} must be a non-empty subset of the "
                             f"evaluated category ids {categories}; unknown: {unknown}")
        overall = coco_evaluate(coco_gt, detections, categories, iou_type, images, verbose)
        critical = coco_evaluate(coco_gt, detections, crit, iou_type, images, verbose)
        overall.critical_map50_95, overall.critical_map50 = critical.map50_95, critical.map50
        overall.critical_categories = [c["name"] for c in coco_gt.loadCats(sorted(crit))]
        return overall

    results = [dict(d) for d in detections]  # loadRes adds keys to the dicts it gets
    _check_detections(results, known_images, known_categories, iou_type)
    names = {c["id"]: c["name"] for c in coco_gt.loadCats(categories)}

    if not results:  # loadRes cannot take an empty list; nothing detected means every AP is 0
        return _zero_result(coco_gt, categories, images, names)

    with _quiet(not verbose):
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        evaluator.params.catIds = categories
        evaluator.params.imgIds = images
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()

    stats = [_nan_if_missing(s) for s in evaluator.stats]
    # precision: [IoU thresholds, recall points, categories, area ranges, max dets]; area "all", maxDets 100
    precision = evaluator.eval["precision"][:, :, :, 0, -1]
    per_category, per_category_ap50 = {}, {}
    for k, cat in enumerate(evaluator.params.catIds):
        p = precision[:, :, k]
        if (p > -1).any():
            per_category[names[cat]] = float(np.mean(p[p > -1]))
            p50 = p[0]
            per_category_ap50[names[cat]] = float(np.mean(p50[p50 > -1])) if (p50 > -1).any() else 0.0
    return EvalResult(
        **dict(zip(("map50_95", "map50", "map75", "map_small", "map_medium", "map_large"), stats[:6])),
        ar100=stats[8], per_category=per_category, per_category_ap50=per_category_ap50,
        num_images=len(images), num_detections=len(results), stats=stats,
    )


# ------------------------------------------------------------------------------------------ bootstrap over images
@dataclass
class ImageMatches:
    """pycocotools' per-image matching of one model's detections (area "all", 100 detections per image and
    category), kept so that COCO AP can be recomputed on any resample of the images without matching again.

    For each category id, detections in descending score order: ``image[d]`` (the image index of detection ``d``),
    ``true_positives[t]`` (the indices of the detections matched at IoU threshold ``t``), ``counted[t, d]`` (False
    for a detection pycocotools ignores at that threshold; ``None`` when none is ignored) and ``num_gt[i]`` (the
    non-ignored ground truths of image ``i``)."""

    image_ids: list
    categories: dict  # category id -> name
    per_category: dict  # category id -> (image [D], true_positives [T arrays], counted [T, D] or None, num_gt [I])
    recall_thresholds: np.ndarray

    def category_ap(self, weights: np.ndarray | None = None) -> dict:
        """AP50-95 of each category with ground truth in the (re)sample ``weights`` (the number of times each image
        is drawn; all ones is the data set itself, which gives pycocotools' figures), category id -> AP.

        Precision only rises at a true positive, so the interpolated precision at a recall threshold (the
        largest precision at that recall or beyond) is read at true positives alone: per threshold, the work is
        in the matched detections; only the running count of all detections goes over the whole list."""
        weights = np.ones(len(self.image_ids)) if weights is None else np.asarray(weights, dtype=float)
        out = {}
        for cat, (image, true_positives, counted, num_gt) in self.per_category.items():
            positives = float(num_gt @ weights)
            if positives == 0:
                continue  # pycocotools leaves such a category out
            w = weights[image]
            seen = np.cumsum(w) if counted is None else None  # detections up to and including each one
            ap = []
            for t, hits in enumerate(true_positives):
                if hits.size == 0:
                    ap.append(0.0)
                    continue
                upto = seen[hits] if counted is None else np.cumsum(w * counted[t])[hits]
                found = np.cumsum(w[hits])
                precision = found / (upto + np.spacing(1))
                precision = np.maximum.accumulate(precision[::-1])[::-1]  # the PR envelope
                at = np.searchsorted(found / positives, self.recall_thresholds, side="left")
                ap.append(float(np.where(at < len(precision), precision[np.minimum(at, len(precision) - 1)], 0.0).mean()))
            out[cat] = float(np.mean(ap))
        return out


def match_per_image(gt, detections: Sequence[Mapping], category_ids: Sequence[int] | None = None,
                    max_dets: int = 100) -> ImageMatches:
    """Match ``detections`` to ``gt`` per image with pycocotools (the matching :func:`coco_evaluate` scores), for
    :func:`bootstrap_map`. ``ImageMatches.category_ap()`` on all images equals ``coco_evaluate``'s per-category AP."""
    from pycocotools.cocoeval import COCOeval

    coco_gt = load_coco(gt)
    categories = sorted(coco_gt.getCatIds()) if category_ids is None else [int(c) for c in category_ids]
    images = sorted(coco_gt.getImgIds())
    results = [dict(d) for d in detections]
    _check_detections(results, set(images), set(coco_gt.getCatIds()), "bbox")
    names = {c["id"]: c["name"] for c in coco_gt.loadCats(categories)}
    index_of = {img: i for i, img in enumerate(images)}
    thresholds = 10  # IoU 0.50:0.05:0.95
    nothing = (np.zeros(0, dtype=int), [np.zeros(0, dtype=int)] * thresholds, None)
    per_category = {}
    if not results:  # nothing detected (loadRes cannot take an empty list): every category with ground truth has AP 0
        for cat in categories:
            num_gt = np.array([len(coco_gt.getAnnIds(imgIds=[img], catIds=[cat], iscrowd=False)) for img in images],
                              dtype=float)
            per_category[cat] = (*nothing, num_gt)
        return ImageMatches(images, names, per_category, np.linspace(0.0, 1.0, 101))
    with _quiet(True):
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(results), "bbox")
    evaluator.params.catIds, evaluator.params.imgIds = categories, images
    evaluator.params.maxDets = [max_dets]
    evaluator.params.areaRng, evaluator.params.areaRngLbl = evaluator.params.areaRng[:1], ["all"]
    with _quiet(True):
        evaluator.evaluate()
    num_images = len(images)
    for k, cat in enumerate(categories):
        found = [e for e in evaluator.evalImgs[k * num_images:(k + 1) * num_images] if e is not None]
        num_gt = np.zeros(num_images)
        for e in found:
            num_gt[index_of[e["image_id"]]] = np.count_nonzero(np.asarray(e["gtIgnore"]) == 0)
        scores = [np.asarray(e["dtScores"][:max_dets]) for e in found]
        if not sum(len(x) for x in scores):
            per_category[cat] = (*nothing, num_gt)
            continue
        image = np.concatenate([np.full(len(x), index_of[e["image_id"]]) for x, e in zip(scores, found)]).astype(int)
        matched = np.concatenate([e["dtMatches"][:, :max_dets] for e in found], axis=1) > 0
        ignored = np.concatenate([e["dtIgnore"][:, :max_dets] for e in found], axis=1) > 0
        order = np.argsort(-np.concatenate(scores), kind="mergesort")  # pycocotools' order, ties included
        image, matched, ignored = image[order], matched[:, order], ignored[:, order]
        true_positives = [np.flatnonzero(m & ~i) for m, i in zip(matched, ignored)]
        per_category[cat] = (image, true_positives, ~ignored if ignored.any() else None, num_gt)
    return ImageMatches(images, names, per_category, np.asarray(evaluator.params.recThrs))


def bootstrap_map(matches: Mapping[str, ImageMatches], groups: Mapping[str, Sequence[int]], resamples: int = 1000,
                  seed: int = 0) -> dict:
    """Mean AP50-95 over each group of category ids, for every model, on ``resamples`` bootstrap resamples of the
    images (drawn with replacement, the *same* resample for every model, so differences between models are paired).

    Returns ``{model: {group: array of the resamples' figures}}``; the full set's own figure is
    ``ImageMatches.category_ap()`` (equal to :func:`coco_evaluate`'s).
    """
    models = list(matches)
    if not models:
        raise ValueError("bootstrap_map needs at least one model's matches")
    images = matches[models[0]].image_ids
    for name in models[1:]:
        if matches[name].image_ids != images:
            raise ValueError(f"model {name!r} was matched on other images than {models[0]!r}: resamples must be paired")
    rng = np.random.default_rng(seed)
    out = {name: {group: np.empty(resamples) for group in groups} for name in models}
    for r in range(resamples):
        weights = np.bincount(rng.integers(0, len(images), len(images)), minlength=len(images)).astype(float)
        for name in models:
            ap = matches[name].category_ap(weights)
            for group, cats in groups.items():
                values = [ap[c] for c in cats if c in ap]
                out[name][group][r] = np.mean(values) if values else np.nan
    return out


def detections_from_tensors(
    image_ids: Sequence[int],
    boxes_xyxy: Sequence,
    scores: Sequence,
    labels: Sequence,
    label_to_category: Mapping[int, int] | Callable[[int], int] | None = None,
) -> list[dict]:
    """COCO result dicts from per-image predictions.

    Args:
        image_ids: the COCO image id of each image (see :func:`image_id_by_filename`).
        boxes_xyxy: per image, an ``[N, 4]`` tensor or array of ``x0, y0, x1, y1`` in pixels of the
            annotated image size.
        scores: per image, ``[N]`` confidences.
        labels: per image, ``[N]`` class indices.
        label_to_category: class index -> COCO category id, as a dict or a callable. Default
            ``label + 1`` (the synthetic data's convention).

    Returns:
        A list of dicts with ``image_id``, ``category_id``, ``bbox`` ``[x, y, w, h]`` and ``score``.
    """
    if not (len(image_ids) == len(boxes_xyxy) == len(scores) == len(labels)):
        raise ValueError(f"one entry per image expected: got {len(image_ids)} image_ids, {len(boxes_xyxy)} "
                         f"boxes, {len(scores)} scores, {len(labels)} labels")
    to_category = _category_mapper(label_to_category)
    detections = []
    for image_id, boxes, image_scores, image_labels in zip(image_ids, boxes_xyxy, scores, labels):
        boxes = _to_numpy(boxes, np.float64).reshape(-1, 4) if _numel(boxes) else np.zeros((0, 4))
        image_scores = _to_numpy(image_scores, np.float64).reshape(-1)
        image_labels = _to_numpy(image_labels, np.int64).reshape(-1)
        if not (len(boxes) == len(image_scores) == len(image_labels)):
            raise ValueError(f"image {image_id}: {len(boxes)} boxes, {len(image_scores)} scores and "
                             f"{len(image_labels)} labels must have the same length")
        for (x0, y0, x1, y1), score, label in zip(boxes.tolist(), image_scores.tolist(), image_labels.tolist()):
            detections.append({"image_id": int(image_id), "category_id": to_category(int(label)),
                               "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(score)})
    return detections


def image_id_by_filename(gt) -> dict[str, int]:
    """Image file stem (``"000012"`` for ``000012.jpg``) -> COCO image id, for a COCO annotation file."""
    coco = load_coco(gt)
    mapping: dict[str, int] = {}
    for image in coco.dataset.get("images", []):
        stem = Path(image["file_name"]).stem
        if stem in mapping:
            raise ValueError(f"two images share the file stem {stem!r} in the ground truth: "
                             f"ids {mapping[stem]} and {image['id']}")
        mapping[stem] = int(image["id"])
    return mapping


# ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet(enabled: bool):
    if not enabled:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _nan_if_missing(value) -> float:
    value = float(value)
    return math.nan if value == -1 else value


def _check_detections(results, known_images, known_categories, iou_type) -> None:
    required = ("image_id", "category_id", "score", "bbox" if iou_type == "bbox" else "segmentation")
    for i, det in enumerate(results):
        missing = [k for k in required if k not in det]
        if missing:
            raise ValueError(f"detection {i} lacks {missing}: {det}")
    bad_images = sorted({d["image_id"] for d in results} - known_images)
    if bad_images:
        raise ValueError(f"detections refer to image ids not in the ground truth: {bad_images[:10]} "
                         "(map file names to ids with image_id_by_filename)")
    bad_categories = sorted({d["category_id"] for d in results} - known_categories)
    if bad_categories:
        raise ValueError(f"detections refer to category ids not in the ground truth: {bad_categories} "
                         f"(known: {sorted(known_categories)}; the synthetic data uses class index + 1)")


def _zero_result(coco_gt, categories, images, names) -> EvalResult:
    annotated = {a["category_id"] for a in coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=images, catIds=categories))}
    per_category = {names[c]: 0.0 for c in categories if c in annotated}
    return EvalResult(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, per_category=per_category,
                      per_category_ap50=dict(per_category), num_images=len(images), num_detections=0,
                      stats=[0.0] * len(_STAT_NAMES))


def _category_mapper(label_to_category):
    if label_to_category is None:
        return lambda label: label + 1
    if isinstance(label_to_category, Mapping):
        def lookup(label):
            try:
                return int(label_to_category[label])
            except KeyError:
                raise ValueError(f"label {label} is not in `label_to_category` "
                                 f"(keys: {sorted(label_to_category)})") from None
        return lookup
    if callable(label_to_category):
        return lambda label: int(label_to_category(label))
    raise TypeError(f"`label_to_category` must be None, a dict or a callable, got {type(label_to_category).__name__}")


def _numel(x) -> int:
    return int(np.prod(getattr(x, "shape", None) or np.shape(x)))


def _to_numpy(x, dtype) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)
