"""Fisher-aware quantization, YOLO11n (Ultralytics): plain QAT vs + Fisher mixed precision vs + Fisher-trace
regulariser vs both, at W4A8 and W4A4, from one cached float checkpoint with the same epoch budget, the synthetic
data's rarest classes as the critical set.

    YOLO_OFFLINE=1 python benchmarks/bench_fisher.py [--model yolo11n.yaml --float-epochs 20 --imgsz 160
        --num-train 256 --num-val 64 --qat-epochs 6 --bits w4a8,w4a4 --variants plain,mp,reg,both
        --critical star,checker --seeds 0 --out benchmarks/results/fisher]

``--variants plain,crqat,crqat-fisher`` is the CR-QAT + Fisher study: CR-QAT (curriculum + distillation from the
float teacher) with and without both Fisher methods, beside plain QAT, on the same float model and budget.

Every run starts from the same float ``best.pt``; fractions kept are of the better of it and its float fine-tune
with the QAT budget (``detq_hooks.tools.zoo.cached_float_checkpoint``) with the same
optimizer settings. Mixed precision gets the *measured* average weight bits of the plain run of the same preset
(its first and prediction layers at 8 bits included), so both files have the same size. mAP is COCO mAP50-95
(pycocotools) of each run's best.pt on the val split; critical mAP is COCO AP over the critical categories. Also
written: each run's training time per epoch ÷ plain QAT of the same bits (the regulariser's amortised cost), the
bits per layer beside each layer's Fisher trace (``bits_<run>.png``) and the per-class AP drop against float
(``ap_drop_<run>.png``). Results: ``<out>/results.json``, ``<out>/fisher.md``, ``<out>/fisher.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")

from detq_hooks import fisher_report  # noqa: E402


VARIANTS = ("plain", "mp", "reg", "both", "crqat", "crqat-fisher")


def variant_recipe(bits: str, variant: str, critical: list[str], avg_bits: float, reg_weight: float, reg_every: int) -> dict:
    """``plain`` (LSQ QAT), ``mp`` / ``reg`` / ``both`` (Fisher mixed precision, regulariser, both), ``crqat``
    (curriculum + distillation) and ``crqat-fisher`` (CR-QAT with both Fisher methods)."""
    if variant not in VARIANTS:
        raise SystemExit(f"unknown variant {variant!r}: choose from {', '.join(VARIANTS)}")
    recipe = {"preset": bits, "name": f"{bits}-{variant}", "critical": {"classes": critical}}
    if variant in ("crqat", "crqat-fisher"):
        recipe.update(curriculum={"enabled": True}, distillation={"enabled": True})
    if variant in ("mp", "both", "crqat-fisher"):
        recipe["mixed_precision"] = {"enabled": True, "budget": {"avg_weight_bits": avg_bits}, "num_batches": 8}
    if variant in ("reg", "both", "crqat-fisher"):
        recipe["fisher_regularizer"] = {"enabled": True, "weight": reg_weight, "every": reg_every, "warmup": 0.1}
    return recipe


def plain_average_bits(checkpoint: Path, preset: str) -> float:
    """Average weight bits of a plain ``preset`` conversion of the float model (every quantized weight)."""
    from ultralytics import YOLO

    from detq_hooks.fisher import average_weight_bits
    from detq_hooks.session import QuantSession

    model = copy.deepcopy(YOLO(str(checkpoint)).model).float()
    QuantSession(preset).convert(model, training=False)
    return round(average_weight_bits(model), 4)


def run(start: Path, ds, imgsz: int, epochs: int, project: Path, label: str, recipe, seed: int) -> dict:
    from ultralytics import YOLO

    from detq_hooks.tools.zoo import evaluate_ultralytics
    from detq_hooks.ultralytics import DetQTrainer

    model = YOLO(str(start))
    times, started, found = [], {}, {}
    model.add_callback("on_train_epoch_start", lambda t: started.update(t=time.perf_counter()))
    model.add_callback("on_train_epoch_end", lambda t: times.append(time.perf_counter() - started["t"]))
    model.add_callback("on_train_start", lambda t: found.update(plan=getattr(getattr(t, "detq_session", None), "last_mixed_precision", None)))
    extra = {} if recipe is None else {"trainer": DetQTrainer, "detq": recipe}
    model.train(data=str(ds.yolo_yaml), **extra, imgsz=imgsz, epochs=epochs, batch=16, amp=False, plots=False,
                workers=0, device="cpu", exist_ok=True, project=str(project), name=label, seed=seed, deterministic=True,
                verbose=False, optimizer="AdamW", lr0=0.0005, nbs=16, warmup_epochs=0, close_mosaic=epochs, val=True)
    res = evaluate_ultralytics(model.trainer.best, ds, imgsz=imgsz)
    return {"run": label, "seed": seed, "eval": res, "plan": found.get("plan"),
            "s_per_epoch": statistics.median(times) if times else float("nan")}


def critical_of(res, critical: list[str]) -> tuple[float, float]:
    present = [c for c in critical if c in res.per_category]
    if not present:
        return float("nan"), float("nan")
    return (sum(res.per_category[c] for c in present) / len(present),
            sum(res.per_category_ap50[c] for c in present) / len(present))


def record_run(out: Path, r: dict, res, crit: float, crit50: float, plan, float_res, float_crit: float,
               critical: list[str], avg_bits: float) -> dict:
    """Complete one run's row (mAP, critical mAP, fractions of float kept, bits), draw its bits-per-layer and
    per-class AP-drop plots, print it and append it to ``out/rows.jsonl`` (a long run keeps what it measured)."""
    label = r["run"]  # its "bits" and "variant" are set by the caller
    r.update(map50_95=res.map50_95, map50=res.map50, critical_map50_95=crit, critical_map50=crit50,
             kept=res.map50_95 / max(float_res.map50_95, 1e-9), critical_kept=crit / max(float_crit, 1e-9),
             per_category=res.per_category, avg_weight_bits=plan.used if plan is not None else avg_bits)
    if plan is not None:
        fisher_report.save_bits_plot(plan, out / f"bits_{label}.png")
        r["bits_per_layer"] = plan.allocation
    fisher_report.save_ap_drop_plot(fisher_report.ap_drop_table(float_res, res, critical), out / f"ap_drop_{label}.png")
    print(json.dumps({k: v for k, v in r.items() if k not in ("per_category", "bits_per_layer")}), flush=True)
    with open(out / "rows.jsonl", "a") as f:
        f.write(json.dumps(r) + "\n")
    return r


def write_outputs(out: Path, header: str, rows: list[dict], time_key: str, time_label: str, float_res,
                  float_crit: float, float_crit50: float, critical: list[str], config: dict) -> None:
    """``fisher.md`` (the table, time ÷ plain QAT of the same bits), ``fisher.png`` and ``results.json``."""
    plain = {}
    for r in rows:
        if r["variant"] == "plain":
            plain.setdefault(r["bits"], []).append(r[time_key])
    lines = [header, "", f"| bits | variant | seed | avg weight bits | mAP50-95 | kept | critical mAP50-95 | critical kept | {time_label} |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        r["time_vs_plain"] = r[time_key] / statistics.median(plain.get(r["bits"], [float("nan")]))
        lines.append(f"| {r['bits']} | {r['variant']} | {r['seed']} | {r['avg_weight_bits']:.3f} | {r['map50_95']:.4f} | "
                     f"{r['kept']:.1%} | {r['critical_map50_95']:.4f} | {r['critical_kept']:.1%} | {r['time_vs_plain']:.2f} |")
    table = "\n".join(lines)
    print("\n" + table)
    (out / "fisher.md").write_text(table + "\n")
    save_plot(rows, out / "fisher.png")
    (out / "results.json").write_text(json.dumps({
        "float": {"map50_95": float_res.map50_95, "critical_map50_95": float_crit, "critical_map50": float_crit50,
                  "per_category": float_res.per_category},
        "critical": critical, "config": {k: str(v) for k, v in config.items()}, "rows": rows}, indent=2))


def save_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['bits']}\n{r['variant']}" for r in rows]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(rows) + 2), 4))
    ax.bar([x - 0.2 for x in xs], [r["kept"] for r in rows], 0.4, label="overall mAP50-95 kept")
    ax.bar([x + 0.2 for x in xs], [r["critical_kept"] for r in rows], 0.4, label="critical mAP50-95 kept")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axhline(0.97, color="#c44e52", lw=0.8, ls="--", label="97 % (goal for critical)")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("fraction of float")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_study_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments every Fisher study shares: data size, bit widths, variants, critical set, regulariser, seeds."""
    p.add_argument("--imgsz", type=int, default=160)
    p.add_argument("--num-train", type=int, default=256)
    p.add_argument("--num-val", type=int, default=64)
    p.add_argument("--bits", default="w4a8,w4a4")
    p.add_argument("--variants", default="plain,mp,reg,both",
                   help=f"of {','.join(VARIANTS)} (crqat: curriculum + distillation; crqat-fisher: CR-QAT + mp + reg)")
    p.add_argument("--critical", default="star,checker", help="critical class names (default: the two rarest)")
    p.add_argument("--reg-weight", type=float, default=0.01)
    p.add_argument("--reg-every", type=int, default=12, help="regulariser every N steps (the presets' 12)")
    p.add_argument("--seeds", default="0")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="yolo11n.yaml")
    p.add_argument("--float-epochs", type=int, default=20)
    p.add_argument("--qat-epochs", type=int, default=6)
    add_study_arguments(p)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/fisher"))
    a = p.parse_args(argv)

    from detq_hooks.tools.data import make_synthetic_dataset
    from detq_hooks.tools.zoo import cached_float_checkpoint, evaluate_ultralytics, synthetic_data_dir

    critical = [c for c in a.critical.split(",") if c]
    a.out.mkdir(parents=True, exist_ok=True)
    root = synthetic_data_dir(a.num_train, a.num_val, a.imgsz)
    ds = make_synthetic_dataset(root, num_train=a.num_train, num_val=a.num_val, imgsz=a.imgsz, seed=0)
    unknown = [c for c in critical if c not in ds.classes]
    if unknown:
        raise SystemExit(f"--critical {unknown} are not classes of the synthetic data {ds.classes}")
    ref = cached_float_checkpoint(ds, a.model, epochs=a.float_epochs, imgsz=a.imgsz, verbose=False)
    float_eval = evaluate_ultralytics(ref.checkpoint, ds, imgsz=a.imgsz)
    float_crit, float_crit50 = critical_of(float_eval, critical)
    print(f"float {a.model}: mAP50-95 {float_eval.map50_95:.4f}, critical {critical} {float_crit:.4f} "
          f"({'cached' if ref.cached else 'trained'}: {ref.checkpoint})", flush=True)

    # Fractions are of the better float model: the reference, or the reference trained on with QAT's budget
    # (else QAT gets credit for the training the float model did not get).
    tuned = run(ref.checkpoint, ds, a.imgsz, a.qat_epochs, a.out.resolve() / "runs", "float_finetune", None, 0)
    tuned_eval = tuned.pop("eval")
    tuned_crit, _ = critical_of(tuned_eval, critical)
    print(f"float fine-tuned {a.qat_epochs} epochs: mAP50-95 {tuned_eval.map50_95:.4f}, critical {tuned_crit:.4f}", flush=True)
    if tuned_eval.map50_95 > float_eval.map50_95:
        float_eval, float_crit, float_crit50 = tuned_eval, tuned_crit, critical_of(tuned_eval, critical)[1]
    rows = []
    for bits in a.bits.split(","):
        avg = plain_average_bits(ref.checkpoint, bits)
        for variant in a.variants.split(","):
            for seed in [int(s) for s in a.seeds.split(",")]:
                recipe = variant_recipe(bits, variant, critical, avg, a.reg_weight, a.reg_every)
                label = f"{bits}_{variant}_s{seed}"
                r = run(ref.checkpoint, ds, a.imgsz, a.qat_epochs, a.out.resolve() / "runs", label, recipe, seed)
                res, plan = r.pop("eval"), r.pop("plan")
                r.update(bits=bits, variant=variant)
                rows.append(record_run(a.out, r, res, *critical_of(res, critical), plan, float_eval, float_crit,
                                       critical, avg))

    header = (f"float (the better of the reference and its {a.qat_epochs}-epoch fine-tune) mAP50-95 {float_eval.map50_95:.4f}, "
              f"critical ({', '.join(critical)}) {float_crit:.4f}; "
              f"QAT {a.qat_epochs} epochs from it, imgsz {a.imgsz}, {a.num_train} train / {a.num_val} val images; "
              f"seeds {a.seeds}; regulariser λ={a.reg_weight}, every {a.reg_every} steps")
    write_outputs(a.out, header, rows, "s_per_epoch", "time/epoch ÷ plain", float_eval, float_crit, float_crit50,
                  critical, vars(a))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
