"""The runnable examples stay runnable: each runs end to end at tiny sizes and prints its result."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ENV = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "false"}


def run(args, cwd):
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_lightning_fcos_example(tmp_path):
    pytest.importorskip("lightning")
    out = run([str(EXAMPLES / "lightning_fcos.py"), "--root", str(tmp_path / "data"), "--num-train", "16", "--num-val", "4", "--imgsz", "64",
               "--float-epochs", "1", "--qat-epochs", "1"], tmp_path)
    rows = [line.split()[0] for line in out.splitlines() if line.split() and line.split()[0] in ("float", "w8a8", "w4a8")]
    assert rows == ["float", "w8a8", "w4a8"], out[-2000:]


def test_lightning_fcos_recipe_names_reach_the_recipe(monkeypatch):
    """The example's recipe names (the accuracy suite's Lightning rows): a -ptq preset with +<method> runs that
    calibration or reconstruction method, +crqat turns on curriculum and distillation, and a wrong '+' is refused."""
    pytest.importorskip("lightning")
    from detq_hooks.recipe import load_recipe

    monkeypatch.syspath_prepend(str(EXAMPLES))
    from lightning_fcos import calibration_batches, recipe_spec

    # --ptq-calibration-batches calibrates the post-training recipes only; QAT keeps --calibration-batches
    args = type("Args", (), {"calibration_batches": 4, "ptq_calibration_batches": 16})()
    assert [calibration_batches(recipe_spec(name), args) for name in
            ("w4a4-ptq+qdrop", "w8a8-taskq", "w4a8-ptq", "w4a8", "w4a4+crqat", "w4a4-fisher")] == [16, 16, 16, 4, 4, 4]
    args.ptq_calibration_batches = None  # not given: the recipe's own calibration.num_batches
    assert calibration_batches(recipe_spec("w4a4-ptq+qdrop"), args) is None

    minmax = load_recipe(recipe_spec("w4a4-ptq+minmax"))
    assert (minmax.mode, minmax.calibration.method, minmax.ptq.method) == ("ptq", "minmax", "calibration")
    assert minmax.quantization.activation.bits == 4 and minmax.calibration.num_batches == 16
    preset = load_recipe(recipe_spec("w4a4-ptq"))
    assert (preset.calibration.method, preset.ptq.method) == ("mse", "calibration")
    for method in ("adaround", "qdrop", "taskq"):
        recipe = load_recipe(recipe_spec(f"w8a8-ptq+{method}"))
        assert (recipe.mode, recipe.ptq.method, recipe.quantization.weight.bits) == ("ptq", method, 8)
    crqat = load_recipe(recipe_spec("w4a8+crqat"))
    assert crqat.curriculum.enabled and crqat.distillation.enabled and crqat.mode == "qat"
    entropy = load_recipe(recipe_spec("w4a8-ptq+entropy"))  # every calibration method the recipe knows
    assert (entropy.calibration.method, entropy.ptq.method) == ("entropy", "calibration")
    with pytest.raises(SystemExit, match=r"'w4a4-ptq\+awq'.*minmax, percentile, mse, entropy, adaround, qdrop, taskq"):
        recipe_spec("w4a4-ptq+awq")
    with pytest.raises(SystemExit, match=r"'w4a4\+adaround'.*crqat, cur, kd"):
        recipe_spec("w4a4+adaround")


def test_ultralytics_example(tmp_path):
    pytest.importorskip("ultralytics")
    out = run([str(EXAMPLES / "ultralytics_qat.py"), "--epochs", "1", "--imgsz", "64", "--out", str(tmp_path / "run")], tmp_path)
    assert "ONNX QDQ:" in out and "QuantizeLinear" in out, out[-2000:]
