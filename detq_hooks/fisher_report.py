"""Reports of the Fisher-aware methods: bits per layer beside each layer's sensitivity, and the per-class AP
drop of the quantized model versus the float model (critical classes marked). Tables (rich), JSON rows and
PNG plots (matplotlib, Agg)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Optional

from .fisher import MixedPrecisionPlan


@dataclass
class BitsRow:
    layer: str
    bits: int
    pinned: bool
    fisher_trace: float
    elements: int
    error_at_bits: Optional[float]  # ‖Q_b(W) − W‖² at the chosen width (None for pinned layers)
    omega: Optional[float]  # tr F · error


def bits_table(plan: MixedPrecisionPlan) -> list[BitsRow]:
    """One row per quantized layer, in the model's module order."""
    rows = []
    for name, bits in plan.allocation.items():
        err = plan.errors.get(name, {}).get(bits)
        rows.append(BitsRow(name, int(bits), name in plan.pinned, plan.traces[name], plan.sizes[name], err,
                            None if err is None else plan.traces[name] * err))
    return rows


def print_bits_table(plan: MixedPrecisionPlan, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"Fisher-aware mixed precision (budget {plan.budget}, used {plan.used:.4g})")
    for col in ("layer", "bits", "pinned", "tr F", "elements", "Ω = tr F·‖Q(W)−W‖²"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for r in bits_table(plan):
        table.add_row(r.layer, str(r.bits), "yes" if r.pinned else "", f"{r.fisher_trace:.3e}", str(r.elements),
                      "" if r.omega is None else f"{r.omega:.3e}")
    console.print(table)


def save_bits_plot(plan: MixedPrecisionPlan, path: str | Path) -> Path:
    """Bars: weight bits per layer (pinned layers hatched); line on a log axis: the Fisher trace."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = bits_table(plan)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(rows)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * n + 2), 4.2))
    xs = list(range(n))
    bars = ax.bar(xs, [r.bits for r in rows], color=["#bbbbbb" if r.pinned else "#4c72b0" for r in rows])
    for bar, r in zip(bars, rows):
        if r.pinned:
            bar.set_hatch("//")
    ax.set_ylabel("weight bits")
    ax.set_ylim(0, 9)
    ax.set_xticks(xs)
    ax.set_xticklabels([r.layer for r in rows], rotation=90, fontsize=6)
    ax2 = ax.twinx()
    traces = [r.fisher_trace if r.fisher_trace > 0 else float("nan") for r in rows]
    ax2.plot(xs, traces, "o-", color="#c44e52", ms=3, label="Fisher trace")
    if any(math.isfinite(t) for t in traces):
        ax2.set_yscale("log")
    ax2.set_ylabel("tr F (log)")
    ax.set_title(f"bits per layer beside sensitivity — budget {plan.budget}, used {plan.used:.4g}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@dataclass
class APDropRow:
    category: str
    critical: bool
    float_ap: float
    quant_ap: float
    drop: float  # float − quantized (AP50-95)


def ap_drop_table(float_result, quant_result, critical: Iterable[str] = ()) -> list[APDropRow]:
    """Per-class AP50-95 drop of the quantized model versus the float model (two :class:`EvalResult`),
    largest drop first; categories missing from either result are left out."""
    crit = set(critical)
    rows = [APDropRow(c, c in crit, float_result.per_category[c], quant_result.per_category[c],
                      float_result.per_category[c] - quant_result.per_category[c])
            for c in float_result.per_category if c in quant_result.per_category]
    return sorted(rows, key=lambda r: (-r.drop, r.category))


def print_ap_drop(rows: list[APDropRow], console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title="per-class AP drop (float − quantized)")
    for col in ("category", "critical", "float AP", "quant AP", "drop"):
        table.add_column(col, justify="left" if col == "category" else "right")
    for r in rows:
        table.add_row(r.category, "yes" if r.critical else "", f"{r.float_ap:.4f}", f"{r.quant_ap:.4f}", f"{r.drop:+.4f}")
    console.print(table)


def save_ap_drop_plot(rows: list[APDropRow], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(rows) + 2), 4.0))
    xs = list(range(len(rows)))
    ax.bar(xs, [r.drop for r in rows], color=["#c44e52" if r.critical else "#8c8c8c" for r in rows])
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xticks(xs)
    ax.set_xticklabels([r.category + (" *" if r.critical else "") for r in rows], rotation=90, fontsize=7)
    ax.set_ylabel("AP50-95 drop (float − quantized)")
    ax.set_title("per-class AP drop; * critical")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def rows_as_dicts(rows) -> list[dict]:
    return [asdict(r) for r in rows]


__all__ = ["BitsRow", "bits_table", "print_bits_table", "save_bits_plot", "APDropRow", "ap_drop_table",
           "print_ap_drop", "save_ap_drop_plot", "rows_as_dicts"]
