"""PTQ of a trained float YOLO11n: calibration (min-max, percentile, MSE) vs block reconstruction (AdaRound, QDrop)
vs TASKQ (sparse outliers, detection-aware task regularisation, head-wise units; each part off in turn), at
W8A8 / W4A8 / W4A4, beside NNCF's own PTQ (``nncf.quantize`` through Ultralytics' OpenVINO int8 export path).

    YOLO_OFFLINE=1 python benchmarks/bench_ptq.py [--bits w8a8,w4a8,w4a4 --images 64 --iterations 150
        --threads 1 --out benchmarks/results/ptq --imgsz 160 --num-train 256 --num-val 64 --float-epochs 20]

Float model: the cached YOLO11n of ``detq_hooks.tools.zoo.cached_float_checkpoint`` (synthetic data, 160 px, 256
train / 64 val images). Every variant runs in its own process (``detq_hooks.ptq`` on the first ``--images``
training images), so its wall time and peak resident memory are its own. mAP50-95 (pycocotools) on the val split
of the raw network with Ultralytics' NMS (``detq_hooks.ultralytics.evaluate``); NNCF's model runs in OpenVINO
(f32 inference precision, so only its quantization differs). Results: ``<out>/ptq.json``, ``ptq.md``, ``ptq.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")

CALIBRATORS = ("minmax", "percentile", "mse")
RECONSTRUCTION = {  # variant -> ptq section
    "adaround": {"method": "adaround"},
    "qdrop": {"method": "qdrop"},
    "taskq": {"method": "taskq"},
    "taskq-no-sparse": {"method": "taskq", "sparse": False},
    "taskq-no-dtr": {"method": "taskq", "dtr": False},
    "taskq-no-headwise": {"method": "taskq", "headwise": False},
}


def recipe_for(bits: str, variant: str, num_batches: int, iterations: int, batch: int, seed: int = 0) -> dict:
    recipe = {"preset": f"{bits}-ptq", "calibration": {"num_batches": num_batches}}
    if variant in CALIBRATORS:
        recipe["calibration"]["method"] = variant
    else:
        recipe["ptq"] = {**RECONSTRUCTION[variant], "iterations": iterations, "batch_size": batch, "lr": 1e-2,
                         "seed": seed}
    return recipe


def data_and_checkpoint(a):
    from detq_hooks.tools.data import make_synthetic_dataset
    from detq_hooks.tools.zoo import cached_float_checkpoint, synthetic_data_dir

    ds = make_synthetic_dataset(synthetic_data_dir(a.num_train, a.num_val, a.imgsz), num_train=a.num_train,
                                num_val=a.num_val, imgsz=a.imgsz, seed=0)
    return ds, cached_float_checkpoint(ds, a.model, epochs=a.float_epochs, imgsz=a.imgsz, verbose=False).checkpoint


def run_one(args) -> dict:
    """One variant in this process: PTQ, then mAP; prints a JSON line."""
    import numpy as np
    import torch
    from ultralytics.nn.tasks import load_checkpoint

    import detq_hooks as dq
    from detq_hooks.ultralytics.evaluate import evaluate, load_images
    from detq_hooks.ultralytics.trainer import calibration_forward

    torch.set_num_threads(args.threads)
    ds, checkpoint = data_and_checkpoint(args)
    imgsz = args.imgsz
    model = load_checkpoint(str(checkpoint))[0].float().eval()
    train = load_images(ds.root / "images" / "train", imgsz)[: args.images]
    batches = [torch.from_numpy(np.stack([t[1] for t in train[i:i + args.batch]])) for i in range(0, len(train), args.batch)]
    val = load_images(ds.root / "images" / "val", imgsz)
    gt = ds.coco_json("val")
    row = {"bits": args.one[0], "variant": args.one[1], "seed": args.seed}
    if args.one[1] == "float":
        row["map50_95"] = evaluate(model, None, gt, imgsz, images=val)[0].map50_95
    elif args.one[1] == "nncf":
        sys.path.insert(0, str(Path(__file__).parent))
        from bench_deploy import nncf_ptq

        t = time.perf_counter()
        xml = nncf_ptq(model, imgsz, Path(args.out) / "nncf" / "nncf.xml", [b[i:i + 1] for b in batches for i in range(len(b))])
        row["seconds"] = time.perf_counter() - t
        row["map50_95"] = evaluate(str(xml), None, gt, imgsz, images=val, ov_precision="f32")[0].map50_95
    else:
        recipe = recipe_for(args.one[0], args.one[1], len(batches), args.iterations, args.batch, args.seed)
        t = time.perf_counter()
        dq.ptq(model, batches, recipe, forward_fn=calibration_forward, progress=False)
        row["seconds"] = time.perf_counter() - t
        rec = model.detq_ptq.reconstruction
        if rec is not None:
            row["cached_kib_per_image"] = rec.cached_bytes_per_image / 1024
            row["blocks_improved"] = sum(b.loss_after < b.loss_before for b in rec.blocks if b.skipped is None)
            row["blocks"] = sum(b.skipped is None for b in rec.blocks)
        row["map50_95"] = evaluate(model, None, gt, imgsz, images=val)[0].map50_95
    row["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("ROW " + json.dumps(row), flush=True)
    return row


def main(argv=None) -> int:
    p = ptq_arguments(__doc__, Path("benchmarks/results/ptq"))
    p.add_argument("--nncf", action=argparse.BooleanOptionalAction, default=True)
    # the float model and its synthetic data (benchmarks/run.py --quick shrinks them)
    p.add_argument("--model", default="yolo11n.yaml")
    p.add_argument("--imgsz", type=int, default=160)
    p.add_argument("--num-train", type=int, default=256)
    p.add_argument("--num-val", type=int, default=64)
    p.add_argument("--float-epochs", type=int, default=20)
    a = p.parse_args(argv)
    if a.one:
        run_one(a)
        return 0
    jobs = [("float", "float")] + ([("w8a8", "nncf")] if a.nncf else [])
    jobs += [(bits, v) for bits in a.bits.split(",") for v in a.variants.split(",")]
    rows = logged_rows(a.out) if a.table_only else run_jobs(__file__, jobs, [
                                      "--images", str(a.images), "--batch", str(a.batch), "--iterations",
                                      str(a.iterations), "--threads", str(a.threads), "--out", str(a.out),
                                      "--seed", str(a.seed), "--model", a.model, "--imgsz", str(a.imgsz),
                                      "--num-train", str(a.num_train), "--num-val", str(a.num_val),
                                      "--float-epochs", str(a.float_epochs)], a.out)
    write_results(rows, a.out, vars(a), f"float YOLO11n mAP50-95 {{float}}; {a.images} calibration images, "
                  f"{a.iterations} iterations per block, {a.threads} thread(s)")
    return 0


def ptq_arguments(doc: str, out: Path) -> argparse.ArgumentParser:
    """The options every PTQ benchmark takes (bits, methods, calibration images, reconstruction settings)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--bits", default="w8a8,w4a8,w4a4")
    p.add_argument("--variants", default=",".join(CALIBRATORS + tuple(RECONSTRUCTION)))
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iterations", type=int, default=150)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="reconstruction seed (mini-batches, QDrop masks)")
    p.add_argument("--out", type=Path, default=out)
    p.add_argument("--table-only", action="store_true",
                   help="rebuild the table, JSON and plot from <out>/rows.jsonl (every run logged there, the latest "
                        "of each bits/method/seed) without running anything: after re-running some methods")
    p.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    return p


def logged_rows(out: Path) -> list[dict]:
    """Every row logged in ``out/rows.jsonl``, the latest of each (bits, method, seed), float first, then by bit
    width and method in the benchmark's order."""
    latest = {}
    for line in (out / "rows.jsonl").read_text().splitlines():
        row = json.loads(line)
        latest[(row["bits"], row["variant"], row.get("seed", 0))] = row
    bits_order = ("float", "w8a8", "w4a8", "w4a4")
    variant_order = ("float", "nncf", *CALIBRATORS, *RECONSTRUCTION)
    rank = lambda r: (bits_order.index(r["bits"]) if r["bits"] in bits_order else 9,  # noqa: E731
                      variant_order.index(r["variant"]) if r["variant"] in variant_order else 99, r.get("seed", 0))
    rows = sorted(latest.values(), key=rank)
    floats = [r for r in rows if r["variant"] == "float"]
    return floats[-1:] + [r for r in rows if r["variant"] != "float"]


def run_jobs(script: str, jobs: list[tuple[str, str]], args: list[str], out: Path) -> list[dict]:
    """Each (bits, variant) in its own process (``script --one bits variant *args``), so its wall time and peak
    memory are its own; the rows are appended to ``out/rows.jsonl`` as they come."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for bits, variant in jobs:
        proc = subprocess.run([sys.executable, script, "--one", bits, variant, *args], capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("ROW ")]
        if proc.returncode or not line:
            print(f"{bits} {variant}: failed\n{proc.stderr[-2000:]}", flush=True)
            continue
        row = json.loads(line[-1][4:])
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(out / "rows.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
    return rows


def write_results(rows: list[dict], out: Path, config: dict, header: str) -> None:
    """Table (printed and ``ptq.md``), ``ptq.json`` and ``ptq.png`` of the rows against the float row;
    ``{float}`` in ``header`` becomes the float mAP."""
    float_map = next(r["map50_95"] for r in rows if r["variant"] == "float")
    lines = [header.format(float=f"{float_map:.4f}"), "",
             "| bits | method | mAP50-95 | kept | wall s | peak RSS MiB | blocks improved |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["variant"] == "float":
            continue
        r["kept"] = r["map50_95"] / max(float_map, 1e-9)
        improved = f"{r['blocks_improved']}/{r['blocks']}" if "blocks" in r else ""
        lines.append(f"| {r['bits']} | {r['variant']} | {r['map50_95']:.4f} | {r['kept']:.1%} | {r.get('seconds', 0):.0f} | "
                     f"{r['peak_rss_mib']:.0f} | {improved} |")
    table = "\n".join(lines)
    print("\n" + table)
    (out / "ptq.md").write_text(table + "\n")
    (out / "ptq.json").write_text(json.dumps({"float_map50_95": float_map, "config": {k: str(v) for k, v in config.items()},
                                              "rows": rows}, indent=2))
    _plot(rows, float_map, out / "ptq.png")


def _plot(rows, float_map, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["variant"] != "float"]
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(rows) + 2), 4))
    ax.bar(range(len(rows)), [r["map50_95"] / max(float_map, 1e-9) for r in rows],
           color=["#4c72b0" if r["bits"] == "w8a8" else "#55a868" if r["bits"] == "w4a8" else "#c44e52" for r in rows])
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{r['bits']} {r['variant']}" for r in rows], rotation=90, fontsize=7)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_ylabel("fraction of float mAP50-95")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
