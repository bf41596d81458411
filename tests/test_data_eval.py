"""Synthetic detection data (detq_hooks.tools.data) and COCO evaluation (detq_hooks.evaluation)."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from detq_hooks.tools.data import (
    CLASS_NAMES,
    GENERATOR_VERSION,
    class_probabilities,
    load_synthetic_dataset,
    make_synthetic_dataset,
)
from detq_hooks.evaluation import (
    EvalResult,
    bootstrap_map,
    coco_evaluate,
    detections_from_tensors,
    image_id_by_filename,
    match_per_image,
)

SMALL = dict(num_train=24, num_val=8, imgsz=160)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("synth") / "ds", num_train=48, num_val=24, imgsz=320,
                                  seed=0)


def _labels(split_dir: Path) -> dict:
    return {p.name: p.read_text() for p in sorted(split_dir.glob("*.txt"))}


def _gt_as_detections(coco_json: Path) -> list:
    data = json.loads(coco_json.read_text())
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": 1.0}
            for a in data["annotations"]]


# ---------------------------------------------------------------------------------------------------- data


def test_layout_and_api(dataset):
    assert dataset.root.is_absolute()
    assert dataset.classes == list(CLASS_NAMES)
    assert (dataset.imgsz, dataset.num_train, dataset.num_val) == (320, 48, 24)
    assert len(list(dataset.train_images.glob("*.jpg"))) == 48
    assert len(list(dataset.val_images.glob("*.jpg"))) == 24
    assert len(list((dataset.root / "labels" / "train").glob("*.txt"))) == 48
    meta = json.loads((dataset.root / "meta.json").read_text())
    assert meta["generator_version"] == GENERATOR_VERSION and meta["seed"] == 0
    assert load_synthetic_dataset(dataset.root) == dataset
    coco = json.loads(dataset.coco_train_json.read_text())
    assert [c["id"] for c in coco["categories"]] == list(range(1, len(CLASS_NAMES) + 1))
    assert [c["name"] for c in coco["categories"]] == list(CLASS_NAMES)
    for image in coco["images"]:
        assert (dataset.train_images / image["file_name"]).is_file()
        assert image["width"] == image["height"] == 320
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        assert ann["iscrowd"] == 0 and ann["area"] == pytest.approx(w * h)
        assert 0 <= x and 0 <= y and x + w <= 320 and y + h <= 320 and w > 0 and h > 0


def test_same_seed_same_labels_other_seed_differs(tmp_path, dataset):
    a = make_synthetic_dataset(tmp_path / "a", seed=3, **SMALL)
    b = make_synthetic_dataset(tmp_path / "b", seed=3, **SMALL)
    c = make_synthetic_dataset(tmp_path / "c", seed=4, **SMALL)
    for split in ("train", "val"):
        assert _labels(a.root / "labels" / split) == _labels(b.root / "labels" / split)
        assert _labels(a.root / "labels" / split) != _labels(c.root / "labels" / split)
    assert a.coco_train_json.read_bytes() == b.coco_train_json.read_bytes()
    assert a.coco_val_json.read_bytes() == b.coco_val_json.read_bytes()
    assert (a.train_images / "000000.jpg").read_bytes() == (b.train_images / "000000.jpg").read_bytes()


def test_second_call_reuses_files(tmp_path):
    first = make_synthetic_dataset(tmp_path / "d", seed=1, **SMALL)
    files = [p for p in first.root.rglob("*") if p.is_file()]
    stamps = {p: p.stat().st_mtime_ns for p in files}
    second = make_synthetic_dataset(tmp_path / "d", seed=1, **SMALL)
    assert second == first
    assert {p: p.stat().st_mtime_ns for p in files} == stamps
    assert sorted(p for p in second.root.rglob("*") if p.is_file()) == sorted(files)


def test_changed_parameters_regenerate_cleanly(tmp_path):
    root = tmp_path / "d"
    make_synthetic_dataset(root, seed=1, **SMALL)
    unrelated = root / "notes.txt"
    unrelated.write_text("keep me")
    smaller = make_synthetic_dataset(root, seed=1, num_train=10, num_val=4, imgsz=128)
    assert len(list(smaller.train_images.glob("*.jpg"))) == 10  # the 24 old images are gone
    assert len(list((root / "labels" / "train").glob("*.txt"))) == 10
    assert len(json.loads(smaller.coco_train_json.read_text())["images"]) == 10
    assert json.loads((root / "meta.json").read_text())["imgsz"] == 128
    assert unrelated.read_text() == "keep me"
    # an interrupted generation (meta.json missing) is redone rather than trusted
    (root / "meta.json").unlink()
    make_synthetic_dataset(root, seed=1, num_train=10, num_val=4, imgsz=128)
    assert (root / "meta.json").is_file()


def test_concurrent_calls_draw_one_complete_set(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(lambda _: make_synthetic_dataset(tmp_path / "shared", seed=2, num_train=8, num_val=2,
                                                         imgsz=96), range(2))
    assert a == b
    assert len(list(a.train_images.glob("*.jpg"))) == 8
    assert len(json.loads(a.coco_train_json.read_text())["images"]) == 8
    reference = make_synthetic_dataset(tmp_path / "alone", seed=2, num_train=8, num_val=2, imgsz=96)
    assert _labels(a.root / "labels" / "train") == _labels(reference.root / "labels" / "train")


def test_yolo_labels_match_coco_boxes(dataset):
    for split in ("train", "val"):
        coco = json.loads(dataset.coco_json(split).read_text())
        by_image = {}
        for ann in coco["annotations"]:
            by_image.setdefault(ann["image_id"], []).append(ann)
        for image in coco["images"]:
            label_file = dataset.root / "labels" / split / (Path(image["file_name"]).stem + ".txt")
            rows = [list(map(float, line.split())) for line in label_file.read_text().splitlines()]
            anns = by_image.get(image["id"], [])
            assert len(rows) == len(anns) > 0
            for (cls, cx, cy, w, h), ann in zip(rows, anns):
                x, y, bw, bh = ann["bbox"]
                assert int(cls) + 1 == ann["category_id"]
                s = dataset.imgsz
                np.testing.assert_allclose([cx * s, cy * s, w * s, h * s], [x + bw / 2, y + bh / 2, bw, bh], atol=1e-3)


def test_long_tail_and_small_objects(dataset):
    anns = json.loads(dataset.coco_train_json.read_text())["annotations"]
    anns += json.loads(dataset.coco_val_json.read_text())["annotations"]
    counts = Counter(a["category_id"] for a in anns)
    assert set(counts) == set(range(1, len(CLASS_NAMES) + 1))  # every class appears
    assert counts.most_common()[0][1] >= 3 * min(counts.values())
    assert counts[1] == counts.most_common()[0][1]  # class 0 is the head of the distribution
    probs = class_probabilities()
    assert probs[0] / probs[-1] >= 3 and np.all(np.diff(probs) < 0)
    sides = np.array([max(a["bbox"][2:]) for a in anns])
    assert (sides < 16).mean() > 0.1  # small objects
    assert (sides > 64).any()  # and large ones
    assert 3 <= len(anns) / (48 + 24) <= 10


def test_occlusion_present_but_bounded(dataset):
    coco = json.loads(dataset.coco_train_json.read_text())
    overlapping = 0
    by_image = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a["bbox"])
    for boxes in by_image.values():
        for i, (x0, y0, w0, h0) in enumerate(boxes):
            for x1, y1, w1, h1 in boxes[i + 1:]:
                iw = min(x0 + w0, x1 + w1) - max(x0, x1)
                ih = min(y0 + h0, y1 + h1) - max(y0, y1)
                if iw > 0 and ih > 0:
                    overlapping += 1
                    assert iw * ih <= 0.35 * min(w0 * h0, w1 * h1) + 1e-6
    assert overlapping > 0


def test_data_yaml_loads_in_ultralytics(dataset, monkeypatch):
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    monkeypatch.setenv("YOLO_AUTOINSTALL", "false")
    yaml = pytest.importorskip("yaml")
    content = yaml.safe_load(dataset.yolo_yaml.read_text())
    assert Path(content["path"]).is_absolute() and Path(content["path"]) == dataset.root
    assert content["train"] == "images/train" and content["val"] == "images/val"
    assert content["names"] == dict(enumerate(CLASS_NAMES))
    utils = pytest.importorskip("ultralytics.data.utils")
    checked = utils.check_det_dataset(str(dataset.yolo_yaml), autodownload=False)
    assert checked["nc"] == len(CLASS_NAMES)
    assert Path(checked["train"]) == dataset.train_images and Path(checked["val"]) == dataset.val_images


def test_num_classes_subset(tmp_path):
    ds = make_synthetic_dataset(tmp_path / "k3", num_classes=3, **SMALL)
    assert ds.classes == list(CLASS_NAMES[:3])
    cats = {a["category_id"] for a in json.loads(ds.coco_train_json.read_text())["annotations"]}
    assert cats <= {1, 2, 3}


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(imgsz=32), ValueError, "imgsz"),
        (dict(num_val=0), ValueError, "num_val"),
        (dict(num_train=0), ValueError, "num_train"),
        (dict(num_classes=9), ValueError, "num_classes"),
        (dict(num_train=2.5), TypeError, "num_train"),
    ],
)
def test_bad_parameters_name_the_culprit(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        make_synthetic_dataset(tmp_path / "bad", **{**SMALL, **kwargs})
    assert not (tmp_path / "bad").exists()


def test_load_without_meta_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="meta.json"):
        load_synthetic_dataset(tmp_path)


# ---------------------------------------------------------------------------------------------------- evaluation


def test_ground_truth_scores_perfectly(dataset):
    res = coco_evaluate(dataset.coco_val_json, _gt_as_detections(dataset.coco_val_json))
    assert isinstance(res, EvalResult)
    assert res.map50_95 == pytest.approx(1.0) and res.map50 == pytest.approx(1.0)
    assert set(res.per_category) <= set(CLASS_NAMES) and len(res.per_category) >= 6
    assert all(v == pytest.approx(1.0) for v in res.per_category.values())
    as_dict = res.to_dict()
    assert as_dict["map50_95"] == pytest.approx(1.0) and json.dumps(as_dict)


def test_shifted_boxes_score_lower(dataset):
    dets = _gt_as_detections(dataset.coco_val_json)
    for d in dets:  # shift by half the box size along x: IoU = 1/3 for every box
        x, y, w, h = d["bbox"]
        d["bbox"] = [x + w / 2, y, w, h]
    res = coco_evaluate(dataset.coco_val_json, dets)
    assert res.map50 == pytest.approx(0.0, abs=1e-6)  # IoU 1/3 < 0.5: no match at any threshold
    assert res.map50_95 == pytest.approx(0.0, abs=1e-6)
    for d in dets:  # a quarter-size shift: IoU = 0.6, matched at thresholds 0.5, 0.55 and 0.6 only
        x, y, w, h = d["bbox"]
        d["bbox"] = [x - w / 4, y, w, h]
    res = coco_evaluate(dataset.coco_val_json, dets)
    assert res.map50 == pytest.approx(1.0)
    assert 0.2 <= res.map50_95 <= 0.4  # 3 of 10 thresholds, up to pixel rounding


def test_detections_are_not_mutated(dataset):
    dets = _gt_as_detections(dataset.coco_val_json)[:5]
    before = json.dumps(dets)
    coco_evaluate(dataset.coco_val_json, dets)
    assert json.dumps(dets) == before


def test_empty_detections_give_zero(dataset):
    res = coco_evaluate(dataset.coco_val_json, [])
    assert res.map50_95 == 0.0 and res.map50 == 0.0 and res.num_detections == 0
    assert res.per_category and all(v == 0.0 for v in res.per_category.values())


def test_category_restriction(dataset):
    dets = [d for d in _gt_as_detections(dataset.coco_val_json) if d["category_id"] == 1]
    assert coco_evaluate(dataset.coco_val_json, dets).map50_95 < 0.5  # the other classes are missed
    only_first = coco_evaluate(dataset.coco_val_json, dets, category_ids=[1])
    assert only_first.map50_95 == pytest.approx(1.0)
    assert list(only_first.per_category) == [CLASS_NAMES[0]]
    with pytest.raises(ValueError, match="category_ids"):
        coco_evaluate(dataset.coco_val_json, dets, category_ids=[99])


def test_unknown_ids_name_the_culprit(dataset):
    det = {"image_id": 10_000, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}
    with pytest.raises(ValueError, match="image ids"):
        coco_evaluate(dataset.coco_val_json, [det])
    with pytest.raises(ValueError, match="category ids"):
        coco_evaluate(dataset.coco_val_json, [{**det, "image_id": 1, "category_id": 0}])


def test_evaluation_is_quiet(dataset, capsys):
    coco_evaluate(dataset.coco_val_json, _gt_as_detections(dataset.coco_val_json))
    assert capsys.readouterr().out == ""
    coco_evaluate(dataset.coco_val_json, _gt_as_detections(dataset.coco_val_json), verbose=True)
    assert "Average Precision" in capsys.readouterr().out


def test_detections_from_tensors():
    torch = pytest.importorskip("torch")
    dets = detections_from_tensors(
        [7, 8],
        [torch.tensor([[10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 4.0, 4.0]]), np.zeros((0, 4))],
        [torch.tensor([0.9, 0.1]), np.zeros(0)],
        [torch.tensor([0, 2]), np.zeros(0, dtype=int)],
    )
    assert dets == [
        {"image_id": 7, "category_id": 1, "bbox": [10.0, 20.0, 20.0, 40.0], "score": pytest.approx(0.9)},
        {"image_id": 7, "category_id": 3, "bbox": [0.0, 0.0, 4.0, 4.0], "score": pytest.approx(0.1)},
    ]
    mapped = detections_from_tensors([1], [np.array([[0, 0, 2, 2]])], [[0.5]], [[4]], label_to_category={4: 17})
    assert mapped[0]["category_id"] == 17
    called = detections_from_tensors([1], [np.array([[0, 0, 2, 2]])], [[0.5]], [[4]],
                                     label_to_category=lambda k: k * 10)
    assert called[0]["category_id"] == 40
    with pytest.raises(ValueError, match="label 5"):
        detections_from_tensors([1], [np.array([[0, 0, 2, 2]])], [[0.5]], [[5]], label_to_category={4: 17})
    with pytest.raises(ValueError, match="same length"):
        detections_from_tensors([1], [np.array([[0, 0, 2, 2]])], [[0.5, 0.4]], [[4]])


def test_tensor_round_trip_through_evaluation(dataset):
    coco = json.loads(dataset.coco_val_json.read_text())
    ids = image_id_by_filename(dataset.coco_val_json)
    assert ids == {Path(i["file_name"]).stem: i["id"] for i in coco["images"]}
    per_image = {i["id"]: [] for i in coco["images"]}
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        per_image[a["image_id"]].append((x, y, x + w, y + h, a["category_id"] - 1))
    stems = sorted(ids)
    rows = [np.array(per_image[ids[s]], dtype=float).reshape(-1, 5) for s in stems]
    dets = detections_from_tensors([ids[s] for s in stems], [r[:, :4] for r in rows],
                                   [np.ones(len(r)) for r in rows], [r[:, 4].astype(int) for r in rows])
    assert coco_evaluate(dataset.coco_val_json, dets).map50_95 == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------ bootstrap over images


def _noisy_detections(coco: dict, seed: int, ties: bool = True) -> list:
    """Jittered copies of the ground truth (some with the wrong class), random false positives, scores with ties
    (rounded to 2 decimals) or without."""
    rng = np.random.default_rng(seed)
    score = (lambda: float(np.round(rng.random(), 2))) if ties else (lambda: float(rng.random()))
    dets = []
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        for _ in range(2):
            dx, dy, dw, dh = rng.normal(0.0, 0.15 * max(w, h), 4)
            cat = a["category_id"] if rng.random() < 0.8 else int(rng.integers(1, 9))
            dets.append({"image_id": a["image_id"], "category_id": cat, "bbox": [x + dx, y + dy, max(1.0, w + dw),
                         max(1.0, h + dh)], "score": score()})
    for image in coco["images"]:
        for _ in range(4):
            dets.append({"image_id": image["id"], "category_id": int(rng.integers(1, 9)),
                         "bbox": [float(v) for v in rng.uniform(0, 150, 4)], "score": score()})
    return dets


def test_image_matches_give_pycocotools_figures(dataset):
    coco = json.loads(dataset.coco_val_json.read_text())
    dets = _noisy_detections(coco, 0)
    res = coco_evaluate(dataset.coco_val_json, dets)
    matches = match_per_image(dataset.coco_val_json, dets)
    ap = matches.category_ap()
    assert {matches.categories[c]: v for c, v in ap.items()} == pytest.approx(res.per_category, abs=1e-12)
    assert 0.1 < res.map50_95 < 0.9  # neither trivial case
    some = [2, 5]
    only = match_per_image(dataset.coco_val_json, dets, category_ids=some).category_ap()
    assert only == pytest.approx({c: ap[c] for c in some}, abs=1e-12)
    empty = match_per_image(dataset.coco_val_json, []).category_ap()
    assert {matches.categories[c]: v for c, v in empty.items()} == coco_evaluate(dataset.coco_val_json, []).per_category


def test_resample_weights_equal_duplicated_images(dataset):
    """A bootstrap resample (image i drawn w_i times) scores as pycocotools scores a data set holding w_i copies
    (scores without ties across images: pycocotools orders those by image id, which copies change)."""
    coco = json.loads(dataset.coco_val_json.read_text())
    dets = _noisy_detections(coco, 1, ties=False)
    matches = match_per_image(dataset.coco_val_json, dets)
    weights = np.random.default_rng(0).integers(0, 4, len(matches.image_ids))
    copies = {"images": [], "annotations": [], "categories": coco["categories"]}
    copied_dets = []
    for i, image_id in enumerate(matches.image_ids):
        for k in range(weights[i]):
            new_id = 1000 * (k + 1) + image_id
            copies["images"].append({**next(im for im in coco["images"] if im["id"] == image_id), "id": new_id})
            copies["annotations"] += [{**a, "id": len(copies["annotations"]) + j + 1, "image_id": new_id}
                                      for j, a in enumerate(a for a in coco["annotations"] if a["image_id"] == image_id)]
            copied_dets += [{**d, "image_id": new_id} for d in dets if d["image_id"] == image_id]
    expected = coco_evaluate(copies, copied_dets).per_category
    got = {matches.categories[c]: v for c, v in matches.category_ap(weights).items()}
    assert got == pytest.approx(expected, abs=1e-12)
    assert got != pytest.approx({matches.categories[c]: v for c, v in matches.category_ap().items()}, abs=1e-3)


def test_bootstrap_is_paired_and_reproducible(dataset):
    coco = json.loads(dataset.coco_val_json.read_text())
    good = match_per_image(dataset.coco_val_json, _noisy_detections(coco, 2))
    # class 3 loses its detections scored below 0.5: its PR curve is cut short, so its AP can only drop
    worse = match_per_image(dataset.coco_val_json,
                            [d for d in _noisy_detections(coco, 2) if d["category_id"] != 3 or d["score"] >= 0.5])
    groups = {"all": sorted(good.categories), "three": [3]}
    boot = bootstrap_map({"a": good, "a again": good, "b": worse}, groups, resamples=200, seed=0)
    assert np.array_equal(boot["a"]["all"], boot["a again"]["all"])  # the same resamples for every model
    full = np.mean(list(good.category_ap().values()))
    lo, hi = np.percentile(boot["a"]["all"], [2.5, 97.5])
    assert lo < full < hi and hi - lo > 0.01
    drop = boot["a"]["three"] - boot["b"]["three"]  # paired: on every resample, never negative
    assert np.all(drop >= -1e-12) and np.mean(drop > 1e-3) > 0.9
    again = bootstrap_map({"a": good}, groups, resamples=200, seed=0)
    assert np.array_equal(again["a"]["all"], boot["a"]["all"])
    other = match_per_image(dataset.coco_val_json, _noisy_detections(coco, 2))
    other.image_ids = other.image_ids[:-1]
    with pytest.raises(ValueError, match="'b' was matched on other images than 'a'"):
        bootstrap_map({"a": good, "b": other}, groups, resamples=2)


# ---------------------------------------------------------------------------------------------------- zoo


def test_float_checkpoint_is_trained_once_and_keyed(tmp_path, monkeypatch):
    pytest.importorskip("ultralytics")
    from detq_hooks.tools import zoo

    monkeypatch.setenv("DETQ_CACHE_DIR", str(tmp_path / "cache"))
    calls = []

    def fake_train(dataset, model, project, epochs, minutes, imgsz, batch, seed, verbose):
        calls.append((model, epochs, imgsz))
        project.mkdir(parents=True)
        (project / "best.pt").write_bytes(f"{model}-{epochs}".encode())
        return project / "best.pt", epochs

    def fake_evaluate(weights, dataset, imgsz=None):
        return EvalResult(0.5, 0.8, 0.5, 0.1, 0.5, 0.7, 0.6, per_category={"circle": 0.5})

    monkeypatch.setattr(zoo, "_train", fake_train)
    monkeypatch.setattr(zoo, "evaluate_ultralytics", fake_evaluate)
    # the benchmarks' data sets live under the same root as the checkpoints
    assert zoo.synthetic_data_dir(512, 96, 160) == tmp_path / "cache" / "synth" / "n512_v96_s160_seed0"
    assert zoo.float_refs_dir() == tmp_path / "cache" / "float_refs"
    ds = make_synthetic_dataset(tmp_path / "d", seed=0, **SMALL)

    first = zoo.cached_float_checkpoint(ds, "yolo11n.yaml", epochs=3)
    assert not first.cached and first.map50_95 == 0.5 and first.metrics["epochs_run"] == 3
    assert first.checkpoint == tmp_path / "cache" / "float_refs" / first.key / "best.pt"
    assert first.checkpoint.read_bytes() == b"yolo11n.yaml-3"
    assert not (first.checkpoint.parent / "run").exists()  # the Ultralytics run directory is cleaned up

    again = zoo.cached_float_checkpoint(ds, "yolo11n.yaml", epochs=3)
    assert again.cached and again.key == first.key and again.metrics == first.metrics and len(calls) == 1

    other_budget = zoo.cached_float_checkpoint(ds, "yolo11n.yaml", epochs=4)
    other_data = zoo.cached_float_checkpoint(make_synthetic_dataset(tmp_path / "e", seed=1, **SMALL), "yolo11n.yaml",
                                             epochs=3)
    assert len({first.key, other_budget.key, other_data.key}) == 3 and len(calls) == 3

    zoo.cached_float_checkpoint(ds, "yolo11n.yaml", epochs=3, force=True)
    assert len(calls) == 4
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        zoo.cached_float_checkpoint(ds, str(tmp_path / "missing.pt"))


def test_evaluate_ultralytics_runs_on_a_real_model(tmp_path, monkeypatch):
    pytest.importorskip("ultralytics")
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    monkeypatch.setenv("YOLO_AUTOINSTALL", "false")
    from ultralytics import YOLO

    from detq_hooks.tools.zoo import evaluate_ultralytics

    ds = make_synthetic_dataset(tmp_path / "d", num_train=4, num_val=4, imgsz=96, num_classes=3)
    res = evaluate_ultralytics(YOLO("yolo11n.yaml"), ds)  # random init: the plumbing, not the accuracy
    assert isinstance(res, EvalResult) and res.num_images == 4
    assert 0.0 <= res.map50_95 <= res.map50 <= 1.0
