"""Per-layer quantization report: bits and signal-to-quantization-noise ratios (SQNR, dB).

Weight SQNR compares each layer's weight with its fake-quantized version. Activation SQNR compares each
layer's input with its quantized input on the batches given (the model's own forward, with forward
pre-hooks). Printed with rich, saved as JSON and as a Markdown table, plotted as PNG.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from .surgery import META_ATTR, quantized_layers


def sqnr_db(reference: torch.Tensor, quantized: torch.Tensor) -> float:
    """10·log10(‖x‖² / ‖x − Q(x)‖²); ``inf`` when the two are identical."""
    ref = reference.detach().float()
    noise = (ref - quantized.detach().float()).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(max(signal, 1e-30) / noise)


@dataclass
class LayerReport:
    name: str
    type: str
    role: str
    weight_bits: int
    activation_bits: Optional[int]
    weight_sqnr_db: float
    activation_sqnr_db: Optional[float] = None
    weight_scale_mean: float = 0.0
    activation_scale: Optional[float] = None


@dataclass
class QuantizationReport:
    recipe: str
    layers: list[LayerReport] = field(default_factory=list)
    kept_float: list[tuple[str, str]] = field(default_factory=list)

    # --------------------------------------------------------------- summaries
    def summary(self) -> dict[str, float]:
        w = [l.weight_sqnr_db for l in self.layers if math.isfinite(l.weight_sqnr_db)]
        a = [l.activation_sqnr_db for l in self.layers if l.activation_sqnr_db is not None and math.isfinite(l.activation_sqnr_db)]
        return {
            "quantized_layers": len(self.layers),
            "float_layers": len(self.kept_float),
            "mean_weight_sqnr_db": sum(w) / len(w) if w else float("nan"),
            "min_weight_sqnr_db": min(w) if w else float("nan"),
            "mean_activation_sqnr_db": sum(a) / len(a) if a else float("nan"),
            "min_activation_sqnr_db": min(a) if a else float("nan"),
        }

    def to_dict(self) -> dict:
        return {
            "recipe": self.recipe,
            "summary": self.summary(),
            "layers": [asdict(l) for l in self.layers],
            "kept_float": [{"name": n, "reason": r} for n, r in self.kept_float],
        }

    def save_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)

        def finite(x):  # JSON has no inf/nan
            return None if isinstance(x, float) and not math.isfinite(x) else x

        data = json.loads(json.dumps(self.to_dict(), default=str), parse_constant=lambda c: None)
        for l in data["layers"]:
            for k, v in l.items():
                l[k] = finite(v)
        data["summary"] = {k: finite(v) for k, v in data["summary"].items()}
        path.write_text(json.dumps(data, indent=2))
        return path

    def save_markdown(self, path: str | Path) -> Path:
        """The table of :meth:`print` as a Markdown file (one row per quantized layer, then the summary)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [f"# detq-hooks quantization report ({self.recipe})", "",
                 "| " + " | ".join(TABLE_COLUMNS) + " |",
                 "|" + "|".join("---:" if _right_aligned(c) else "---" for c in TABLE_COLUMNS) + "|"]
        lines += ["| " + " | ".join(cells) + " |" for cells in self._table_rows()]
        lines += ["", self._summary_line()]
        lines += [f"- kept float: {name} — {why}" for name, why in self.kept_float]
        path.write_text("\n".join(lines) + "\n")
        return path

    def save_plot(self, path: str | Path) -> Path:
        """Per-layer SQNR in dB, layers in model order: weight SQNR as bars coloured by weight bits, activation
        SQNR as markers. Non-finite values (a quantizer that changes nothing) are left out."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)

        def finite_or_nan(x):
            return x if x is not None and math.isfinite(x) else float("nan")

        n = len(self.layers)
        weights = [finite_or_nan(l.weight_sqnr_db) for l in self.layers]
        acts = [finite_or_nan(l.activation_sqnr_db) for l in self.layers]
        fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * n + 2), 4.0))
        bits = sorted({l.weight_bits for l in self.layers})
        colours = dict(zip(bits, plt.get_cmap("tab10").colors))
        for b in bits:  # one bar series per bit width, so the legend names each colour
            idx = [i for i, l in enumerate(self.layers) if l.weight_bits == b]
            ax.bar(idx, [weights[i] for i in idx], width=0.8, color=colours[b], label=f"weight SQNR, W{b}")
        if any(math.isfinite(a) for a in acts):
            ax.plot(range(n), acts, "k_", ms=8, mew=2, ls="none", label="activation SQNR")
        ax.set_xlim(-0.6, n - 0.4)
        # a little below 0 dB, so that a ~0 dB marker (a quantizer that zeroes its input) is not hidden by the axis
        ax.set_ylim(bottom=min([0.0, *(v for v in weights + acts if math.isfinite(v))]) - 2.0)
        ax.set_xlabel("layer (model order)")
        ax.set_ylabel("SQNR [dB]")
        ax.set_title(f"detq-hooks per-layer SQNR — recipe {self.recipe}")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never hides a bar
        fig.tight_layout()
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        return path

    def print(self, console=None, max_rows: Optional[int] = None) -> None:
        from rich.console import Console
        from rich.table import Table

        console = console or Console()
        table = Table(title=f"detq-hooks quantization report ({self.recipe})", show_lines=False)
        for col in TABLE_COLUMNS:
            table.add_column(col, justify="right" if _right_aligned(col) else "left")
        rows = self._table_rows()
        for cells in rows if max_rows is None else rows[:max_rows]:
            table.add_row(*cells)
        if max_rows is not None and len(rows) > max_rows:
            table.add_row(f"... {len(rows) - max_rows} more", *[""] * (len(TABLE_COLUMNS) - 1))
        console.print(table)
        console.print(self._summary_line())
        for name, why in self.kept_float:
            console.print(f"  kept float: {name} — {why}")

    # ------------------------------------------------- shared by print and save_markdown
    def _table_rows(self) -> list[tuple[str, ...]]:
        return [
            (
                l.name,
                l.type,
                l.role,
                str(l.weight_bits),
                "float" if l.activation_bits is None else str(l.activation_bits),
                f"{l.weight_sqnr_db:.1f}",
                "-" if l.activation_sqnr_db is None else f"{l.activation_sqnr_db:.1f}",
            )
            for l in self.layers
        ]

    def _summary_line(self) -> str:
        s = self.summary()
        return (
            f"{s['quantized_layers']} quantized layers, {s['float_layers']} kept float; "
            f"weight SQNR mean {s['mean_weight_sqnr_db']:.1f} dB (min {s['min_weight_sqnr_db']:.1f}), "
            f"activation SQNR mean {s['mean_activation_sqnr_db']:.1f} dB (min {s['min_activation_sqnr_db']:.1f})"
        )


TABLE_COLUMNS = ("layer", "type", "role", "W bits", "A bits", "W SQNR dB", "A SQNR dB")


def _right_aligned(column: str) -> bool:
    return "SQNR" in column or "bits" in column


@torch.no_grad()
def quantization_report(
    model: nn.Module,
    batches: Optional[Iterable[Any]] = None,
    *,
    forward_fn: Optional[Callable[[nn.Module, Any], Any]] = None,
    max_batches: int = 2,
) -> QuantizationReport:
    """Build the per-layer report of a quantized model.

    Args:
        model: a model converted by :func:`detq_hooks.quantize` (calibrated or trained).
        batches: optional batches for activation SQNR (default forward: ``model(batch)``).
        forward_fn: ``forward_fn(model, batch)``, as for :func:`detq_hooks.calibrate`.
        max_batches: how many batches to run.
    """
    from .calibration import default_forward

    meta = getattr(model, META_ATTR, {}) or {}
    report = QuantizationReport(recipe=str(meta.get("recipe", {}).get("name", "?")))
    report.kept_float = [tuple(x) for x in meta.get("plan_skipped", [])]
    layers = quantized_layers(model)
    act_signal: dict[str, list[float]] = {n: [0.0, 0.0] for n, _ in layers}
    handles = []
    if batches is not None:
        for name, m in layers:
            if m.input_quantizer is None or not m.input_quantizer.enabled:
                continue

            def hook(mod, args, _name=name):
                x = args[0].detach().float()
                q = mod.input_quantizer(x)
                act_signal[_name][0] += x.pow(2).sum().item()
                act_signal[_name][1] += (x - q.float()).pow(2).sum().item()

            handles.append(m.register_forward_pre_hook(hook))
        was_training = model.training
        model.eval()
        try:
            forward_fn = forward_fn or default_forward
            for i, batch in enumerate(batches):
                if i >= max_batches:
                    break
                forward_fn(model, batch)
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
    for name, m in layers:
        wq, aq = m.weight_quantizer, m.input_quantizer
        w_sqnr = sqnr_db(m.weight, wq(m.weight)) if wq.enabled else math.inf
        a_sqnr = None
        sig, noise = act_signal[name]
        if batches is not None and aq is not None and aq.enabled and sig > 0:
            a_sqnr = math.inf if noise == 0 else 10 * math.log10(sig / noise)
        report.layers.append(
            LayerReport(
                name=name,
                type=type(m).float_class.__name__,
                role=getattr(m, "detq_layer_role", "body"),
                weight_bits=wq.bits,
                activation_bits=aq.bits if aq is not None and aq.enabled else None,
                weight_sqnr_db=w_sqnr,
                activation_sqnr_db=a_sqnr,
                weight_scale_mean=float(wq.scale.detach().float().mean()),
                activation_scale=float(aq.scale.detach().float().mean()) if aq is not None else None,
            )
        )
    return report


__all__ = ["quantization_report", "QuantizationReport", "LayerReport", "sqnr_db"]
