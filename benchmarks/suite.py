"""The results envelope every question of ``benchmarks/run.py`` writes, and its three renderings.

One JSON file per question holds what was measured *and* what it was measured on: the question, the exact
command line, every setting, the machine, the library versions, the date, the git commit (and whether the tree
had uncommitted changes), the wall time, the columns and the rows. The markdown table, the rich table, the PNG
and the README section are all rendered from that JSON, so they cannot disagree with it.

A cell of a ``number`` column is a finite number or a reason string (``not available here: ...`` or
``not measured: ...``) -- never NaN, never silently empty.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Iterable, Sequence

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = ("accuracy", "cost", "deploy", "peers")  # the ones that measure; `report` renders them
ENVELOPE_KEYS = ("question", "title", "command", "settings", "machine", "versions", "date", "git", "wall_s",
                 "columns", "rows")
NOT_AVAILABLE = "not available here: "
NOT_MEASURED = "not measured: "
# distribution name -> key in the envelope (import names would cost seconds of imports each)
LIBRARIES = {"torch": "torch", "torchvision": "torchvision", "ultralytics": "ultralytics", "mmdet": "mmdet",
             "mmengine": "mmengine", "mmcv": "mmcv", "lightning": "lightning", "onnxruntime": "onnxruntime",
             "openvino": "openvino", "nncf": "nncf", "nvidia-modelopt": "modelopt", "detq-hooks": "detq_hooks"}


def not_available(reason: str) -> str:
    return NOT_AVAILABLE + reason


def not_measured(reason: str) -> str:
    return NOT_MEASURED + reason


def is_reason(value) -> bool:
    return isinstance(value, str) and value.startswith((NOT_AVAILABLE, NOT_MEASURED))


@dataclass(frozen=True)
class Column:
    """One column of a question's table. ``spread``: the row also holds ``<key>_min`` / ``<key>_max`` (over
    seeds or repetitions), shown as ``value (min–max)``."""

    key: str
    label: str
    kind: str = "text"  # "text" or "number"
    fmt: str = ""  # format spec of a number, e.g. ".4f", ".1%"
    spread: bool = False


# ------------------------------------------------------------------------------------------ the envelope
def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    ram_gib = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram_gib = round(int(line.split()[1]) / 2**20, 1)
                break
    except OSError:  # not Linux: platform's answer stands
        pass
    return {"cpu": cpu, "logical_cores": os.cpu_count(), "ram_gib": ram_gib, "os": platform.platform(),
            "python": platform.python_version(), "load_average": _load_average()}


def _load_average():
    # other processes' load is what makes timings on a shared machine untrustworthy: record it
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def library_versions() -> dict:
    out = {}
    for dist, key in LIBRARIES.items():
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[key] = None
    return out


def git_state(repo: Path = REPO) -> dict:
    def git(*args):
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30)

    head = git("rev-parse", "HEAD")
    if head.returncode:
        return {"commit": None, "dirty": None}
    # untracked files (results being written, say) do not change what ran
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


def command_line(argv: Sequence[str]) -> str:
    """``python benchmarks/run.py <argv>``, the script path relative to the checkout."""
    script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else REPO / "benchmarks" / "run.py"
    try:
        script = script.relative_to(REPO)
    except ValueError:
        pass
    return shlex.join(["python", str(script), *argv])


def build_envelope(question: str, title: str, argv: Sequence[str], settings: dict, columns: Sequence[Column],
                   rows: list[dict], wall_s: float, **extra) -> dict:
    """The JSON every question writes; ``extra`` (notes, per-run raw rows, ...) goes after the envelope keys."""
    envelope = {"question": question, "title": title, "command": command_line(argv),
                "settings": {k: _plain(v) for k, v in settings.items()}, "machine": machine_info(),
                "versions": library_versions(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "git": git_state(), "wall_s": round(wall_s, 1), "columns": [asdict(c) for c in columns],
                "rows": [{k: _finite_or_reason(v) for k, v in r.items()} for r in rows]}
    envelope.update(extra)
    problems = envelope_problems(envelope)
    if problems:
        raise ValueError(f"{question}: malformed results: " + "; ".join(problems))
    return envelope


def _plain(value):
    return value if isinstance(value, (str, int, float, bool, type(None), list, dict)) else str(value)


def _finite_or_reason(value):
    if isinstance(value, float) and not math.isfinite(value):
        return not_measured(f"the measurement gave {value}")
    return value


def envelope_problems(envelope: dict) -> list[str]:
    """What is wrong with an envelope (empty: well formed): missing keys, no rows, a number cell that is
    neither a finite number nor a reason."""
    problems = [f"missing key {k!r}" for k in ENVELOPE_KEYS if k not in envelope]
    if problems:
        return problems
    if not envelope["rows"]:
        problems.append("no rows")
    columns = columns_of(envelope)
    for i, row in enumerate(envelope["rows"]):
        for c in columns:
            keys = [c.key] + ([f"{c.key}_min", f"{c.key}_max"] if c.spread and _is_number(row.get(c.key)) else [])
            for key in keys:
                value = row.get(key)
                if c.kind == "number" and not (_is_number(value) or is_reason(value)):
                    problems.append(f"row {i} {key!r} = {value!r} is neither a finite number nor a reason")
                elif c.kind == "text" and not isinstance(value, str):
                    problems.append(f"row {i} {key!r} = {value!r} is not text")
    return problems


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def columns_of(envelope: dict) -> list[Column]:
    return [Column(**c) for c in envelope["columns"]]


# ------------------------------------------------------------------------------------------ calibration sets
# The tool each runtime's PTQ file is compared with in bench_deploy*.py (calibrated on the same images as ours)
PEER_IN_RUNTIME = {"openvino f32": "nncf_ptq | openvino f32", "onnxruntime": "ort_quantize_static | onnxruntime"}


def paired_differences(per_set: dict[str, list[float]]) -> list[tuple[str, str, list[float]]]:
    """``(ours, peer, ours − peer for each calibration set)`` for every one of our W8A8 files (the peers quantize
    weights to 8 bits) in a runtime a peer ran in; ``per_set`` is a ``bench_deploy*.py`` result's
    ``map50_95_subsets`` (``"<model> | <runtime>"`` → mAP per set)."""
    pairs = []
    for key, ours in per_set.items():
        model, runtime = key.split(" | ")
        peer = PEER_IN_RUNTIME.get(runtime)
        if model.startswith("w8a8") and peer in per_set:
            pairs.append((key, peer, [a - b for a, b in zip(ours, per_set[peer])]))
    return pairs


# ------------------------------------------------------------------------------------------ renderings
def cell_text(column: Column, row: dict) -> str:
    value = row.get(column.key)
    if column.kind != "number" or not _is_number(value):
        return str(value)
    text = format(value, column.fmt)
    low, high = row.get(f"{column.key}_min"), row.get(f"{column.key}_max")
    if column.spread and _is_number(low) and _is_number(high) and low != high:
        text += f" ({format(low, column.fmt)}–{format(high, column.fmt)})"
    return text


def markdown_table(columns: Sequence[Column], rows: Iterable[dict]) -> str:
    """Header, separator and one line per row (``|`` inside a cell escaped)."""
    lines = ["| " + " | ".join(c.label for c in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(cell_text(c, r).replace("|", "\\|") for c in columns) + " |")
    return "\n".join(lines) + "\n"


def print_rich_table(envelope: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{envelope['question']}: {envelope['title']}", title_justify="left")
    columns = columns_of(envelope)
    for c in columns:
        table.add_column(c.label, justify="right" if c.kind == "number" else "left", overflow="fold")
    for r in envelope["rows"]:
        table.add_row(*(cell_text(c, r) for c in columns))
    console = Console(width=max(200, Console().width))  # a log file is wide; wrapped cells are hard to read
    console.print(table)
    for note in envelope.get("notes", []):
        console.print(f"[dim]{note}[/dim]")


def bar_plot(path: Path, labels: Sequence[str], series: dict[str, Sequence], ylabel: str, title: str,
             reference: float | None = None, errors: dict[str, Sequence] | None = None) -> None:
    """Grouped bars, one group per row and one bar per series; ``errors[series]``: (low, high) per row. A cell
    without a number gets an empty slot marked "n/a" (its reason is in the table)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(labels) * len(series) + 2), 4.5))
    width = 0.8 / len(series)
    for k, (name, values) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(labels))]
        heights = [v if _is_number(v) else 0.0 for v in values]
        spread = None
        if errors and name in errors:  # asymmetric error bars from (low, high); none where not measured
            lows, highs = zip(*[(h - lo, hi - h) if _is_number(lo) and _is_number(hi) else (0.0, 0.0)
                                for h, (lo, hi) in zip(heights, errors[name])])
            spread = [lows, highs]
        ax.bar(xs, heights, width, yerr=spread, capsize=2, label=name)
        for x, v in zip(xs, values):
            if not _is_number(v):
                ax.text(x, 0, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
    if reference is not None:
        ax.axhline(reference, color="black", lw=0.8)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=90, fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    if len(series) > 1:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(out: Path, envelope: dict, plot) -> dict[str, Path]:
    """``<out>/<question>.json``, ``.md`` (the table) and ``.png`` (``plot(envelope, path)``)."""
    out.mkdir(parents=True, exist_ok=True)
    q = envelope["question"]
    paths = {"json": out / f"{q}.json", "md": out / f"{q}.md", "png": out / f"{q}.png"}
    paths["json"].write_text(json.dumps(envelope, indent=2, allow_nan=False) + "\n")
    paths["md"].write_text(markdown_table(columns_of(envelope), envelope["rows"]))
    plot(envelope, paths["png"])
    return paths


# ------------------------------------------------------------------------------------------ running scripts
class ScriptFailed(RuntimeError):
    pass


def run_script(script: str, args: Sequence[str], log: Path, env: dict | None = None) -> float:
    """``python benchmarks/<script> *args`` in its own process, output to ``log``; wall seconds. A failure
    raises with the log's tail, so that a question never reports a run that did not happen."""
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(REPO / "benchmarks" / script), *map(str, args)]
    started = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, **(env or {})})
    if proc.returncode:
        tail = log.read_text()[-3000:]
        raise ScriptFailed(f"{script} failed (exit {proc.returncode}; full log {log}):\n{tail}")
    return time.perf_counter() - started
