"""Deterministic synthetic object-detection data, written in both YOLO and COCO layouts.

No data set can be downloaded on the machines this project runs on, so tests, examples and benchmarks
train on images drawn here. What an image holds:

* **Objects** of up to 8 classes that differ by *shape or texture, never by colour* (every object gets
  random colours): ``circle`` (filled disc), ``triangle``, ``striped_square`` (square with stripes in a
  second colour), ``ring`` (annulus), ``cross``, ``ellipse`` (elongated, rotated), ``star`` (five points)
  and ``checker`` (checkerboard patch). Shapes are randomly rotated.
* **Several scales**: about a third of the objects are small (8-16 px at ``imgsz=320``), the rest are
  log-uniform up to ~35 % of the image side. Sizes scale with ``imgsz``.
* **Long-tailed class frequency**: class ``k`` is drawn with probability proportional to
  ``LONG_TAIL_RATIO ** k`` (0.72), so with 8 classes the most frequent class is ~10x as common as the
  rarest. Class 0 is the head of the distribution, the last class the tail.
* **Partial occlusion**: objects are painted in sequence and may cover up to ``MAX_OCCLUSION`` (35 %) of
  an earlier object's box; boxes are amodal (the object's full extent, as in COCO).
* **Clutter**: a smooth random-noise background, distractor lines and irregular blobs that are not
  objects, and pixel noise.

Layouts (``root`` is the directory given to :func:`make_synthetic_dataset`)::

    root/images/{train,val}/000000.jpg
    root/labels/{train,val}/000000.txt          # YOLO: "class cx cy w h", normalised to [0, 1]
    root/data.yaml                              # Ultralytics: absolute ``path``, ``names``
    root/annotations/instances_{train,val}.json # COCO: bbox [x, y, w, h] in pixels
    root/meta.json                              # generation parameters; makes regeneration idempotent

COCO ``category_id = class_index + 1`` (ids 1..K, names as in ``classes``); COCO ``image_id`` is the
image's position in its split plus one, and ``file_name`` is relative to the split's image directory.

Example::

    from detq_hooks.tools.data import make_synthetic_dataset
    ds = make_synthetic_dataset("/tmp/synth", num_train=256, num_val=64, imgsz=320, seed=0)
    YOLO("yolo11n.yaml").train(data=str(ds.yolo_yaml), imgsz=ds.imgsz)
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = [
    "CLASS_NAMES",
    "GENERATOR_VERSION",
    "SynthDataset",
    "class_probabilities",
    "load_synthetic_dataset",
    "make_synthetic_dataset",
]

# Bump whenever a change to the drawing code changes the images or labels: cached data sets
# (and float checkpoints trained on them) are keyed on it and regenerate.
GENERATOR_VERSION = 1

CLASS_NAMES = ("circle", "triangle", "striped_square", "ring", "cross", "ellipse", "star", "checker")
LONG_TAIL_RATIO = 0.72
MAX_OCCLUSION = 0.35
MIN_IMGSZ = 64
SMALL_OBJECT_FRACTION = 0.3
OBJECTS_PER_IMAGE = (3, 10)  # inclusive range
_SUPERSAMPLE = 2  # shapes are drawn at 2x and downsampled, so small objects keep their outline
_REFERENCE_IMGSZ = 320  # object sizes below are given at this resolution and scale with imgsz
_MANAGED = ("images", "labels", "annotations", "data.yaml", "meta.json")


@dataclass(frozen=True)
class SynthDataset:
    """Where a generated data set lives and how it was made (returned by :func:`make_synthetic_dataset`)."""

    root: Path
    imgsz: int
    num_train: int
    num_val: int
    seed: int
    classes: list

    @property
    def yolo_yaml(self) -> Path:
        return self.root / "data.yaml"

    @property
    def coco_train_json(self) -> Path:
        return self.root / "annotations" / "instances_train.json"

    @property
    def coco_val_json(self) -> Path:
        return self.root / "annotations" / "instances_val.json"

    @property
    def train_images(self) -> Path:
        return self.root / "images" / "train"

    @property
    def val_images(self) -> Path:
        return self.root / "images" / "val"

    @property
    def train_labels(self) -> Path:
        return self.root / "labels" / "train"

    @property
    def val_labels(self) -> Path:
        return self.root / "labels" / "val"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def coco_json(self, split: str) -> Path:
        """COCO annotation file of ``split`` ("train" or "val")."""
        return self.root / "annotations" / f"instances_{_check_split(split)}.json"

    def images_dir(self, split: str) -> Path:
        return self.root / "images" / _check_split(split)

    def params(self) -> dict:
        """The generation parameters, as stored in ``meta.json`` (a stable key for caches)."""
        return _params(self.imgsz, self.num_train, self.num_val, self.seed, len(self.classes))


def class_probabilities(num_classes: int = len(CLASS_NAMES)) -> np.ndarray:
    """Sampling probability of each class: geometric decay ``LONG_TAIL_RATIO ** k``, normalised."""
    weights = LONG_TAIL_RATIO ** np.arange(num_classes, dtype=np.float64)
    return weights / weights.sum()


def make_synthetic_dataset(
    root,
    num_train: int = 256,
    num_val: int = 64,
    imgsz: int = 320,
    seed: int = 0,
    num_classes: int | None = None,
) -> SynthDataset:
    """Generate (or reuse) a synthetic detection data set under ``root`` in YOLO and COCO layouts.

    Deterministic: the same arguments give byte-identical labels and annotations (each image is drawn
    from its own random stream keyed on ``seed``, split and index). Idempotent: if ``root/meta.json``
    records the same parameters and generator version, nothing is redrawn; if they differ, the files
    this function owns (``images/``, ``labels/``, ``annotations/``, ``data.yaml``, ``meta.json``) are
    removed and the set is drawn again. Other files under ``root`` are left alone.

    Args:
        root: output directory (created if missing).
        num_train: number of training images (>= 1).
        num_val: number of validation images (>= 1).
        imgsz: side of the square images in pixels (>= 64).
        seed: random seed.
        num_classes: use the first ``num_classes`` of :data:`CLASS_NAMES` (1..8); ``None`` means all.

    Returns:
        A :class:`SynthDataset` with the paths of both layouts.

    Example::

        ds = make_synthetic_dataset("/tmp/synth", num_train=64, num_val=16, imgsz=256)
        ds.yolo_yaml, ds.coco_val_json, ds.classes
    """
    num_classes = len(CLASS_NAMES) if num_classes is None else num_classes
    _validate(num_train, num_val, imgsz, seed, num_classes)
    root = Path(root).expanduser().resolve()
    params = _params(imgsz, num_train, num_val, seed, num_classes)
    dataset = SynthDataset(root, imgsz, num_train, num_val, seed, list(CLASS_NAMES[:num_classes]))

    if _read_meta(root) == params and _files_present(dataset):
        return dataset

    root.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(root / ".generate.lock"):  # two processes asking for the same root draw it once
        if _read_meta(root) == params and _files_present(dataset):
            return dataset
        for name in _MANAGED:  # a different or interrupted generation: start clean
            path = root / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        for split, count in (("train", num_train), ("val", num_val)):
            _write_split(dataset, split, count)
        _write_data_yaml(dataset)
        # meta.json last: its presence marks a complete generation
        (root / "meta.json").write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")
    return dataset


def load_synthetic_dataset(root) -> SynthDataset:
    """Open a data set written by :func:`make_synthetic_dataset`, reading its ``meta.json``."""
    root = Path(root).expanduser().resolve()
    params = _read_meta(root)
    if params is None:
        raise FileNotFoundError(f"{root / 'meta.json'} is missing or unreadable: generate the data set with "
                                "make_synthetic_dataset(root, ...) first")
    if params.get("generator_version") != GENERATOR_VERSION:
        raise ValueError(f"{root} was written by synthetic-data generator version "
                         f"{params.get('generator_version')!r}, this is version {GENERATOR_VERSION}: "
                         "regenerate it with make_synthetic_dataset")
    dataset = SynthDataset(root, params["imgsz"], params["num_train"], params["num_val"], params["seed"],
                           list(CLASS_NAMES[: params["num_classes"]]))
    if not _files_present(dataset):
        raise FileNotFoundError(f"{root} has a meta.json but its images or annotations are missing: "
                                "regenerate it with make_synthetic_dataset")
    return dataset


# ----------------------------------------------------------------------------------------------------
# parameters and files


@contextlib.contextmanager
def exclusive_lock(lock_path: Path):
    """Hold an exclusive inter-process lock on ``lock_path`` (created, never modified) for the block."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock; concurrent generation of one root is then the caller's problem
        yield
        return
    with open(lock_path, "a") as handle:  # "a": no truncation, so the file's mtime stays put
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _validate(num_train, num_val, imgsz, seed, num_classes) -> None:
    for name, value, low in (("num_train", num_train, 1), ("num_val", num_val, 1), ("imgsz", imgsz, MIN_IMGSZ),
                             ("num_classes", num_classes, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"`{name}` must be an int, got {value!r}")
        if value < low:
            why = " (small objects would be under 2 px)" if name == "imgsz" else ""
            raise ValueError(f"`{name}` must be >= {low}{why}, got {value}")
    if num_classes > len(CLASS_NAMES):
        raise ValueError(f"`num_classes` must be <= {len(CLASS_NAMES)} (the shapes are {', '.join(CLASS_NAMES)}), "
                         f"got {num_classes}")


def _params(imgsz, num_train, num_val, seed, num_classes) -> dict:
    return {"generator_version": GENERATOR_VERSION, "imgsz": int(imgsz), "num_train": int(num_train),
            "num_val": int(num_val), "seed": int(seed), "num_classes": int(num_classes)}


def _check_split(split: str) -> str:
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    return split


def _read_meta(root: Path) -> dict | None:
    try:
        return json.loads((root / "meta.json").read_text())
    except (OSError, ValueError):
        return None


def _files_present(ds: SynthDataset) -> bool:
    return all(p.exists() for p in (ds.yolo_yaml, ds.coco_train_json, ds.coco_val_json, ds.train_images,
                                    ds.val_images, ds.train_labels, ds.val_labels))


def _image_name(index: int) -> str:
    return f"{index:06d}"


def _write_split(ds: SynthDataset, split: str, count: int) -> None:
    images_dir, labels_dir = ds.images_dir(split), ds.root / "labels" / split
    images_dir.mkdir(parents=True, exist_ok=True)
    labels_dir.mkdir(parents=True, exist_ok=True)
    split_key = {"train": 0, "val": 1}[split]
    coco_images, coco_annotations = [], []
    for index in range(count):
        rng = np.random.default_rng([ds.seed, split_key, index])
        image, objects = _draw_image(rng, ds.imgsz, len(ds.classes))
        stem = _image_name(index)
        Image.fromarray(image).save(images_dir / f"{stem}.jpg", quality=92)
        lines = []
        image_id = index + 1
        coco_images.append({"id": image_id, "file_name": f"{stem}.jpg", "width": ds.imgsz, "height": ds.imgsz})
        for cls, (x0, y0, x1, y1) in objects:
            w, h = x1 - x0, y1 - y0
            lines.append(f"{cls} {(x0 + w / 2) / ds.imgsz:.6f} {(y0 + h / 2) / ds.imgsz:.6f} "
                         f"{w / ds.imgsz:.6f} {h / ds.imgsz:.6f}")
            coco_annotations.append({"id": len(coco_annotations) + 1, "image_id": image_id,
                                     "category_id": cls + 1, "bbox": [x0, y0, w, h], "area": w * h,
                                     "iscrowd": 0})
        (labels_dir / f"{stem}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
    coco = {
        "info": {"description": f"detq-hooks synthetic detection data ({split})",
                 "version": str(GENERATOR_VERSION)},
        "licenses": [],
        "images": coco_images,
        "annotations": coco_annotations,
        "categories": [{"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(ds.classes)],
    }
    ds.coco_json(split).parent.mkdir(parents=True, exist_ok=True)
    ds.coco_json(split).write_text(json.dumps(coco))


def _write_data_yaml(ds: SynthDataset) -> None:
    import yaml

    content = {"path": str(ds.root), "train": "images/train", "val": "images/val",
               "names": {k: name for k, name in enumerate(ds.classes)}}
    ds.yolo_yaml.write_text(yaml.safe_dump(content, sort_keys=False))


# ----------------------------------------------------------------------------------------------------
# drawing


def _draw_image(rng: np.random.Generator, imgsz: int, num_classes: int):
    """One image (uint8 HxWx3) and its objects as ``[(class, (x0, y0, x1, y1)), ...]`` in integer pixels."""
    image = _background(rng, imgsz)
    _draw_distractors(rng, image, imgsz)
    probs = class_probabilities(num_classes)
    boxes, objects = [], []
    for _ in range(int(rng.integers(OBJECTS_PER_IMAGE[0], OBJECTS_PER_IMAGE[1] + 1))):
        cls = int(rng.choice(num_classes, p=probs))
        side = _object_size(rng, imgsz)
        alpha, texture = _shape(rng, CLASS_NAMES[cls], side)
        ys, xs = np.nonzero(alpha > 0.5)
        if len(xs) == 0:
            continue
        # tight box of the drawn shape, relative to the patch
        bx0, by0, bx1, by1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        placed = _place(rng, imgsz, alpha.shape, (bx0, by0, bx1, by1), boxes)
        if placed is None:
            continue
        px, py = placed
        _composite(rng, image, alpha, texture, px, py)
        box = (int(px + bx0), int(py + by0), int(px + bx1), int(py + by1))
        boxes.append(box)
        objects.append((cls, box))
    noise_sigma = rng.uniform(2.0, 10.0)
    image = image + noise_sigma * rng.standard_normal(image.shape, dtype=np.float32)
    return np.clip(image, 0, 255).astype(np.uint8), objects


def _background(rng, imgsz):
    """Smooth coloured noise at two frequencies, so there is no flat background to key on."""
    def noise(cells, amplitude):
        grid = rng.random((cells, cells, 3)).astype(np.float32)
        up = Image.fromarray((grid * 255).astype(np.uint8)).resize((imgsz, imgsz), Image.BICUBIC)
        return (np.asarray(up, np.float32) / 255.0 - 0.5) * amplitude

    base = rng.uniform(40, 215, size=3).astype(np.float32)
    image = base + noise(int(rng.integers(2, 5)), rng.uniform(60, 160)) + noise(int(rng.integers(12, 30)),
                                                                                    rng.uniform(20, 60))
    return np.clip(image, 0, 255)


def _draw_distractors(rng, image, imgsz):
    """Lines and irregular blobs that are not objects (the detector must learn to ignore them)."""
    scale = imgsz / _REFERENCE_IMGSZ
    canvas = Image.fromarray(image.astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(2, 9))):
        x0, y0 = rng.uniform(0, imgsz, 2)
        angle, length = rng.uniform(0, 2 * math.pi), rng.uniform(20, 160) * scale
        draw.line([(x0, y0), (x0 + length * math.cos(angle), y0 + length * math.sin(angle))],
                  fill=tuple(int(c) for c in rng.integers(0, 256, 3)), width=int(rng.integers(1, 4)))
    for _ in range(int(rng.integers(1, 6))):
        cx, cy = rng.uniform(0, imgsz, 2)
        radius = rng.uniform(6, 30) * scale
        vertices = int(rng.integers(6, 11))
        angles = np.sort(rng.uniform(0, 2 * math.pi, vertices))
        radii = radius * rng.uniform(0.6, 1.0, vertices)  # lumpy, not spiky: no look-alike of star/triangle
        points = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a, r in zip(angles, radii)]
        draw.polygon(points, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    blurred = canvas.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.0, 1.0))))
    image[...] = np.asarray(blurred, np.float32)


def _object_size(rng, imgsz):
    """Side of the object's bounding square in pixels: a third small (8-16 px at 320), the rest log-uniform."""
    scale = imgsz / _REFERENCE_IMGSZ
    if rng.random() < SMALL_OBJECT_FRACTION:
        side = rng.uniform(9, 16)
    else:
        side = math.exp(rng.uniform(math.log(16), math.log(0.35 * _REFERENCE_IMGSZ)))
    return max(4.0, side * scale)


def _polygon(radii, angles, rotation, centre, radius):
    return [(centre + radius * r * math.cos(a + rotation), centre + radius * r * math.sin(a + rotation))
            for r, a in zip(radii, angles)]


def _shape(rng, name, side):
    """Alpha mask (float32 in [0, 1]) and texture kind of one object, on a square patch around it.

    The texture is ``None`` for a single colour, or ``("stripes"|"checker", period, angle)``.
    """
    ss = _SUPERSAMPLE
    patch = int(math.ceil(side)) + 2
    size = patch * ss
    centre, radius = size / 2, side * ss / 2
    rotation = rng.uniform(0, 2 * math.pi)
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    texture = None
    if name == "circle":
        draw.ellipse([centre - radius, centre - radius, centre + radius, centre + radius], fill=255)
    elif name == "ring":
        draw.ellipse([centre - radius, centre - radius, centre + radius, centre + radius], fill=255)
        inner = radius * rng.uniform(0.45, 0.65)
        draw.ellipse([centre - inner, centre - inner, centre + inner, centre + inner], fill=0)
    elif name == "ellipse":
        minor = rng.uniform(0.35, 0.6)
        angles = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        pts = [(math.cos(a), minor * math.sin(a)) for a in angles]
        draw.polygon([(centre + radius * (x * math.cos(rotation) - y * math.sin(rotation)),
                       centre + radius * (x * math.sin(rotation) + y * math.cos(rotation))) for x, y in pts],
                     fill=255)
    elif name == "triangle":
        angles = np.array([0, 2 * math.pi / 3, 4 * math.pi / 3]) + rng.uniform(-0.25, 0.25, 3)
        draw.polygon(_polygon(np.ones(3), angles, rotation, centre, radius), fill=255)
    elif name == "star":
        angles = np.arange(10) * math.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, rng.uniform(0.38, 0.5))
        draw.polygon(_polygon(radii, angles, rotation, centre, radius), fill=255)
    elif name == "cross":
        arm = rng.uniform(0.28, 0.4)
        outline = [(arm, 1), (arm, arm), (1, arm), (1, -arm), (arm, -arm), (arm, -1),
                   (-arm, -1), (-arm, -arm), (-1, -arm), (-1, arm), (-arm, arm), (-arm, 1)]
        radius_c = radius * 0.72  # so the arms' reach matches the other classes' size
        draw.polygon([(centre + radius_c * (x * math.cos(rotation) - y * math.sin(rotation)),
                       centre + radius_c * (x * math.sin(rotation) + y * math.cos(rotation))) for x, y in outline],
                     fill=255)
    elif name in ("striped_square", "checker"):
        angles = np.arange(4) * math.pi / 2 + math.pi / 4
        draw.polygon(_polygon(np.ones(4), angles, rotation, centre, radius), fill=255)
        cells = rng.uniform(4, 6) if name == "striped_square" else rng.uniform(3, 5)
        period = max(2.0, side * math.sqrt(0.5) / cells)  # the square's side is side / sqrt(2)
        texture = ("stripes" if name == "striped_square" else "checker", period, rotation + math.pi / 4)
    else:  # pragma: no cover - CLASS_NAMES and this function are kept together
        raise ValueError(f"no drawing for class {name!r}")
    alpha = np.asarray(mask.resize((patch, patch), Image.BOX), np.float32) / 255.0
    return alpha, texture


def _place(rng, imgsz, patch_shape, box_in_patch, boxes):
    """Top-left corner for the patch so its box lies inside the image and occludes at most MAX_OCCLUSION."""
    ph, pw = patch_shape
    bx0, by0, bx1, by1 = box_in_patch
    for _ in range(20):
        px = int(rng.integers(-bx0, imgsz - bx1 + 1))
        py = int(rng.integers(-by0, imgsz - by1 + 1))
        new = (px + bx0, py + by0, px + bx1, py + by1)
        if all(_occlusion_ok(new, old) for old in boxes):
            return px, py
    return None


def _occlusion_ok(a, b):
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return True
    inter = iw * ih
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    return inter <= MAX_OCCLUSION * area_a and inter <= MAX_OCCLUSION * area_b


def _contrasting_colour(rng, reference, min_distance=90.0):
    """A random colour at least ``min_distance`` (L2, RGB) from ``reference``, so objects stay visible."""
    colour = rng.uniform(0, 255, 3)
    for _ in range(10):
        if np.linalg.norm(colour - reference) >= min_distance:
            break
        colour = rng.uniform(0, 255, 3)
    return colour.astype(np.float32)


def _composite(rng, image, alpha, texture, px, py):
    """Paint the object on ``image`` (in place), clipping the patch at the image border."""
    h, w = alpha.shape
    imgsz = image.shape[0]
    x0, y0, x1, y1 = max(px, 0), max(py, 0), min(px + w, imgsz), min(py + h, imgsz)
    a = alpha[y0 - py:y1 - py, x0 - px:x1 - px, None]
    region = image[y0:y1, x0:x1]
    background = region.reshape(-1, 3).mean(0)
    colour = _contrasting_colour(rng, background)
    fill = np.broadcast_to(colour, region.shape).copy()
    if texture is not None:
        kind, period, angle = texture
        second = _contrasting_colour(rng, colour, min_distance=110.0)
        yy, xx = np.mgrid[y0 - py:y1 - py, x0 - px:x1 - px].astype(np.float32)
        u = (xx * math.cos(angle) + yy * math.sin(angle)) / period
        v = (-xx * math.sin(angle) + yy * math.cos(angle)) / period
        odd = (np.floor(u) % 2 == 1) if kind == "stripes" else ((np.floor(u) + np.floor(v)) % 2 == 1)
        fill[odd] = second
    # soft shading, so a shape is not one flat colour
    shade = 1.0 + rng.uniform(-0.15, 0.15) * np.linspace(-1, 1, region.shape[1], dtype=np.float32)[None, :, None]
    image[y0:y1, x0:x1] = region * (1 - a) + np.clip(fill * shade, 0, 255) * a
