"""The layering the README's Architecture section promises: the core imports no trainer and no detector
library, the core's modules import each other without cycles, and the trainer adapters hold no head decoding
or checkpoint format of their own."""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "detq_hooks"
CORE = sorted(p.stem for p in PKG.glob("*.py") if p.stem not in ("__init__", "cli", "data", "zoo"))
BLOCKED = ("ultralytics", "lightning", "pytorch_lightning", "mmengine", "mmdet", "mmcv", "torchvision")


def test_core_imports_and_runs_with_trainers_and_detector_libraries_blocked():
    script = textwrap.dedent(f"""
        import importlib, sys
        BLOCKED = {BLOCKED!r}

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"blocked: {{name}}")
                return None

        sys.meta_path.insert(0, Block())
        import torch
        from torch import nn
        for name in {CORE!r} + ["detectors", "detectors.base"]:
            importlib.import_module("detq_hooks." + name)
        from detq_hooks.session import QuantSession
        net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
        s = QuantSession("w4a8")
        s.convert(net)
        s.calibrate(net, [torch.randn(2, 3, 16, 16) for _ in range(2)])
        state = s.state(net)
        print("family", s.family.name, "layers", len(state["layers"]))
        print("loaded", sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "family generic layers 2" in out.stdout and "loaded []" in out.stdout, out.stdout


def _imports(path: Path) -> set[str]:
    """detq_hooks modules imported by a file, at module level or inside functions (relative or absolute)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and path.parent == PKG:
                base = node.module or ""
                found |= {base.split(".")[0]} if base else {a.name for a in node.names}
            elif node.module and node.module.startswith("detq_hooks."):
                found.add(node.module.split(".")[1])
    return found


def test_core_modules_import_each_other_without_cycles():
    graph = {m: {d for d in _imports(PKG / f"{m}.py") if d in CORE} for m in CORE}

    def visit(node, stack):
        if node in stack:
            pytest.fail(f"import cycle among core modules: {' -> '.join(stack[stack.index(node):] + [node])}")
        for dep in graph[node]:
            visit(dep, stack + [node])

    for m in CORE:
        visit(m, [])
    assert "calibration" not in graph["surgery"] and "surgery" in graph["calibration"]


@pytest.mark.parametrize("adapter", ["ultralytics", "lightning", "mmengine"])
def test_trainer_adapters_hold_no_head_decoding_matching_or_checkpoint_format(adapter):
    pkg = PKG / adapter
    assert pkg.is_dir(), f"detq_hooks/{adapter} should be a package"
    text = "\n".join(p.read_text() for p in pkg.glob("*.py"))
    for needle in ("hungarian_match", "task_aligned_positives", "bbox_decode", "dist2bbox", "box_coder",
                   "grid_priors", "pkd_loss", "relational_loss", '"layers":', "quantization_state(",
                   "register_forward_hook"):
        assert needle not in text, f"{adapter} adapter contains {needle!r}: it belongs in the core or a detector family"
