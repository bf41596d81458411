"""The Fisher study's models (``bench_fisher.py``) scored again on a large held-out validation set, with bootstrap
confidence intervals, so that its critical-category goal can be judged.

The study validates on 64 images, where its two critical classes have a few dozen objects: their mAP moves by
about ±0.017 between seeds, more than the differences the goal asks about. This script takes the study's trained
``best.pt`` files as they are (nothing is retrained) and scores each on ``--heldout`` new images drawn from the same
generator with another seed (none of them seen in training or in the study's best-epoch choice). Each figure comes
with a 95 % bootstrap interval over the held-out images, and the comparisons (fraction of float kept, difference to
plain QAT of the same bits and seed) are paired: every model is scored on the same resamples.

    YOLO_OFFLINE=1 python benchmarks/bench_fisher_heldout.py \\
        --study benchmarks/results/suite/accuracy/raw/fisher [--heldout 1024 --resamples 1000 \\
        --out benchmarks/results/fisher_heldout]

``--study`` is a study's ``--out`` folder, or a folder of them (``seed0/``, ``seed1/`` as the suite writes them);
the study's own settings are read from its ``results.json``. Studies of several regulariser weights (``--reg-weight``)
are scored side by side: their regularised variants are named with their λ (``both λ=0.003``), and a recipe that two
studies share (``plain``, ``crqat``: no λ) is scored once. The goal (issue: Fisher-aware quantization): critical
mAP at 4 bits within 3 % of float where plain QAT loses clearly more, overall mAP not lower than plain QAT.
Results: ``<out>/heldout.json``, ``<out>/heldout.md``, ``<out>/heldout.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")

GOAL_KEPT = 0.97  # critical mAP within 3 % of float


def studies_under(path: Path) -> list[Path]:
    """The study folders (each with ``results.json`` and ``runs/``) at or under ``path``."""
    found = [p.parent for p in sorted(path.glob("**/results.json")) if (p.parent / "runs").is_dir()]
    if not found:
        raise SystemExit(f"--study {path}: no bench_fisher.py output (results.json beside runs/) found there")
    return found


def interval(values: np.ndarray) -> list[float]:
    return [float(np.nanpercentile(values, 2.5)), float(np.nanpercentile(values, 97.5))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", type=Path, default=Path("benchmarks/results/suite/accuracy/raw/fisher"))
    p.add_argument("--heldout", type=int, default=1024, help="held-out validation images")
    p.add_argument("--heldout-seed", type=int, default=1, help="the generator seed of the held-out images (study: 0)")
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--model", default="yolo11n.yaml", help="the study's --model (finds its cached float reference)")
    p.add_argument("--float-epochs", type=int, default=20, help="the study's --float-epochs")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/fisher_heldout"))
    a = p.parse_args(argv)

    from detq_hooks.evaluation import bootstrap_map, match_per_image
    from detq_hooks.tools.data import make_synthetic_dataset
    from detq_hooks.tools.zoo import cached_float_checkpoint, predict_ultralytics_coco, synthetic_data_dir

    started = time.time()
    studies = studies_under(a.study)
    results = {study: json.loads((study / "results.json").read_text()) for study in studies}
    settings = results[studies[0]]
    cfg, critical = settings["config"], settings["critical"]
    imgsz, num_train, num_val = int(cfg["imgsz"]), int(cfg["num_train"]), int(cfg["num_val"])
    for study in studies[1:]:
        other = results[study]
        if other["critical"] != critical or any(other["config"][k] != cfg[k] for k in ("imgsz", "num_train", "num_val")):
            raise SystemExit(f"{study} and {studies[0]} are studies of different settings; pass one of them")

    train_ds = make_synthetic_dataset(synthetic_data_dir(num_train, num_val, imgsz), num_train=num_train,
                                      num_val=num_val, imgsz=imgsz, seed=0)
    ref = cached_float_checkpoint(train_ds, a.model, epochs=a.float_epochs, imgsz=imgsz, verbose=False)
    if ref.cached is False:
        print(f"note: the float reference was not cached and has been trained again ({ref.checkpoint})", flush=True)
    heldout = make_synthetic_dataset(synthetic_data_dir(1, a.heldout, imgsz, a.heldout_seed), num_train=1,
                                     num_val=a.heldout, imgsz=imgsz, seed=a.heldout_seed)
    unknown = [c for c in critical if c not in heldout.classes]
    if unknown:
        raise SystemExit(f"the study's critical classes {unknown} are not classes of the synthetic data")

    models = {"float": ref.checkpoint}
    finetune = studies[0] / "runs" / "float_finetune" / "weights" / "best.pt"
    if finetune.is_file():
        models["float_finetune"] = finetune
    rows, seen = [], set()
    reg_weight = {study: results[study]["config"].get("reg_weight") for study in studies}
    for study in studies:
        for r in results[study]["rows"]:
            variant = r["variant"]
            if len(set(reg_weight.values())) > 1 and variant in REGULARISED:  # studies of several λ, side by side
                variant = f"{variant} λ={float(reg_weight[study]):g}"
            if (r["bits"], variant, r["seed"]) in seen:  # the same recipe and seed in another study: scored once
                continue
            seen.add((r["bits"], variant, r["seed"]))
            best = study / "runs" / r["run"] / "weights" / "best.pt"
            if not best.is_file():
                raise SystemExit(f"{best} is missing: the study's trained models are needed (nothing is retrained)")
            name = r["run"] if r["run"] not in models else f"{study.name}/{r['run']}"
            models[name] = best
            rows.append({"run": name, "bits": r["bits"], "variant": variant, "seed": r["seed"],
                         "study_map50_95": r["map50_95"], "study_critical_map50_95": r["critical_map50_95"]})

    matches = {}
    for name, weights in models.items():
        t = time.time()
        detections = predict_ultralytics_coco(weights, heldout, imgsz=imgsz)
        matches[name] = match_per_image(heldout.coco_json("val"), detections)
        print(f"{name}: {len(detections)} detections on {a.heldout} images ({time.time() - t:.0f} s)", flush=True)

    any_match = next(iter(matches.values()))
    id_of = {name: cat for cat, name in any_match.categories.items()}
    groups = {"all": sorted(any_match.categories), "critical": [id_of[c] for c in critical]}
    full = {}
    for name, m in matches.items():
        ap = m.category_ap()
        full[name] = {g: float(np.mean([ap[c] for c in cats if c in ap])) for g, cats in groups.items()}
        full[name]["per_category"] = {m.categories[c]: v for c, v in ap.items()}
    boot = bootstrap_map(matches, groups, a.resamples, seed=0)

    # as the study: fractions kept are of the better float model (the reference or its fine-tune), here on held-out
    float_name = max((n for n in ("float", "float_finetune") if n in full), key=lambda n: full[n]["all"])
    plain_of = {(r["bits"], r["seed"]): r["run"] for r in rows if r["variant"] == "plain"}
    for r in rows:
        name = r["run"]
        r["map50_95"], r["critical_map50_95"] = full[name]["all"], full[name]["critical"]
        r["map50_95_ci"], r["critical_map50_95_ci"] = interval(boot[name]["all"]), interval(boot[name]["critical"])
        for g, key in (("all", "kept"), ("critical", "critical_kept")):
            r[key] = full[name][g] / full[float_name][g]
            r[key + "_ci"] = interval(boot[name][g] / boot[float_name][g])
        plain = plain_of.get((r["bits"], r["seed"]))
        if plain and plain != name:
            for g, key in (("all", "vs_plain"), ("critical", "critical_vs_plain")):
                r[key] = full[name][g] - full[plain][g]
                r[key + "_ci"] = interval(boot[name][g] - boot[plain][g])
        r["per_category"] = full[name]["per_category"]

    summary = summarise(rows)
    write(a, rows, summary, full, float_name, critical, settings, studies, heldout, time.time() - started)
    return 0


def summarise(rows: list[dict]) -> list[dict]:
    """Per (bits, variant): the seeds' mean and range of each figure, and the goal's verdict on the means."""
    out = []
    for key in dict.fromkeys((r["bits"], r["variant"]) for r in rows):
        group = [r for r in rows if (r["bits"], r["variant"]) == key]
        s = {"bits": key[0], "variant": key[1], "seeds": [r["seed"] for r in group]}
        for f in ("map50_95", "critical_map50_95", "kept", "critical_kept", "vs_plain", "critical_vs_plain"):
            vals = [r[f] for r in group if f in r]
            if vals:
                s[f] = float(np.mean(vals))
                s[f + "_range"] = [float(min(vals)), float(max(vals))]
        out.append(s)
    return out


FISHER_VARIANTS = ("mp", "reg", "both", "crqat-fisher")
REGULARISED = ("reg", "both", "crqat-fisher")  # the variants whose recipe holds the study's λ


def verdicts(rows: list[dict]) -> list[str]:
    """The goal for each Fisher variant and seed, from the paired intervals: it applies where plain QAT of the same
    bits and seed loses clearly (its critical-kept interval lies below 97 %); it is met where the variant keeps at
    least 97 % of float's critical mAP, is clearly above plain there (the difference's interval above 0) and its
    overall mAP is not clearly below plain's (that difference's interval reaches 0)."""
    lines = []
    for r in rows:
        if r["variant"].split(" ")[0] not in FISHER_VARIANTS or "critical_vs_plain" not in r:
            continue
        plain = next(p for p in rows if p["variant"] == "plain" and (p["bits"], p["seed"]) == (r["bits"], r["seed"]))
        applies = plain["critical_kept_ci"][1] < GOAL_KEPT
        met = (r["critical_kept"] >= GOAL_KEPT and r["critical_vs_plain_ci"][0] > 0 and r["vs_plain_ci"][1] >= 0)
        verdict = ("met" if met else "not met") if applies else "does not apply (plain QAT does not lose clearly)"
        lines.append(f"{r['bits']} {r['variant']} seed {r['seed']}: critical kept {r['critical_kept']:.1%} "
                     f"[{r['critical_kept_ci'][0]:.1%}, {r['critical_kept_ci'][1]:.1%}] (plain {plain['critical_kept']:.1%} "
                     f"[{plain['critical_kept_ci'][0]:.1%}, {plain['critical_kept_ci'][1]:.1%}]), critical − plain "
                     f"{r['critical_vs_plain']:+.4f} [{r['critical_vs_plain_ci'][0]:+.4f}, {r['critical_vs_plain_ci'][1]:+.4f}], "
                     f"overall − plain {r['vs_plain']:+.4f} [{r['vs_plain_ci'][0]:+.4f}, {r['vs_plain_ci'][1]:+.4f}]: {verdict}")
    return lines


def write(a, rows, summary, full, float_name, critical, settings, studies, heldout, seconds) -> None:
    a.out.mkdir(parents=True, exist_ok=True)
    fmt_ci = lambda v, ci, pct=False: (f"{v:.1%} [{ci[0]:.1%}, {ci[1]:.1%}]" if pct else  # noqa: E731
                                       f"{v:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]")
    signed = lambda r, k: (f"{r[k]:+.4f} [{r[k + '_ci'][0]:+.4f}, {r[k + '_ci'][1]:+.4f}]" if k in r else "")  # noqa: E731
    head = (f"Held-out scoring of {', '.join(str(s) for s in studies)}: {a.heldout} new images (generator seed "
            f"{a.heldout_seed}), 95 % bootstrap intervals over images ({a.resamples} paired resamples). Float "
            f"({float_name}, the better on these images): mAP50-95 {full[float_name]['all']:.4f}, critical "
            f"({', '.join(critical)}) {full[float_name]['critical']:.4f}; study's own figures (64 images) beside.")
    lines = [head, "", "| bits | variant | seed | mAP50-95 | kept | critical mAP50-95 | critical kept | "
             "overall − plain | critical − plain | study: mAP / critical |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['bits']} | {r['variant']} | {r['seed']} | {fmt_ci(r['map50_95'], r['map50_95_ci'])} | "
                     f"{fmt_ci(r['kept'], r['kept_ci'], True)} | {fmt_ci(r['critical_map50_95'], r['critical_map50_95_ci'])} | "
                     f"{fmt_ci(r['critical_kept'], r['critical_kept_ci'], True)} | {signed(r, 'vs_plain')} | "
                     f"{signed(r, 'critical_vs_plain')} | {r['study_map50_95']:.4f} / {r['study_critical_map50_95']:.4f} |")
    lines += ["", "Seeds' mean (range):", "", "| bits | variant | kept | critical kept | overall − plain | critical − plain |",
              "|---|---|---|---|---|---|"]
    rng = lambda s, k, pct: ("" if k not in s else  # noqa: E731
                             (f"{s[k]:.1%} ({s[k + '_range'][0]:.1%}–{s[k + '_range'][1]:.1%})" if pct else
                              f"{s[k]:+.4f} ({s[k + '_range'][0]:+.4f}–{s[k + '_range'][1]:+.4f})"))
    for s in summary:
        lines.append(f"| {s['bits']} | {s['variant']} | {rng(s, 'kept', True)} | {rng(s, 'critical_kept', True)} | "
                     f"{rng(s, 'vs_plain', False)} | {rng(s, 'critical_vs_plain', False)} |")
    goal = verdicts(rows)
    lines += ["", "Goal, per Fisher variant and seed (applies where plain QAT's critical kept is clearly below 97 %; met: "
              "critical kept ≥ 97 %, clearly above plain, overall not clearly below plain):", ""]
    lines += [f"- {g}" for g in goal]
    table = "\n".join(lines)
    print("\n" + table)
    (a.out / "heldout.md").write_text(table + "\n")
    save_plot(rows, a.out / "heldout.png")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    (a.out / "heldout.json").write_text(json.dumps({
        "command": "python benchmarks/bench_fisher_heldout.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items()),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": commit,
        "machine": platform.processor() or platform.machine(), "seconds": round(seconds),
        "heldout_images": a.heldout, "heldout_seed": a.heldout_seed, "resamples": a.resamples,
        "critical": critical, "float_model": float_name, "float": full[float_name], "study_config": settings["config"],
        "rows": rows, "summary": summary, "goal": goal}, indent=2))


def save_plot(rows: list[dict], path: Path) -> None:
    """Critical mAP kept with its interval, per run (seeds side by side), and the 97 % line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows) + 2), 4))
    xs = np.arange(len(rows))
    for offset, key, label in ((-0.18, "kept", "overall"), (0.18, "critical_kept", "critical")):
        vals = np.array([r[key] for r in rows])
        ci = np.array([r[key + "_ci"] for r in rows]).T
        ax.errorbar(xs + offset, vals, yerr=[vals - ci[0], ci[1] - vals], fmt="o", capsize=3, label=f"{label} mAP50-95 kept")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axhline(GOAL_KEPT, color="#c44e52", lw=0.8, ls="--", label="97 % (goal for critical)")
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{r['bits']}\n{r['variant']}\ns{r['seed']}" for r in rows], fontsize=7)
    ax.set_ylabel("fraction of float (95 % interval)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
