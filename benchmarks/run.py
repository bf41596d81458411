"""One command per question a user asks of detq-hooks, each answered with a table, a JSON file and a plot.

    python benchmarks/run.py accuracy [--quick] [--out DIR] [options]   # mAP kept after PTQ / QAT, per trainer
    python benchmarks/run.py cost     [--quick] [--out DIR] [options]   # step time and memory ÷ float
    python benchmarks/run.py deploy   [--quick] [--out DIR] [options]   # exported models: size, latency, mAP
    python benchmarks/run.py peers    [--quick] [--out DIR] [options]   # other tools' quantization, same model
    python benchmarks/run.py report   [--quick] [--results DIR] [--readme README.md]

(``detq bench <question> ...`` runs the same from a checkout.) Each question runs the existing
``benchmarks/bench_*.py`` scripts, each in its own process, and normalises what they write into one envelope
(``benchmarks/suite.py``: command, settings, machine, versions, date, git commit, wall time, columns, rows),
written to ``DIR/<question>.json``, ``.md`` and ``.png`` (default ``benchmarks/results/suite/<question>/``; the
scripts' own outputs and logs under ``DIR/raw/``). ``report`` rewrites the README's section between
``<!-- detq-bench:begin -->`` and ``<!-- detq-bench:end -->`` from those JSON files.

``--quick``: a smoke run of each question in a few minutes on 2 CPU cores -- a tiny float YOLO11n trained on
the spot (64 px, 64 images, 3 epochs; it learns next to nothing, so its figures are not measurements), one bit
width, few methods, one thread -- written under ``benchmarks/results/suite-quick/`` so that it never mixes with
real results. ``accuracy --resume`` (and ``deploy --resume``) reuses every script run already finished with the
same settings, so the hours of ``accuracy`` can be spread over several sittings. Every size option can be given
explicitly; ``--help`` of a question shows its full and quick
defaults ("script default": the wrapped script's own default, as the README's tables were measured).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import suite  # noqa: E402
from suite import Column, is_reason, not_available, not_measured, run_script  # noqa: E402

os.environ.setdefault("YOLO_OFFLINE", "1")  # the scripts inherit it: nothing can be downloaded here
os.environ.setdefault("YOLO_AUTOINSTALL", "false")

RESULTS = suite.REPO / "benchmarks" / "results"
BEGIN, END = "<!-- detq-bench:begin -->", "<!-- detq-bench:end -->"
SCRIPT_DEFAULT = None  # a size left to the wrapped script's own default

# (dest, flag type, full-size value, --quick value, help) per question; None = the script's default
YOLO_SIZES = [
    ("model", str, SCRIPT_DEFAULT, "yolo11n.yaml", "Ultralytics model yaml of the float model (trained from scratch)"),
    # accuracy: these apply to the Ultralytics and Lightning scripts; the MMDetection ones keep their own sizes
    ("imgsz", int, SCRIPT_DEFAULT, 64, "image size of the synthetic data, training and mAP"),
    ("num_train", int, SCRIPT_DEFAULT, 64, "synthetic training images"),
    ("num_val", int, SCRIPT_DEFAULT, 16, "synthetic validation images"),
    ("float_epochs", int, SCRIPT_DEFAULT, 3, "epochs of the float model (trained once, cached by detq_hooks.tools.zoo)"),
]
SIZES = {
    "accuracy": YOLO_SIZES + [
        ("sources", str,
         "ptq,qat,fisher,ptq-mmdet,qat-mmdet,fisher-mmdet,fisher-mmdet-reg,crqat-dino,crqat-rtmdet,qat-dino:0,ptq-dino,qdrop-dino,"
         "lightning,ptq-lightning", "ptq,qat",
         "which scripts run; name:0+1 gives one source its own seeds"),
        ("bits", str, "w8a8,w4a8,w4a4", "w4a8", "bit widths"),
        ("seeds", str, "0,1", "0", "seeds; the table shows the mean and min–max over them"),
        ("ptq_methods", str, "minmax,mse,adaround,qdrop,taskq", "minmax,adaround", "bench_ptq*.py variants"),
        ("qat_variants", str, "plain,both", "plain", "bench_crqat_*.py variants (plain: LSQ, both: CR-QAT)"),
        ("fisher_variants", str, "plain,mp,reg,both,crqat,crqat-fisher", "plain",
         "bench_fisher.py variants (crqat: CR-QAT beside the Fisher variants; crqat-fisher: CR-QAT + both Fisher methods)"),
        ("fisher_mmdet_variants", str, "plain,mp", "plain", "bench_fisher_mmdet.py variants of the fisher-mmdet source"),
        ("fisher_mmdet_reg_variants", str, "reg,both", "reg",
         "bench_fisher_mmdet.py variants of the fisher-mmdet-reg source (those with the Fisher regulariser)"),
        ("dino_ptq_methods", str, "minmax,mse,adaround,taskq", "minmax",
         "bench_ptq_mmdet.py variants of the ptq-dino source (QDrop is the qdrop-dino source's, a unit of its own)"),
        ("dino_crqat_variants", str, "crqat,crqat-fisher", "crqat",
         "bench_fisher_mmdet.py variants of the crqat-dino and crqat-rtmdet sources (CR-QAT, CR-QAT + Fisher)"),
        # one seed by default (qat-dino:0 in --sources): the suite asks two for the 4-bit rows only
        ("dino_qat_bits", str, "w8a8", "w8a8", "bit widths of the qat-dino source (the slim DINO's W8A8 QAT rows)"),
        ("dino_qat_variants", str, "plain,crqat", "plain",
         "bench_fisher_mmdet.py variants of the qat-dino source (plain: LSQ QAT, crqat: CR-QAT)"),
        ("lightning_methods", str, "qat,ptq,taskq,crqat,crqat-fisher", "qat",
         "bench_lightning.py --accuracy methods per bit width (qat: LSQ; ptq: the <bits>-ptq preset; taskq: the "
         "<bits>-taskq preset; crqat: CR-QAT; crqat-fisher: the <bits>-fisher preset with CR-QAT, 4-bit only)"),
        ("lightning_ptq_methods", str, "minmax,adaround,qdrop", "minmax",
         "bench_lightning.py --accuracy PTQ baselines of the ptq-lightning source (<bits>-ptq with that calibration "
         "or reconstruction method)"),
        # the Fisher presets are 4-bit ones (w4a8-fisher, w4a4-fisher): no W8A8 study
        ("fisher_bits", str, "w4a8,w4a4", "w4a8", "bit widths of the bench_fisher*.py studies"),
        ("qat_epochs", int, SCRIPT_DEFAULT, 1, "QAT epochs (Ultralytics, Lightning)"),
        ("ptq_images", int, SCRIPT_DEFAULT, 16, "calibration images of every PTQ row (bench_ptq*.py, and the "
         "Lightning sources' -ptq / -taskq recipes; QAT calibrates on the scripts' own)"),
        ("ptq_iterations", int, SCRIPT_DEFAULT, 4, "reconstruction iterations per block (PTQ)"),
        ("threads", int, SCRIPT_DEFAULT, 1, "torch threads of each script"),
    ],
    "cost": [
        ("sources", str, "convnet,ultralytics,mmdet,lightning,ultralytics-alone,fisher-step", "convnet,ultralytics,ultralytics-alone", "which scripts run"),
        ("imgsz", int, SCRIPT_DEFAULT, 64, "input size"),
        ("batch", int, SCRIPT_DEFAULT, 4, "images per step"),
        ("steps", int, SCRIPT_DEFAULT, 3, "timed repetitions (interleaved over the configurations)"),
        ("threads", int, SCRIPT_DEFAULT, 1, "torch threads"),
    ],
    "deploy": YOLO_SIZES + [
        ("sizes", str, "320,640", "64", "latency image sizes"),
        ("recipes", str, "w8a8,w4a8", "w8a8", "our recipes (PTQ) to export"),
        ("yolo_shared", str, "w8a8", "w8a8", "YOLO11n only: these recipes again with one quantizer per tensor "
         "(quantization.shared_activations, the structure NNCF's PTQ gives); 'none' for none"),
        ("reps", int, 20, 3, "calls per timing round"),
        ("rounds", int, 5, 1, "interleaved timing rounds"),
        ("calib", int, 64, 8, "calibration images (every method)"),
        ("threads", int, 2, 1, "onnxruntime / OpenVINO threads"),
        ("detectors", str, "yolo11n,rtmdet-tiny", "yolo11n", "detectors exported (bench_deploy.py, bench_deploy_mmdet.py)"),
    ],
    "peers": YOLO_SIZES + [
        ("qat_epochs", int, SCRIPT_DEFAULT, 1, "QAT epochs of the QAT rows (and the float fine-tune)"),
        ("calib", int, SCRIPT_DEFAULT, 8, "calibration images (every tool)"),
        ("threads", int, SCRIPT_DEFAULT, 1, "onnxruntime / OpenVINO threads"),
        ("seeds", str, "0,1", "0", "training seeds of the QAT rows and the float fine-tune (the table shows the "
         "mean and min–max over them; PTQ rows do not depend on the seed and run once)"),
    ],
}


# ================================================================================================ helpers
def flags(args, names: list[str], rename: dict | None = None) -> list[str]:
    """``--name value`` for each of ``names`` that is set (a ``None`` size keeps the script's default)."""
    out = []
    for name in names:
        value = getattr(args, name)
        if value is not None:
            out += [f"--{(rename or {}).get(name, name).replace('_', '-')}", str(value)]
    return out


def yolo_flags(args) -> list[str]:
    return flags(args, [d for d, *_ in YOLO_SIZES])


def _portable(value, out: Path) -> str:
    """An argument with the results folder's and this checkout's paths replaced, so that a record made in one
    clone (or folder) matches in another."""
    return str(value).replace(str(out), "<out>").replace(str(suite.REPO), "<repo>")


# Script edits that run, for every unit of this suite, what the script ran before (they only add options whose
# defaults keep the old behaviour): (script, content of the unit's record, content now) -> what changed. A record
# with the older content is reused against exactly the newer one; any later edit needs its own line here.
SAME_RUNS_AS = {
    ("bench_ptq_mmdet.py", "9fa5e6a757c46ce4", "cfdd953aae406df8"):
        "--config, --num-train, --num-val added (defaults: RTMDet-tiny, 256, 64, as before); a config without "
        "custom_hooks accepted; a model that detects nothing scores mAP 0 instead of failing",
    ("bench_ptq_mmdet.py", "3f7de9431e6360bb", "cfdd953aae406df8"):
        "a model that detects nothing scores mAP 0 instead of failing (CocoMetric returns no metrics then)",
    ("bench_fisher_mmdet.py", "c249aff78ea9e7f9", "23a6046f3cea8d77"):
        "the float model from _mmdet.cached_float_model: the same two cached trainings, called from one helper",
    ("bench_lightning.py", "2e37f4ce4e244450", "7b004f1fe249c771"): "the docstring names --ptq-images",
}


def script_content(script: str) -> str:
    """What a run record keeps of a benchmark script's content (``script_sha256``)."""
    return hashlib.sha256((suite.REPO / "benchmarks" / script).read_bytes()).hexdigest()[:16]


def run_logged(args, name: str, script: str, script_args: list, output: Path | None = None, *,
               threads_matter: bool = True, list_flag: str | None = None) -> dict:
    """Run a script (one thread per process with ``--threads 1``), its log under ``raw/logs/``; what ran.

    With ``--resume`` a unit whose record (``raw/logs/<name>.run.json``) shows the same script (by content:
    a changed default runs it again, unless ``SAME_RUNS_AS`` declares the two versions to run the same; records
    written before the content was recorded match on the name),
    arguments and environment, and whose ``output`` is still there, is not run again: its record is returned,
    marked ``reused``. That lets a question of several hours be finished over several sittings, one unit at a
    time. ``threads_matter=False`` (accuracy units: threads change how long a run takes, not what it
    measures): a record made with another thread count is reused too; it keeps the count it ran with.
    ``list_flag`` (a flag whose value is a comma list, e.g. ``--variants``): a record that ran every item asked
    and more is reused too (the caller keeps the rows it asked for)."""
    env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)} if args.threads else {}
    log = args.out / "raw" / "logs" / f"{name}.log"
    record_path = log.with_suffix(".run.json")
    wanted = {"name": name, "script": script, "args": [_portable(a, args.out) for a in script_args], "env": env}
    content = script_content(script)
    if getattr(args, "resume", False) and output is not None and output.is_file() and record_path.is_file():
        record = json.loads(record_path.read_text())
        same = (lambda r: r) if threads_matter else _without_threads
        recorded = record.get("script_sha256", content)
        asked = _covered_by(wanted, record, list_flag)
        if same({k: record.get(k) for k in asked}) == same(asked) and (
                recorded == content or (script, recorded, content) in SAME_RUNS_AS):
            print(f"[{name}] reused: finished {record.get('finished', '?')} in {record['seconds']:.0f} s "
                  f"({record_path.name}{'' if recorded == content else '; an earlier version of the script that runs the same'})",
                  flush=True)
            return {**record, "log": str(log), "reused": True}
        print(f"[{name}] its record differs from this run's settings: running it again", flush=True)
    print(f"[{name}] {script} {' '.join(map(str, script_args))}", flush=True)
    started_at = suite.git_state()  # the code the run imports is the code at its start, not at its end
    seconds = run_script(script, script_args, log, env)
    print(f"[{name}] done in {seconds:.0f} s", flush=True)
    record = {**wanted, "script_sha256": content, "seconds": round(seconds, 1),
              "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "commit": started_at.get("commit"),
              "dirty_at_start": started_at.get("dirty"),
              "cpu": suite.machine_info()["cpu"]}  # a resumed question mixes sittings, maybe machines
    record_path.parent.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record, indent=1))
    return {**record, "args": [str(a) for a in script_args], "log": str(log)}


def _covered_by(wanted: dict, record: dict, list_flag: str | None) -> dict:
    """``wanted`` with its ``list_flag`` value replaced by the record's where the record's list holds every item
    of it (so the two compare equal); ``wanted`` as it is otherwise."""
    mine, theirs = list(wanted["args"]), list(record.get("args") or [])
    if list_flag is None or list_flag not in mine or list_flag not in theirs:
        return wanted
    i, j = mine.index(list_flag) + 1, theirs.index(list_flag) + 1
    if set(split(mine[i])) <= set(split(theirs[j])):
        mine[i] = theirs[j]
    return {**wanted, "args": mine}


def _without_threads(unit: dict) -> dict:
    """A unit's record without its thread count (the ``--threads`` flag and the thread environment)."""
    flags_ = list(unit.get("args") or [])
    if "--threads" in flags_:
        i = flags_.index("--threads")
        del flags_[i:i + 2]
    return {**unit, "args": flags_, "env": None}


def read_json(path: Path, ran: dict) -> dict:
    if not path.is_file():
        raise suite.ScriptFailed(f"{ran['script']} finished but wrote no {path} (log: {ran['log']})")
    return json.loads(path.read_text())


def ratio(value, reference, what: str):
    """``value ÷ reference`` (``what`` names the reference), or why there is none."""
    if not isinstance(value, (int, float)):
        return not_measured("no value to divide")
    if not isinstance(reference, (int, float)):
        return not_measured(f"no {what}")
    if reference <= 0:
        return not_measured(f"{what} is {reference:g}")
    return value / reference


def mean_spread(values: list, key: str) -> dict:
    """``{key: mean, key_min, key_max}`` of numbers, or the first reason among them."""
    reasons = [v for v in values if is_reason(v)]
    if reasons:
        return {key: reasons[0]}
    return {key: statistics.fmean(values), f"{key}_min": min(values), f"{key}_max": max(values)}


def split(text: str) -> list[str]:
    return [t for t in str(text).split(",") if t]


def chosen(args, question: str, option: str, known, values: list[str] | None = None) -> list[str]:
    """The comma-separated ``--<option>`` values (or ``values`` read from it), all of them in ``known`` (else exit
    naming the unknown ones)."""
    values = split(getattr(args, option)) if values is None else values
    unknown = [v for v in values if v not in known]
    if unknown:
        raise SystemExit(f"{question}: unknown --{option} {unknown}; known: {', '.join(known)}")
    return values


def label_of(row: dict, keys: list[str]) -> str:
    return " ".join(str(row[k]) for k in keys if row.get(k))


# ================================================================================================ accuracy
BITS_ORDER = ("w8a8", "w4a8", "w4a4")
QAT_METHODS = {"plain": "QAT LSQ", "curriculum": "QAT + curriculum", "distillation": "QAT + distillation",
               "both": "CR-QAT (curriculum + distillation)"}
FISHER_METHODS = {"plain": "Fisher study: plain QAT", "mp": "QAT + Fisher mixed precision",
                  "reg": "QAT + Fisher-trace regulariser", "both": "QAT + Fisher mixed precision + regulariser",
                  "crqat": "Fisher study: CR-QAT", "crqat-fisher": "CR-QAT + Fisher mixed precision + regulariser"}
# bench_lightning.py --accuracy: the example's recipe name of each method at one bit width, the row's method, and
# the widths it has a preset for
LIGHTNING_METHODS = {"qat": ("{}", QAT_METHODS["plain"], BITS_ORDER),
                     # the <bits>-ptq preset calibrates with MSE, as bench_ptq*.py's mse variant
                     "ptq": ("{}-ptq", "PTQ mse", BITS_ORDER),
                     "taskq": ("{}-taskq", "PTQ taskq", BITS_ORDER),
                     "crqat": ("{}+crqat", QAT_METHODS["both"], BITS_ORDER),
                     # the Fisher presets are 4-bit ones, as in the fisher sources
                     "crqat-fisher": ("{}-fisher+crqat", FISHER_METHODS["crqat-fisher"], ("w4a8", "w4a4"))}
# the ptq-lightning source: the PTQ baselines the lightning source's runs came without (examples/lightning_fcos.py
# names them <bits>-ptq+<method>), a unit of its own so those runs are reused; its rows join the lightning source's
LIGHTNING_PTQ_METHODS = {m: (f"{{}}-ptq+{m}", f"PTQ {m}", BITS_ORDER) for m in ("minmax", "adaround", "qdrop")}


def accuracy_row(trainer: str, model: str, bits: str, method: str, seed, map50_95, float_map, **extra) -> dict:
    """One normalised accuracy row: the fraction of float kept is computed here, the same way for every source."""
    return {"trainer": trainer, "model": model, "bits": bits, "method": method, "seed": seed, "map50_95": map50_95,
            **extra, "kept": ratio(map50_95, float_map, "float mAP50-95"), "float_map50_95": float_map}


def ptq_runs(args, name, script, trainer, model, seed, extra=(), methods=None):
    methods = args.ptq_methods if methods is None else methods
    out = args.out / "raw" / name / f"seed{seed}"
    ran = run_logged(args, f"{name}_seed{seed}", script, [
        "--bits", args.bits, "--variants", methods, "--seed", seed, "--out", out, *extra,
        *flags(args, ["ptq_images", "ptq_iterations", "threads"], {"ptq_images": "images", "ptq_iterations": "iterations"})],
        output=out / "ptq.json", threads_matter=False)
    data = read_json(out / "ptq.json", ran)
    got = {(r["bits"], r["variant"]) for r in data["rows"]}
    missing = [f"{b} {v}" for b in split(args.bits) for v in split(methods) if (b, v) not in got]
    if missing:
        raise suite.ScriptFailed(f"{script}: no result for {', '.join(missing)} (see {ran['log']})")
    float_map = data["float_map50_95"]
    return ran, [accuracy_row(trainer, model, r["bits"], f"PTQ {r['variant']}", seed, r["map50_95"], float_map)
                 for r in data["rows"] if r["variant"] != "float"]


def qat_ultralytics_runs(args, seed):
    out = args.out / "raw" / "qat" / f"seed{seed}"
    ran = run_logged(args, f"qat_seed{seed}", "bench_crqat_ultralytics.py", [
        "--bits", args.bits, "--variants", args.qat_variants, "--seed", seed, "--out", out, *yolo_flags(args),
        *flags(args, ["qat_epochs"])], output=out / "results.json", threads_matter=False)
    data = read_json(out / "results.json", ran)
    # its "retained" is of the better of the float model and its fine-tune with QAT's budget
    float_map = max(data["float"]["map50_95"], data["float_finetune"]["map50_95"])
    return ran, [accuracy_row("Ultralytics", "YOLO11n", r["bits"], QAT_METHODS[r["variant"]], seed, r["map50_95"],
                              float_map) for r in data["rows"]]


def fisher_runs(args, seed):
    out = args.out / "raw" / "fisher" / f"seed{seed}"
    # the regulariser every 12 steps, as in the presets (every 4 cost ~1.8x plain QAT a step); explicit in the record
    ran = run_logged(args, f"fisher_seed{seed}", "bench_fisher.py", [
        "--bits", args.fisher_bits, "--variants", args.fisher_variants, "--seeds", seed, "--reg-every", 12,
        "--out", out, *yolo_flags(args),
        *flags(args, ["qat_epochs"])], output=out / "results.json", threads_matter=False)
    data = read_json(out / "results.json", ran)
    float_map = data["float"]["map50_95"]
    return ran, [accuracy_row("Ultralytics", "YOLO11n", r["bits"], FISHER_METHODS[r["variant"]], seed, r["map50_95"],
                              float_map, critical_map50_95=r["critical_map50_95"]) for r in data["rows"]]


DINO = "DINO (CSPNeXt-tiny)"


def fisher_mmdet_runs(args, seed, name="fisher-mmdet", variants=None, bits=None, methods=None, model=DINO, extra=()):
    """``bench_fisher_mmdet.py`` (the slim DINO) at ``bits`` (default ``--fisher-bits``) with ``variants`` (default
    ``--fisher-mmdet-variants``); ``crqat-dino`` is the same script with ``--dino-crqat-variants``, a unit of its
    own so that the Fisher study's runs are reused as they are, and ``qat-dino`` with ``--dino-qat-variants`` at
    ``--dino-qat-bits`` (W8A8, which the 4-bit Fisher study leaves out); ``methods`` names each variant's row
    (default: the Fisher study's names). ``crqat-rtmdet`` runs it on another ``model`` (``extra``: its config)."""
    variants = args.fisher_mmdet_variants if variants is None else variants
    methods = FISHER_METHODS if methods is None else methods
    bits = args.fisher_bits if bits is None else bits
    out = args.out / "raw" / name / f"seed{seed}"
    # its own sizes (DINO, 160 px, 256 / 64 images); the regulariser every 12 steps as in the presets
    ran = run_logged(args, f"{name}_seed{seed}", "bench_fisher_mmdet.py", [
        "--bits", bits, "--variants", variants, "--seeds", seed, "--reg-every", 12, "--out", out, *extra,
        *flags(args, ["threads"])], output=out / "results.json", threads_matter=False, list_flag="--variants")
    data = read_json(out / "results.json", ran)
    asked = split(variants)
    # a reused study may have run more variants than asked (fisher-mmdet's first runs had the regulariser's too)
    data["rows"] = [r for r in data["rows"] if r["variant"] in asked]
    got = {(r["bits"], r["variant"]) for r in data["rows"]}  # it writes after every run: a cut-off study is partial
    missing = [f"{b} {v}" for b in split(bits) for v in asked if (b, v) not in got]
    if missing:
        raise suite.ScriptFailed(f"bench_fisher_mmdet.py: no result for {', '.join(missing)} (see {ran['log']})")
    float_map = data["float"]["map50_95"]
    return ran, [accuracy_row("MMDetection", model, r["bits"], methods[r["variant"]], seed,
                              r["map50_95"], float_map, critical_map50_95=r["critical_map50_95"])
                 for r in data["rows"]]


def dino_ptq_runs(args, seed, name, methods):
    """``bench_ptq_mmdet.py`` on the slim DINO's config with ``methods``."""
    return ptq_runs(args, name, "bench_ptq_mmdet.py", "MMDetection", DINO, seed, ["--config", "dino_cspnext_synthetic"],
                    methods)


def qat_mmdet_runs(args, seed):
    path = args.out / "raw" / "qat-mmdet" / f"seed{seed}.json"
    ran = run_logged(args, f"qat-mmdet_seed{seed}", "bench_crqat_mmdet.py", [
        "--bits", args.bits, "--variants", args.qat_variants, "--seed", seed, "--json", path,
        *flags(args, ["threads"])], output=path, threads_matter=False)
    data = read_json(path, ran)
    float_map = max(data["float_map50_95"], data["float_finetune_map50_95"])
    return ran, [accuracy_row("MMDetection", "RTMDet-tiny", r["bits"], QAT_METHODS[r["variant"]], seed, r["map50_95"],
                              float_map) for r in data["rows"]]


def lightning_runs(args, seed, name="lightning", option="lightning_methods", methods=None):
    """``bench_lightning.py --accuracy`` (the example's float training, then each recipe from the float weights)
    with the ``--<option>`` methods of ``methods`` (default: ``LIGHTNING_METHODS``)."""
    methods = LIGHTNING_METHODS if methods is None else methods
    path = args.out / "raw" / name / f"seed{seed}.json"
    method_of = {methods[m][0].format(bits): (bits, methods[m][1])
                 for m in chosen(args, "accuracy", option, methods) for bits in split(args.bits)
                 if bits in methods[m][2]}
    ran = run_logged(args, f"{name}_seed{seed}", "bench_lightning.py", [
        "--accuracy", "--seed", seed, "--json", path, "--out", args.out / "raw" / name / f"seed{seed}",
        *flags(args, ["imgsz", "num_train", "num_val", "float_epochs", "qat_epochs", "ptq_images"]), "--recipes", *method_of],
        output=path, threads_matter=False)
    data = read_json(path, ran)
    missing = sorted(set(method_of) - {r["recipe"] for r in data["rows"]})
    if missing:
        raise suite.ScriptFailed(f"bench_lightning.py: no result for {', '.join(missing)} (see {ran['log']})")
    float_map = data["float_map50_95"]
    return ran, [accuracy_row("Lightning", "FCOS-R18 (torchvision)", *method_of[r["recipe"]], seed, r["map50_95"],
                              float_map) for r in data["rows"] if r["recipe"] in method_of]


SOURCES = {  # name -> rows of one seed
    # NNCF is the `peers` question's
    "ptq": lambda a, s: ptq_runs(a, "ptq", "bench_ptq.py", "Ultralytics", "YOLO11n", s, ["--no-nncf", *yolo_flags(a)]),
    "qat": qat_ultralytics_runs,
    "fisher": fisher_runs,
    "ptq-mmdet": lambda a, s: ptq_runs(a, "ptq-mmdet", "bench_ptq_mmdet.py", "MMDetection", "RTMDet-tiny", s),
    "qat-mmdet": qat_mmdet_runs,
    "fisher-mmdet": fisher_mmdet_runs,
    # the regulariser's variants in a unit of their own, to be rerun alone since the penalty got its cap (9d7d025),
    # which changes nothing in the plain and mixed-precision runs
    "fisher-mmdet-reg": lambda a, s: fisher_mmdet_runs(a, s, "fisher-mmdet-reg", a.fisher_mmdet_reg_variants),
    "crqat-dino": lambda a, s: fisher_mmdet_runs(a, s, "crqat-dino", a.dino_crqat_variants),
    # the same CR-QAT + Fisher study on RTMDet-tiny, from the 40-epoch float model ptq-mmdet uses (cached)
    "crqat-rtmdet": lambda a, s: fisher_mmdet_runs(a, s, "crqat-rtmdet", a.dino_crqat_variants, model="RTMDet-tiny",
                                                   extra=["--config", "rtmdet_tiny_synthetic", "--float-epochs", 40]),
    "qat-dino": lambda a, s: fisher_mmdet_runs(a, s, "qat-dino", a.dino_qat_variants, a.dino_qat_bits,
                                               {"plain": QAT_METHODS["plain"], "crqat": QAT_METHODS["both"]}),
    "ptq-dino": lambda a, s: dino_ptq_runs(a, s, "ptq-dino", a.dino_ptq_methods),
    # QDrop on the DINO came after ptq-dino's runs: its own unit keeps those reusable; its rows join ptq-dino's
    "qdrop-dino": lambda a, s: dino_ptq_runs(a, s, "qdrop-dino", "qdrop"),
    "lightning": lightning_runs,
    # the same float training (deterministic on one machine: the lightning source's float model again), then the
    # PTQ baselines
    "ptq-lightning": lambda a, s: lightning_runs(a, s, "ptq-lightning", "lightning_ptq_methods", LIGHTNING_PTQ_METHODS),
}

ACCURACY_COLUMNS = [
    Column("trainer", "trainer"), Column("model", "model"), Column("bits", "bits"), Column("method", "method"),
    Column("seeds", "seeds"),
    Column("map50_95", "mAP50-95", "number", ".4f", spread=True),
    Column("critical_map50_95", "critical mAP50-95", "number", ".4f", spread=True),
    Column("kept", "kept of float", "number", ".1%", spread=True),
    Column("float_map50_95", "float mAP50-95", "number", ".4f"),
]


def source_seeds(args) -> list[tuple[str, list[str]]]:
    """``--sources`` as (source, seeds): ``name`` runs ``--seeds``, ``name:0`` or ``name:0+1`` its own seeds (a
    source too slow for every seed in one sitting; the table's seeds column says which ran)."""
    entries = [(name, seeds) for name, _, seeds in (entry.partition(":") for entry in split(args.sources))]
    chosen(args, "accuracy", "sources", SOURCES, [name for name, _ in entries])
    bad = [f"{name}:{seeds}" for name, seeds in entries if seeds and not all(t.isdigit() for t in seeds.split("+"))]
    if bad:
        raise SystemExit(f"accuracy: --sources {bad}: seeds after ':' are integers joined by '+' (e.g. ptq-dino:0+1)")
    return [(name, seeds.split("+") if seeds else split(args.seeds)) for name, seeds in entries]


# a source whose rows belong in another's part of the table (a unit of its own only so the other's runs are reused)
ROWS_JOIN = {"qdrop-dino": "ptq-dino", "ptq-lightning": "lightning"}


def accuracy(args):
    commands, parts, joined = [], {}, set()
    for source, seeds in source_seeds(args):
        for seed in seeds:
            ran, rows = SOURCES[source](args, seed)
            commands.append(ran)
            part = ROWS_JOIN.get(source, source)
            parts.setdefault(part, []).extend(rows)
            if part != source:
                joined.add(part)
    runs = []
    for part, part_runs in parts.items():
        if part in joined:  # by bits, then the PTQ methods' order (a stable sort: the seeds keep their order)
            part_runs.sort(key=lambda r: (rank(r["bits"].lower(), BITS_ORDER),
                                          rank(r["method"].removeprefix("PTQ "), split(args.ptq_methods))))
        runs += part_runs
    rows = []
    upper_bits = [{**r, "bits": r["bits"].upper()} for r in runs]
    for row, group in seed_groups(upper_bits, ("trainer", "model", "bits", "method")):
        row.update(mean_spread([r["map50_95"] for r in group], "map50_95"))
        critical = [r.get("critical_map50_95") for r in group]
        row.update(mean_spread(critical, "critical_map50_95") if all(isinstance(c, (int, float)) for c in critical)
                   else {"critical_map50_95": not_measured("no critical-class score")})
        row.update(mean_spread([r["kept"] for r in group], "kept"))
        row["float_map50_95"] = statistics.fmean(r["float_map50_95"] for r in group)
        rows.append(row)
    notes = ["kept: mAP50-95 ÷ the float model's; QAT rows against the better of the float model and the float "
             "model fine-tuned with the same budget, as each script does; a cell with a range shows the mean and "
             "min–max over seeds", where_they_ran(commands)]
    return "mAP50-95 kept after quantization", ACCURACY_COLUMNS, rows, {"runs": runs, "commands": commands,
                                                                        "notes": notes}, plot_accuracy


def rank(value: str, order) -> int:
    """``value``'s place in ``order``; after all of them when it is not there."""
    return list(order).index(value) if value in order else len(order)


def seed_groups(runs: list[dict], keys: tuple[str, ...]) -> list[tuple[dict, list[dict]]]:
    """The runs grouped by ``keys`` (first-seen order): ``({key: value, ..., "seeds": "0,1"}, runs of the group)``."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    return [({**dict(zip(keys, values)), "seeds": ",".join(str(r["seed"]) for r in group)}, group)
            for values, group in groups.items()]


def where_they_ran(commands: list[dict]) -> str:
    """Which script runs ran on which CPU (from their records; records older than the field say so)."""
    by_cpu: dict[str, list[str]] = {}
    for c in commands:
        by_cpu.setdefault(c.get("cpu") or "a machine not recorded (records older than the field)", []).append(
            f"{c['name']} ({str(c.get('finished', '?'))[:10]})")
    return "runs by machine: " + "; ".join(f"{cpu}: {', '.join(names)}" for cpu, names in by_cpu.items())


def plot_accuracy(envelope, path):
    rows = envelope["rows"]
    suite.bar_plot(path, [label_of(r, ["trainer", "bits", "method"]) for r in rows],
                   {"kept of float mAP50-95": [r["kept"] for r in rows]}, "fraction of float mAP50-95",
                   envelope["title"], reference=1.0,
                   errors={"kept of float mAP50-95": [(r.get("kept_min"), r.get("kept_max")) for r in rows]})


# ================================================================================================ cost
COST_COLUMNS = [
    Column("trainer", "trainer"), Column("model", "model"), Column("config", "configuration"),
    Column("baseline", "÷"), Column("step_ms", "step ms", "number", ".1f"),
    Column("step_ratio", "step time ÷ (min–max)", "number", ".3f", spread=True),
    Column("val_ratio", "validation forward, within a pass ÷ (min–max)", "number", ".3f", spread=True),
    Column("val_first_ratio", "first forward after a step ÷ (min–max)", "number", ".3f", spread=True),
    Column("memory_mb", "memory MB", "number", ".1f"), Column("memory_ratio", "memory ÷", "number", ".3f"),
]
MEMORY_NOTE = "memory: what one training step holds for backward (each saved storage once) + parameters, " \
              "gradients and optimizer state (CPU PyTorch has no allocator peak)"


def ratio_cells(stats: dict, key: str) -> dict:
    return {key: stats["ratio_median"], f"{key}_min": stats["ratio_min"], f"{key}_max": stats["ratio_max"]}


def first_forward_cells(stats: dict | None, script: str) -> dict:
    """The first validation forward after a training step (new weights: quantized again; integer layers keep the
    float path for a weight seen once); the validation column is the third, as the rest of a validation pass runs
    (the second packs the integer weights, once per pass)."""
    if stats is None:
        return {"val_first_ratio": not_measured(f"this {script} run timed one forward per step")}
    return ratio_cells(stats, "val_first_ratio")


def cost_convnet(args):
    path = args.out / "raw" / "convnet.json"
    ran = run_logged(args, "convnet", "bench_fakequant_overhead.py", [
        "--json", path, *flags(args, ["imgsz", "batch", "threads"]), *flags(args, ["steps"], {"steps": "reps"})])
    data = read_json(path, ran)
    return ran, [{"trainer": "none (plain PyTorch)", "model": "YOLO-sized conv net", "config": r["variant"],
                  "baseline": "float", "step_ms": r["train"]["median_s"] * 1e3, **ratio_cells(r["train"], "step_ratio"),
                  **ratio_cells(r["val"], "val_ratio"),
                  **first_forward_cells(r.get("val_first"), "bench_fakequant_overhead.py"),
                  "memory_mb": r["memory_bytes"] / 2**20,
                  "memory_ratio": r["memory_ratio"]} for r in data["rows"]]


def cost_ultralytics(args):
    out = args.out / "raw" / "ultralytics"
    tiny_data = ["--num-train", "16", "--num-val", "4"] if args.quick else []  # it needs only 4 batches
    ran = run_logged(args, "ultralytics", "bench_ultralytics.py", [
        "--skip-accuracy", "--out", out, *tiny_data, *flags(args, ["imgsz", "batch", "steps"])])
    data = read_json(out / "results.json", ran)
    return ran, [{"trainer": "Ultralytics", "model": "YOLO11n", "config": name, "baseline": "float",
                  "step_ms": st["median_s"] * 1e3, **ratio_cells(st, "step_ratio"),
                  **ratio_cells(data["validation_forward_ratio_stats"][name], "val_ratio"),
                  **first_forward_cells((data.get("first_validation_forward_ratio_stats") or {}).get(name),
                                        "bench_ultralytics.py"),
                  "memory_mb": data["memory_bytes"][name] / 2**20, "memory_ratio": data["memory_ratio"][name]}
                 for name, st in data["step_time_ratio_stats"].items()]


def cost_mmdet(args):
    path = args.out / "raw" / "mmdet.json"
    ran = run_logged(args, "mmdet", "bench_mmdet.py", [
        "--json", path, *flags(args, ["imgsz", "batch", "threads"]), *flags(args, ["steps"], {"steps": "reps"})])
    data = read_json(path, ran)
    return ran, [{"trainer": "MMDetection", "model": "RTMDet-tiny", "config": r["variant"], "baseline": "float",
                  "step_ms": r["train"]["median_s"] * 1e3, **ratio_cells(r["train"], "step_ratio"),
                  **(ratio_cells(r["val"], "val_ratio") if "val" in r
                     else {"val_ratio": not_measured("this bench_mmdet.py run timed train_step only")}),
                  **first_forward_cells(r.get("val_first"), "bench_mmdet.py"),
                  "memory_mb": r["memory_bytes"] / 2**20, "memory_ratio": r["memory_ratio"]} for r in data["rows"]]


def cost_lightning(args):
    path = args.out / "raw" / "lightning.json"
    ran = run_logged(args, "lightning", "bench_lightning.py", [
        "--json", path, *flags(args, ["imgsz", "steps"]), *flags(args, ["batch"], {"batch": "batch_size"})])
    data = read_json(path, ran)
    return ran, [{"trainer": "Lightning", "model": "FCOS-R18 (torchvision)", "config": r["config"], "baseline": "float",
                  "step_ms": r["step_ms"], "step_ratio": r["step_ratio"],
                  "step_ratio_min": min(r["step_ratio_per_round"]), "step_ratio_max": max(r["step_ratio_per_round"]),
                  "val_ratio": not_measured("bench_lightning.py times training steps only"),
                  "val_first_ratio": not_measured("bench_lightning.py times training steps only"),
                  "memory_mb": r["memory_bytes"] / 2**20, "memory_ratio": r["memory_ratio"]} for r in data["rows"]]


def cost_ultralytics_alone(args):
    path = args.out / "raw" / "ultralytics_alone.json"
    quick = ["--rounds", "1", "--steps", "3", "--num-train", "16", "--num-val", "4"] if args.quick else []
    ran = run_logged(args, "ultralytics-alone", "bench_step_alone.py", [
        "--json", path, *quick, *flags(args, ["imgsz", "batch"])])
    data = read_json(path, ran)
    alone = "each configuration alone in its own process (float with glibc's default malloc)"
    return ran, [{"trainer": "Ultralytics", "model": f"YOLO11n, {alone}", "config": r["variant"], "baseline": "float",
                  "step_ms": r["step_ms"], "step_ratio": r["ratio_median"], "step_ratio_min": r["ratio_min"],
                  "step_ratio_max": r["ratio_max"],
                  "val_ratio": not_measured("bench_step_alone.py times training steps only"),
                  "val_first_ratio": not_measured("bench_step_alone.py times training steps only"),
                  "memory_mb": not_measured("bench_ultralytics.py's rows hold it"),
                  "memory_ratio": not_measured("bench_ultralytics.py's rows hold it")} for r in data["rows"]]


def cost_fisher_step(args):
    path = args.out / "raw" / "fisher_step.json"
    ran = run_logged(args, "fisher-step", "bench_fisher_step.py", [
        "--json", path, *flags(args, ["imgsz"]), *flags(args, ["steps"], {"steps": "rounds"})])
    data = read_json(path, ran)
    ratios = [r["ratio"] for r in data["rows"]]
    every = data["config"]["every"]
    return ran, [{"trainer": "Ultralytics", "model": "YOLO11n", "config": f"W4A8 + Fisher-trace regulariser every {every}",
                  "baseline": "plain W4A8 QAT", "step_ms": not_measured("per-epoch time only"),
                  "step_ratio": data["ratio_median"], "step_ratio_min": min(ratios), "step_ratio_max": max(ratios),
                  "val_ratio": not_measured("validation is unchanged by a training regulariser"),
                  "val_first_ratio": not_measured("validation is unchanged by a training regulariser"),
                  "memory_mb": not_measured("bench_fisher_step.py times epochs only"),
                  "memory_ratio": not_measured("bench_fisher_step.py times epochs only")}]


COST_SOURCES = {"convnet": cost_convnet, "ultralytics": cost_ultralytics, "mmdet": cost_mmdet,
                "lightning": cost_lightning, "ultralytics-alone": cost_ultralytics_alone, "fisher-step": cost_fisher_step}


def cost(args):
    commands, rows = [], []
    for source in chosen(args, "cost", "sources", COST_SOURCES):
        ran, got = COST_SOURCES[source](args)
        commands.append(ran)
        rows += got
    notes = ["each script measures its configurations side by side in one process, interleaved, so that load "
             "from other processes hits them alike; ratios are medians of per-repetition ratios", MEMORY_NOTE,
             "in those one-process rows float and quantized steps alike run with glibc's malloc keeping freed memory, "
             "which `detq_hooks.quantize` sets once per process (`detq_hooks.allocator`; each raw JSON records its "
             "status under `allocator`; `DETQ_MALLOC_TUNING=0` leaves malloc alone)",
             "rows 'each configuration alone in its own process' (bench_step_alone.py) are what a user's two runs "
             "see: one fresh process per configuration, in turns, float with glibc's default malloc; ratios are "
             "medians over rounds of each round's median step ÷ float's"]
    return "training step time and memory ÷ float", COST_COLUMNS, rows, {"commands": commands, "notes": notes}, plot_cost


def plot_cost(envelope, path):
    rows = envelope["rows"]
    suite.bar_plot(path, [label_of(r, ["model", "config"]) for r in rows],
                   {"step time ÷": [r["step_ratio"] for r in rows], "memory ÷": [r["memory_ratio"] for r in rows]},
                   "ratio to the baseline", envelope["title"], reference=1.0,
                   errors={"step time ÷": [(r.get("step_ratio_min"), r.get("step_ratio_max")) for r in rows]})


# ================================================================================================ deploy
def deploy_rows(data: dict, detector: str) -> list[dict]:
    """Rows of one ``bench_deploy*.py`` result: every exported file in each runtime, then the PyTorch models."""
    acc, sizes = data["map50_95"], data["sizes"]
    float_map = acc.get("float | pytorch")
    rows = []
    first = next(iter(sizes.values()))
    for key in first["latency"]:
        model, runtime = key.split(" | ")
        kind = "onnx" if runtime == "onnxruntime" else "ov"
        reference = "float | onnxruntime" if kind == "onnx" else "float | openvino f32"
        row = {"detector": detector, "model": model, "runtime": runtime, "file_mb": first["bytes"][model][kind] / 1e6,
               "map50_95": acc.get(key, not_measured("run without mAP (--skip-map)")),
               "kept": ratio(acc.get(key), float_map, "float mAP50-95"), **calibration_spread(data, key)}
        for size, r in sizes.items():
            lat = r["latency"][key]
            row.update({f"latency_ms_{size}": lat["median_ms"], f"latency_ms_{size}_min": lat["p10_ms"],
                        f"latency_ms_{size}_max": lat["p90_ms"],
                        f"speedup_{size}": r["latency"][reference]["median_ms"] / lat["median_ms"]})
            row.update(node_time_cells(r, key, size, runtime))
        rows.append(row)
    for key, value in acc.items():  # the PyTorch models the files were exported from
        model, runtime = key.split(" | ")
        if runtime == "pytorch":
            row = {"detector": detector, "model": model, "runtime": "PyTorch" + (" (fake-quant)" if model != "float" else ""),
                   "file_mb": not_measured("not exported"),
                   "map50_95": value, "kept": ratio(value, float_map, "float mAP50-95"), **calibration_spread(data, key)}
            row.update({f"{c}_{s}": not_measured("PyTorch is not timed") for s in sizes
                        for c in ("latency_ms", "speedup", "node_ms")})
            rows.append(row)
    return rows


def node_time_cells(size_result: dict, key: str, size, runtime: str) -> dict:
    """``node_ms_<size>`` (median, p10–p90): OpenVINO's own node time of one inference, or why there is none."""
    if runtime == "onnxruntime":
        return {f"node_ms_{size}": not_measured("OpenVINO only")}
    node = size_result.get("openvino_node_ms", {}).get(key)
    if node is None:
        return {f"node_ms_{size}": not_measured("not recorded by this run (older bench_deploy)")}
    return {f"node_ms_{size}": node["median_ms"], f"node_ms_{size}_min": node["p10_ms"],
            f"node_ms_{size}_max": node["p90_ms"]}


def calibration_spread(data: dict, key: str) -> dict:
    """``map50_95_min`` / ``_max`` over the calibration sets a model was calibrated on (one value where there was
    one set, or none, as for the float model)."""
    values = data.get("map50_95_subsets", {}).get(key) or [data["map50_95"].get(key)]
    return {"map50_95_min": min(values), "map50_95_max": max(values)} if None not in values else {}


def paired_notes(data: dict, detector: str) -> list[str]:
    """Our exported W8A8 PTQ models minus the peer's in the same runtime, calibrated on the same images, set by set."""
    return [f"{detector}: {ours} minus {peer}, mAP50-95 per calibration set (the same images calibrate both): "
            f"{', '.join(f'{d:+.4f}' for d in diffs)}"
            for ours, peer, diffs in suite.paired_differences(data.get("map50_95_subsets", {}))]


DEPLOY_SOURCES = {"yolo11n": "YOLO11n (Ultralytics)", "rtmdet-tiny": "RTMDet-tiny (MMDetection)"}


def deploy(args):
    commands, rows, raw, data, paired = [], [], {}, None, []

    def script_args(out, extra_recipes=()):
        return ["--out", out, "--sizes", *split(args.sizes), "--recipes", *split(args.recipes), *extra_recipes,
                *flags(args, ["reps", "rounds", "calib", "threads"])]

    for detector in chosen(args, "deploy", "detectors", DEPLOY_SOURCES):
        if detector == "yolo11n":
            out = args.out / "raw" / "deploy"
            shared = [f"{r}+shared" for r in split(args.yolo_shared) if r != "none"]
            ran = run_logged(args, "deploy", "bench_deploy.py", [*script_args(out, shared), *yolo_flags(args)],
                             output=out / "results.json")
        else:
            out = args.out / "raw" / "deploy-mmdet"
            ran = run_logged(args, "deploy-mmdet", "bench_deploy_mmdet.py", script_args(out),
                             output=out / "results.json")
        data = read_json(out / "results.json", ran)
        commands.append(ran)
        rows += deploy_rows(data, DEPLOY_SOURCES[detector])
        paired += paired_notes(data, DEPLOY_SOURCES[detector])
        raw[detector] = {k: data[k] for k in ("float_reference", "sizes")}
    columns = [Column("detector", "detector"), Column("model", "model"), Column("runtime", "runtime"),
               Column("file_mb", "file MB", "number", ".2f"),
               Column("map50_95", f"mAP50-95 ({data.get('map_imgsz', 160)} px; PTQ: mean, min–max over calibration sets)",
                      "number", ".4f", spread=True),
               Column("kept", "kept of float", "number", ".1%")]
    for size in data["sizes"]:
        columns += [Column(f"latency_ms_{size}", f"ms @{size} px (p10–p90)", "number", ".2f", spread=True),
                    Column(f"speedup_{size}", f"× float f32 @{size}", "number", ".2f"),
                    Column(f"node_ms_{size}", f"OpenVINO node ms @{size}", "number", ".2f", spread=True)]
    notes = [f"batch 1, {data['machine']['threads']} thread(s); every runner of one size timed side by side in "
             "interleaved rounds; × float f32: float's median in the same runtime (OpenVINO at f32) ÷ this one's",
             "OpenVINO node ms: the sum of the CPU plugin's executed node times per inference (PERF_COUNT, a second "
             "interleaved pass): it leaves out thread scheduling, so it spreads by a few percent where wall-clock "
             "latency on this shared machine spreads by tens of percent; compare OpenVINO files by it, wait times by ms",
             "RTMDet-tiny files end at the head's raw outputs (its decoding and NMS run in PyTorch, outside the graph); "
             "YOLO11n files include the box decode", *paired]
    return "exported models in onnxruntime and OpenVINO vs float", columns, rows, \
        {"commands": commands, "notes": notes, "raw": raw}, plot_deploy


def plot_deploy(envelope, path):
    rows = envelope["rows"]
    suite.bar_plot(path, [label_of(r, ["detector", "model", "runtime"]) for r in rows],
                   {"mAP50-95 kept of float": [r["kept"] for r in rows]}, "fraction of float mAP50-95",
                   envelope["title"], reference=1.0)


# ================================================================================================ peers
PEERS_COLUMNS = [Column("tool", "tool"), Column("method", "method"), Column("bits", "bits"), Column("runtime", "runs in"),
                 Column("seeds", "seeds"), Column("map50_95", "mAP50-95", "number", ".4f", spread=True),
                 Column("kept", "kept of float", "number", ".1%", spread=True),
                 Column("seconds", "wall s", "number", ".0f")]
PEERS_OURS = "detq-hooks"  # our QAT is paired, seed by seed, with every other QAT tool


def peers_of_seed(data: dict, seed: str) -> list[dict]:
    """One seed's ``bench_peers.py`` rows with ``kept``: PTQ rows ÷ the float model, QAT rows ÷ the better of the
    float model and its fine-tune with the same budget (that seed's)."""
    measured = {r["kind"]: r.get("map50_95") for r in data["rows"]}
    float_map = measured.get("float")
    qat_reference = max((m for k, m in measured.items() if k in ("float", "float-finetune") and m is not None),
                        default=None)
    rows = []
    for r in data["rows"]:
        row = {k: r[k] for k in ("tool", "method", "bits", "runtime", "kind")}
        row.update(seed=seed, seconds=r["seconds"])
        if "error" in r:
            row.update(map50_95=not_available(r["error"]), kept=not_available("see mAP50-95"))
        else:
            reference = qat_reference if r["kind"] in ("qat", "float-finetune") else float_map
            row.update(map50_95=r["map50_95"], kept=ratio(r["map50_95"], reference, "float mAP50-95"))
        rows.append(row)
    return rows


def peers(args):
    commands, runs = [], []
    seeds = split(args.seeds)
    for i, seed in enumerate(seeds):
        path = args.out / "raw" / f"peers_seed{seed}.json"
        ran = run_logged(args, f"peers_seed{seed}", "bench_peers.py", [
            "--json", path, "--out", args.out / "raw" / f"peers_seed{seed}", *yolo_flags(args),
            *flags(args, ["qat_epochs", "calib", "threads"]), "--seed", seed,
            *([] if i == 0 else ["--skip-ptq"])], output=path)  # PTQ rows do not depend on the training seed
        commands.append(ran)
        runs += peers_of_seed(read_json(path, ran), seed)
    rows = []
    for row, group in seed_groups(runs, ("tool", "method", "bits", "runtime")):
        row.update(mean_spread([r["map50_95"] for r in group], "map50_95"))
        row.update(mean_spread([r["kept"] for r in group], "kept"))
        row["seconds"] = statistics.fmean(r["seconds"] for r in group)
        rows.append(row)
    notes = ["same float model, data and calibration images for every tool; kept: PTQ rows ÷ the float model's mAP, "
             "QAT rows ÷ the better of it and its fine-tune with the same budget and seed; a cell with a range shows "
             "the mean and min–max over the seeds, PTQ rows (which no seed changes) run once",
             "ours, the float fine-tune and Ultralytics quantize=8 train in Ultralytics' trainer (its optimizer, "
             "warm-up and EMA); NNCF's PyTorch QAT has no such trainer and runs a plain loop with Ultralytics' loss "
             "(AdamW, lr 5e-4, no warm-up or EMA), so its row is the same budget, not the same recipe",
             *paired_qat_notes(runs)]
    return "other tools' quantization of the same float model", PEERS_COLUMNS, rows, \
        {"commands": commands, "notes": notes, "runs": runs}, plot_peers


def paired_qat_notes(runs: list[dict]) -> list[str]:
    """Our QAT minus each other QAT tool, seed by seed (same float start, data, budget and seed)."""
    by_seed = {}
    for r in runs:
        if r["kind"] == "qat" and isinstance(r["map50_95"], (int, float)):
            by_seed.setdefault((r["tool"], r["method"]), {})[r["seed"]] = r["map50_95"]
    ours = next((v for (tool, _), v in by_seed.items() if tool == PEERS_OURS), None)
    notes = []
    for (tool, method), theirs in by_seed.items():
        if ours is None or tool == PEERS_OURS:
            continue
        seeds = [s for s in ours if s in theirs]
        if seeds:
            diffs = ", ".join(f"seed {s} {ours[s] - theirs[s]:+.4f}" for s in seeds)
            notes.append(f"our QAT minus {tool} {method.split(' (')[0].split(',')[0]}, mAP50-95 per seed: {diffs}")
    return notes


def plot_peers(envelope, path):
    rows = envelope["rows"]
    suite.bar_plot(path, [label_of(r, ["tool", "method"]) for r in rows],
                   {"mAP50-95 kept of float": [r["kept"] for r in rows]}, "fraction of float mAP50-95",
                   envelope["title"], reference=1.0)


# ================================================================================================ report
def report(args) -> int:
    """Rewrite the README section between the markers from ``<results>/<question>/<question>.json``."""
    readme = args.readme.resolve()
    text = readme.read_text()
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise SystemExit(f"report: {readme} needs one `{BEGIN}` line followed by one `{END}` line")
    from rich.console import Console
    from rich.table import Table

    summary = Table(title=f"README section from {args.results}", title_justify="left")
    for label in ("question", "status", "date", "commit", "rows"):
        summary.add_column(label)
    sections = []
    for question in suite.QUESTIONS:
        path = args.results / question / f"{question}.json"
        if not path.is_file():
            sections.append(f"#### `{question}`\n\nNot run yet: `python benchmarks/run.py {question}`.\n")
            summary.add_row(question, "not run yet", "", "", "")
            continue
        envelope = json.loads(path.read_text())
        problems = suite.envelope_problems(envelope)
        if problems:
            raise SystemExit(f"report: {path} is malformed: {'; '.join(problems)}")
        sections.append(section(envelope, path, readme.parent))
        summary.add_row(question, "quick (smoke)" if envelope["settings"].get("quick") else "measured",
                        envelope["date"], (envelope["git"]["commit"] or "?")[:10], str(len(envelope["rows"])))
    body = "\n".join(sections)
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    readme.write_text(f"{head}{BEGIN}\n<!-- written by `python benchmarks/run.py report`; edit the JSON, not this -->\n\n"
                      f"{body}\n{END}{tail}")
    Console(width=120).print(summary)
    print(f"wrote {readme}")
    return 0


def reused_runs(envelope: dict) -> str:
    """Where a ``--resume`` reused script runs, when and at which commit they ran: the question's own time, date,
    commit and load are then this rendering's, not the measurement's."""
    reused = [c for c in envelope.get("commands", []) if c.get("reused")]
    if not reused:
        return ""
    runs = "; ".join(f"{c['name']} {c['seconds']:.0f} s, finished {c.get('finished', '?')} at commit "
                     f"{(c.get('commit') or '?')[:10]}{' (uncommitted changes)' if c.get('dirty_at_start') else ''}"
                     for c in reused)
    return (f" {len(reused)} of its {len(envelope['commands'])} script runs were reused from earlier sittings "
            f"(`--resume`), so the time above is not theirs: {runs}.")


def section(envelope: dict, path: Path, readme_dir: Path) -> str:
    m, git = envelope["machine"], envelope["git"]
    commit = (git["commit"] or "unknown")[:10] + (" (uncommitted changes)" if git["dirty"] else "")
    quick = " **Quick smoke run (`--quick`): tiny sizes, not a measurement.**" if envelope["settings"].get("quick") else ""
    png = Path(os.path.relpath(path.with_suffix(".png"), readme_dir)).as_posix()
    load = f", load average {m['load_average'][0]}" if m.get("load_average") else ""
    lines = [f"#### `{envelope['question']}`: {envelope['title']}", "",
             f"`{envelope['command']}` — {envelope['date']}, commit {commit}, {envelope['wall_s']:.0f} s on "
             f"{m['cpu']} ({m['logical_cores']} logical cores, {m['ram_gib']} GiB, {m['os']}, Python {m['python']}"
             f"{load}).{quick}{reused_runs(envelope)}", "",
             suite.markdown_table(suite.columns_of(envelope), envelope["rows"]).rstrip("\n"), ""]
    lines += [f"{note}." if not note.endswith(".") else note for note in envelope.get("notes", [])]
    lines += ["", f"[plot]({png}) · [JSON]({Path(os.path.relpath(path, readme_dir)).as_posix()})", ""]
    return "\n".join(lines)


# ================================================================================================ main
QUESTIONS = {"accuracy": accuracy, "cost": cost, "deploy": deploy, "peers": peers}
HELP = {"accuracy": "mAP50-95 kept after PTQ / QAT per trainer, model, bits and method (seeds: mean, min–max)",
        "cost": "training step time, validation time and memory of each configuration ÷ float",
        "deploy": "exported models in onnxruntime and OpenVINO: file size, latency and mAP vs float",
        "peers": "onnxruntime quantize_static, NNCF PTQ / QAT, Ultralytics quantize=8 beside ours, same float model",
        "report": "rewrite the README's results section from the questions' JSON files"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmarks/run.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="question", required=True)
    for name, text in HELP.items():
        q = sub.add_parser(name, help=text, description=text)
        q.add_argument("--quick", action="store_true", help="smoke-test sizes: a few minutes on 2 CPU cores")
        if name == "report":
            q.add_argument("--results", type=Path, default=None,
                           help="folder of <question>/<question>.json (default benchmarks/results/suite, "
                                "with --quick benchmarks/results/suite-quick)")
            q.add_argument("--readme", type=Path, default=suite.REPO / "README.md")
            continue
        q.add_argument("--out", type=Path, default=None,
                       help=f"results folder (default benchmarks/results/suite/{name}; --quick: suite-quick/{name})")
        if name in ("accuracy", "deploy", "peers"):
            q.add_argument("--resume", action="store_true",
                           help="reuse each script run (accuracy: source × seed; deploy: detector; peers: seed) already finished "
                                "with the same settings (its record under raw/logs/); run only the missing ones")
        for dest, kind, full, quick, text in SIZES[name]:
            full_text = "the script's default" if full is None else full
            q.add_argument(f"--{dest.replace('_', '-')}", dest=dest, type=kind, default=None,
                           help=f"{text} (default: {full_text}; --quick: {quick})")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    folder = "suite-quick" if args.quick else "suite"
    if args.question == "report":
        args.results = args.results or RESULTS / folder
        return report(args)
    for dest, _, full, quick, _ in SIZES[args.question]:
        if getattr(args, dest) is None:
            setattr(args, dest, quick if args.quick else full)
    args.out = (args.out or RESULTS / folder / args.question).resolve()
    started = time.perf_counter()
    try:
        title, columns, rows, extra, plot = QUESTIONS[args.question](args)
    except suite.ScriptFailed as e:
        print(f"{args.question}: {e}", file=sys.stderr)
        return 1
    settings = {k: v for k, v in vars(args).items() if k != "question"}
    envelope = suite.build_envelope(args.question, title, argv, settings, columns, rows,
                                    time.perf_counter() - started, **extra)
    paths = suite.write_outputs(args.out, envelope, plot)
    suite.print_rich_table(envelope)
    print(f"wrote {paths['json']}, {paths['md'].name}, {paths['png'].name} in {envelope['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
