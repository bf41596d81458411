"""The benchmark suite (``benchmarks/run.py``, issue 14): every question's ``--quick`` run writes a well-formed
results envelope, a markdown table with one line per row and a valid PNG; ``report`` regenerates a README copy
idempotently from those files; ``detq bench`` runs the script of the checkout or names the missing path.

The quick runs start from an empty float-model cache (``DETQ_CACHE_DIR`` in a temporary folder), as CI's fresh
clone does; the first of them trains the tiny float YOLO11n, the others reuse it. About 4–5 minutes on 2 cores.
A question whose quick run fails (a library it needs is missing, say) fails its test with the run's output.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "benchmarks" / "run.py"
sys.path.insert(0, str(REPO / "benchmarks"))
import run as bench_run  # noqa: E402
import suite  # noqa: E402

REASONS = (suite.NOT_AVAILABLE, suite.NOT_MEASURED)
_runs: dict[str, tuple[Path, subprocess.CompletedProcess, float]] = {}


@pytest.fixture(scope="module")
def quick_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench_suite")


@pytest.fixture(scope="module")
def quick(quick_root):
    """``quick(question)``: the question's ``--quick`` run into ``quick_root/<question>`` (once per module)."""
    env = {**os.environ, "DETQ_CACHE_DIR": str(quick_root / "cache"), "YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}

    def run(question: str):
        if question not in _runs:
            started = time.perf_counter()
            proc = subprocess.run([sys.executable, str(RUN), question, "--quick", "--out", str(quick_root / question)],
                                  capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
            _runs[question] = (quick_root / question, proc, time.perf_counter() - started)
        out, proc, seconds = _runs[question]
        assert proc.returncode == 0, (f"`run.py {question} --quick` failed (exit {proc.returncode}) after {seconds:.0f} s:\n"
                                      f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        return out, proc

    return run


def _is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_envelope(envelope: dict, question: str) -> None:
    assert set(suite.ENVELOPE_KEYS) <= set(envelope), set(suite.ENVELOPE_KEYS) - set(envelope)
    assert envelope["question"] == question
    assert re.search(rf"benchmarks/run\.py {question} --quick --out \S+$", envelope["command"]), envelope["command"]
    assert envelope["settings"]["quick"] is True and envelope["settings"]["threads"] == 1
    machine = envelope["machine"]
    assert machine["logical_cores"] == os.cpu_count() and machine["cpu"] and machine["python"] == sys.version.split()[0]
    assert machine["ram_gib"] > 0 and machine["os"]
    import torch

    assert envelope["versions"]["torch"] == torch.__version__.split("+")[0]  # the distribution's version
    assert set(envelope["versions"]) == set(suite.LIBRARIES.values())
    from datetime import datetime

    assert datetime.fromisoformat(envelope["date"]).utcoffset() == timedelta(0)
    if (REPO / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{40}", envelope["git"]["commit"]) and isinstance(envelope["git"]["dirty"], bool)
    assert 0 < envelope["wall_s"] < 600
    assert envelope["rows"], "no rows"
    for row in envelope["rows"]:
        for column in envelope["columns"]:
            value = row[column["key"]]
            if column["kind"] == "number":
                assert _is_finite_number(value) or (isinstance(value, str) and value.startswith(REASONS)
                                                    and len(value) > max(map(len, REASONS))), (column["key"], value)
            else:
                assert isinstance(value, str) and value, (column["key"], value)
    assert envelope["commands"] and all(Path(c["log"]).is_file() for c in envelope["commands"])


def _check_markdown(path: Path, envelope: dict) -> None:
    lines = path.read_text().splitlines()
    assert lines[0] == "| " + " | ".join(c["label"] for c in envelope["columns"]) + " |"
    assert lines[1] == "|" + "---|" * len(envelope["columns"])
    assert len(lines) == len(envelope["rows"]) + 2
    assert all(line.startswith("| ") and line.endswith(" |") for line in lines[2:])


def _check_png(path: Path) -> None:
    from PIL import Image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) >= 200


def _outputs(quick, question: str) -> tuple[dict, dict]:
    out, _ = quick(question)
    envelope = json.loads((out / f"{question}.json").read_text())
    return envelope, {"md": out / f"{question}.md", "png": out / f"{question}.png"}


@pytest.mark.parametrize("question", suite.QUESTIONS)
def test_quick_run_writes_a_well_formed_envelope_table_and_plot(quick, question):
    envelope, paths = _outputs(quick, question)
    _check_envelope(envelope, question)
    _check_markdown(paths["md"], envelope)
    _check_png(paths["png"])


def test_quick_accuracy_normalises_ptq_and_qat_rows(quick):
    envelope, _ = _outputs(quick, "accuracy")
    rows = {(r["trainer"], r["model"], r["bits"], r["method"]): r for r in envelope["rows"]}
    assert set(rows) == {("Ultralytics", "YOLO11n", "W4A8", m) for m in ("PTQ minmax", "PTQ adaround", "QAT LSQ")}
    for row in rows.values():
        assert row["seeds"] == "0" and 0 <= row["map50_95"] <= 1
        assert row["critical_map50_95"].startswith(suite.NOT_MEASURED)  # neither script scores critical classes
        # one float reference per script; kept is mAP ÷ it, or says why not
        assert row["kept"] == pytest.approx(row["map50_95"] / row["float_map50_95"]) if row["float_map50_95"] > 0 \
            else row["kept"].startswith(suite.NOT_MEASURED)
    assert [c["script"] for c in envelope["commands"]] == ["bench_ptq.py", "bench_crqat_ultralytics.py"]


def test_quick_accuracy_resume_reuses_every_finished_run(quick, tmp_path):
    out, _ = quick("accuracy")
    first = json.loads((out / "accuracy.json").read_text())
    again = tmp_path / "accuracy"
    shutil.copytree(out, again)
    env = {**os.environ, "YOLO_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(RUN), "accuracy", "--quick", "--resume", "--out", str(again)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.findall(r"^\[(\S+)\] reused", proc.stdout, re.M) == ["ptq_seed0", "qat_seed0"]
    second = json.loads((again / "accuracy.json").read_text())
    assert second["rows"] == first["rows"] and all(c["reused"] for c in second["commands"])
    assert [c["seconds"] for c in second["commands"]] == [c["seconds"] for c in first["commands"]]


def test_resume_runs_again_when_settings_or_output_changed(monkeypatch, tmp_path):
    ran = []
    monkeypatch.setattr(bench_run, "run_script", lambda script, args, log, env=None: ran.append(list(args)) or 1.5)
    args = type("Args", (), {"out": tmp_path, "threads": 1, "resume": True})()
    output = tmp_path / "ptq.json"
    output.write_text("{}")
    first = bench_run.run_logged(args, "ptq_seed0", "bench_ptq.py", ["--seed", 0, "--out", REPO / "x"], output)
    assert len(ran) == 1 and "reused" not in first
    record = json.loads((tmp_path / "raw" / "logs" / "ptq_seed0.run.json").read_text())
    assert record["args"] == ["--seed", "0", "--out", "<repo>/x"] and record["seconds"] == 1.5
    bench_run.run_logged(args, "qat_seed0", "bench_ptq.py", ["--out", tmp_path / "raw" / "qat"], output)
    record = json.loads((tmp_path / "raw" / "logs" / "qat_seed0.run.json").read_text())
    assert record["args"] == ["--out", "<out>/raw/qat"]  # the results folder may be moved or copied
    ran.pop()
    again = bench_run.run_logged(args, "ptq_seed0", "bench_ptq.py", ["--seed", 0, "--out", REPO / "x"], output)
    assert len(ran) == 1 and again["reused"] and again["seconds"] == 1.5
    bench_run.run_logged(args, "ptq_seed0", "bench_ptq.py", ["--seed", 1, "--out", REPO / "x"], output)
    assert len(ran) == 2  # other arguments: run again
    output.unlink()
    bench_run.run_logged(args, "ptq_seed0", "bench_ptq.py", ["--seed", 1, "--out", REPO / "x"], output)
    assert len(ran) == 3  # its output is gone: run again
    record_path = tmp_path / "raw" / "logs" / "ptq_seed0.run.json"
    record = json.loads(record_path.read_text())
    assert len(record["script_sha256"]) == 16
    output.write_text("{}")
    record_path.write_text(json.dumps({**record, "script_sha256": "0" * 16}))
    bench_run.run_logged(args, "ptq_seed0", "bench_ptq.py", ["--seed", 1, "--out", REPO / "x"], output)
    assert len(ran) == 4  # the script changed since (a default, say): run again
    args.resume = False
    bench_run.run_logged(args, "ptq_seed0", "bench_ptq.py", ["--seed", 1, "--out", REPO / "x"], output)
    assert len(ran) == 5  # without --resume every run happens
    # an older version declared to run the same is reused, against exactly the version it names
    args.resume = True
    now = record["script_sha256"]
    record_path.write_text(json.dumps({**record, "script_sha256": "1" * 16}))
    monkeypatch.setitem(bench_run.SAME_RUNS_AS, ("bench_ptq.py", "1" * 16, "2" * 16), "another version")
    bench_run.run_logged(args, "ptq_seed0", "bench_ptq.py", ["--seed", 1, "--out", REPO / "x"], output)
    assert len(ran) == 6
    record_path.write_text(json.dumps({**record, "script_sha256": "1" * 16}))
    monkeypatch.setitem(bench_run.SAME_RUNS_AS, ("bench_ptq.py", "1" * 16, now), "options added")
    reused = bench_run.run_logged(args, "ptq_seed0", "bench_ptq.py", ["--seed", 1, "--out", REPO / "x"], output)
    assert len(ran) == 6 and reused["reused"] and reused["script_sha256"] == "1" * 16  # the record as it ran
    ran[:] = ran[:5]

    # another thread count: run again where threads matter (timings), reused where they do not (accuracy)
    args.resume, args.threads = True, 2
    unit = ["--seed", 1, "--out", REPO / "x", "--threads", 2]
    bench_run.run_logged(args, "ptq_seed0", "bench_ptq.py", ["--seed", 1, "--out", REPO / "x", "--threads", 1], output)
    assert len(ran) == 6
    bench_run.run_logged(args, "ptq_seed0", "bench_ptq.py", unit, output)
    assert len(ran) == 7
    args.threads = 1
    reused = bench_run.run_logged(args, "ptq_seed0", "bench_ptq.py", [*unit[:-1], 1], output, threads_matter=False)
    assert len(ran) == 7 and reused["reused"] and reused["env"]["OMP_NUM_THREADS"] == "2"  # as it ran
    bench_run.run_logged(args, "ptq_seed0", "bench_ptq.py", ["--seed", 0, "--out", REPO / "x", "--threads", 1],
                         output, threads_matter=False)
    assert len(ran) == 8  # other arguments still run again


def test_quick_cost_has_float_at_one_and_every_configuration(quick):
    envelope, _ = _outputs(quick, "cost")
    yolo = {r["config"]: r for r in envelope["rows"] if r["model"] == "YOLO11n"}
    assert {"float", "w8a8", "w4a8", "w4a4", "w4a4-crqat"} <= set(yolo)
    assert yolo["float"]["step_ratio"] == 1.0 and yolo["float"]["memory_ratio"] == 1.0
    assert all(r["step_ratio_min"] <= r["step_ratio"] <= r["step_ratio_max"] for r in yolo.values())
    assert yolo["w8a8"]["memory_mb"] > yolo["float"]["memory_mb"]  # quantizer state is held for backward
    assert {r["config"] for r in envelope["rows"] if r["model"] == "YOLO-sized conv net"} >= {"float", "w8a8"}
    # each configuration alone in its process (bench_step_alone.py): float first and at 1, each ratio a real one
    alone = [r for r in envelope["rows"] if r["model"].startswith("YOLO11n, each configuration alone")]
    assert [r["config"] for r in alone] == ["float", "w8a8", "w4a4"]
    assert alone[0]["step_ratio"] == 1.0 and all(0.3 < r["step_ratio"] < 5 and r["step_ms"] > 0 for r in alone)


def test_quick_deploy_compares_exported_files_with_float(quick):
    envelope, _ = _outputs(quick, "deploy")
    rows = {(r["model"], r["runtime"]): r for r in envelope["rows"]}
    assert {("float", "onnxruntime"), ("w8a8", "onnxruntime"), ("w8a8", "openvino f32"), ("nncf_ptq", "openvino f32"),
            ("ort_quantize_static", "onnxruntime"), ("w8a8", "PyTorch (fake-quant)")} <= set(rows)
    assert rows[("w8a8", "onnxruntime")]["file_mb"] < rows[("float", "onnxruntime")]["file_mb"] / 2
    assert rows[("float", "onnxruntime")]["speedup_64"] == 1.0
    # PTQ mAP over three disjoint calibration sets (64 quick training images, 8 per set), compared with each peer
    # set by set: the mean lies within its spread, and each of our files has its paired differences
    ours = rows[("w8a8", "openvino f32")]
    assert ours["map50_95_min"] <= ours["map50_95"] <= ours["map50_95_max"]
    paired = [n for n in envelope["notes"] if "minus" in n]
    assert any(n.startswith("YOLO11n (Ultralytics): w8a8 | openvino f32 minus nncf_ptq | openvino f32") for n in paired)
    assert any("w8a8 | onnxruntime minus ort_quantize_static | onnxruntime" in n for n in paired)
    assert all(len(n.split(": ")[-1].split(", ")) == 3 for n in paired)
    # OpenVINO files also get the plugin's own node time (PERF_COUNT), onnxruntime files the reason they have none
    for (model, runtime), row in rows.items():
        if runtime.startswith("openvino"):
            assert row["node_ms_64_min"] <= row["node_ms_64"] <= row["node_ms_64_max"], (model, runtime)
        elif runtime == "onnxruntime":
            assert row["node_ms_64"].startswith(suite.NOT_MEASURED) and "OpenVINO" in row["node_ms_64"]
    assert any("OpenVINO node ms" in n for n in envelope["notes"])


def test_paired_differences_pair_each_w8a8_file_with_the_peer_of_its_runtime():
    """Ours minus the peer calibrated on the same images, set by set: only W8A8 files (the peers' width), only in a
    runtime a peer ran in (OpenVINO f32: NNCF; onnxruntime: quantize_static), never a peer with itself."""
    per_set = {"w8a8 | openvino f32": [0.1650, 0.1663], "w8a8 | openvino default": [0.1655, 0.1679],
               "w8a8 | onnxruntime": [0.1619, 0.1668], "w8a8+shared | onnxruntime": [0.1629, 0.1681],
               "w4a8 | onnxruntime": [0.1554, 0.1592], "w8a8 | pytorch": [0.1647, 0.1677],
               "nncf_ptq | openvino f32": [0.1668, 0.1664], "ort_quantize_static | onnxruntime": [0.1630, 0.1639]}
    pairs = {(ours, peer): diffs for ours, peer, diffs in suite.paired_differences(per_set)}
    assert set(pairs) == {("w8a8 | openvino f32", "nncf_ptq | openvino f32"),
                          ("w8a8 | onnxruntime", "ort_quantize_static | onnxruntime"),
                          ("w8a8+shared | onnxruntime", "ort_quantize_static | onnxruntime")}
    assert pairs[("w8a8 | openvino f32", "nncf_ptq | openvino f32")] == pytest.approx([-0.0018, -0.0001], abs=1e-12)
    assert pairs[("w8a8+shared | onnxruntime", "ort_quantize_static | onnxruntime")] == pytest.approx([-0.0001, 0.0042],
                                                                                                    abs=1e-12)
    # without the peer's run (e.g. NNCF missing) there is nothing to pair
    assert suite.paired_differences({k: v for k, v in per_set.items() if not k.startswith("nncf")}) == [
        (ours, peer, d) for ours, peer, d in suite.paired_differences(per_set) if not peer.startswith("nncf")]


def test_quick_peers_has_a_number_or_a_reason_for_every_tool(quick):
    envelope, _ = _outputs(quick, "peers")
    tools = {(r["tool"], r["method"].split(",")[0]): r for r in envelope["rows"]}
    assert {t for t, _ in tools} == {"float", "detq-hooks", "onnxruntime", "NNCF", "Ultralytics"}
    for (tool, _), row in tools.items():
        if tool in ("float", "detq-hooks", "onnxruntime"):  # these always run here
            assert _is_finite_number(row["map50_95"]), row
        else:  # NNCF / ModelOpt may not run on this machine: then the row says why
            assert _is_finite_number(row["map50_95"]) or row["map50_95"].startswith(suite.NOT_AVAILABLE), row


def test_peers_rows_are_kept_per_seed_and_qat_tools_paired_seed_by_seed():
    """Each seed's QAT rows are divided by that seed's better float reference; our QAT minus each other QAT tool is
    given seed by seed; a tool that did not run is in no pair."""
    def seed_rows(finetune, ours, modelopt):
        rows = [{"tool": "float", "method": "float (no quantization)", "bits": "FP32", "runtime": "PyTorch",
                 "kind": "float", "map50_95": 0.170, "seconds": 3},
                {"tool": "float", "method": "float fine-tune", "bits": "FP32", "runtime": "PyTorch",
                 "kind": "float-finetune", "map50_95": finetune, "seconds": 45},
                {"tool": "detq-hooks", "method": "QAT LSQ, 6 epochs", "bits": "W8A8", "runtime": "PyTorch fake-quant",
                 "kind": "qat", "map50_95": ours, "seconds": 64},
                {"tool": "Ultralytics", "method": "quantize=8 QAT (NVIDIA ModelOpt), 6 epochs", "bits": "W8A8",
                 "runtime": "PyTorch fake-quant", "kind": "qat", "map50_95": modelopt, "seconds": 61},
                {"tool": "NNCF", "method": "PyTorch QAT", "bits": "W8A8", "runtime": "PyTorch fake-quant",
                 "kind": "qat", "error": "ModuleNotFoundError: nncf", "seconds": 0}]
        return {"rows": rows}
    runs = bench_run.peers_of_seed(seed_rows(0.180, 0.1802, 0.1844), "0") + \
        bench_run.peers_of_seed(seed_rows(0.160, 0.1750, 0.1700), "1")
    kept = {(r["tool"], r["seed"]): r["kept"] for r in runs}
    assert kept[("detq-hooks", "0")] == pytest.approx(0.1802 / 0.180)
    assert kept[("detq-hooks", "1")] == pytest.approx(0.1750 / 0.170)  # float beats that seed's fine-tune
    assert kept[("NNCF", "1")].startswith(suite.NOT_AVAILABLE)
    notes = bench_run.paired_qat_notes(runs)
    assert notes == ["our QAT minus Ultralytics quantize=8 QAT, mAP50-95 per seed: seed 0 -0.0042, seed 1 +0.0050"]


def test_report_says_when_and_where_reused_script_runs_ran():
    """A ``--resume`` rendering names each reused run's time, date and commit, since the question's own are the
    rendering's; a question that ran everything itself says nothing extra."""
    commands = [{"name": "deploy", "seconds": 614.2, "finished": "2026-12-06 06:15:33 UTC", "commit": "813808f11f00",
                 "dirty_at_start": False, "reused": True},
                {"name": "deploy-mmdet", "seconds": 483.0, "finished": "2026-12-06 06:23:36 UTC", "commit": "a64b1e7339aa",
                 "dirty_at_start": True}]
    text = bench_run.reused_runs({"commands": commands})
    assert text.startswith(" 1 of its 2 script runs were reused")
    assert "deploy 614 s, finished 2026-12-06 06:15:33 UTC at commit 813808f11f" in text
    assert "deploy-mmdet" not in text
    assert bench_run.reused_runs({"commands": [dict(commands[1])]}) == ""


def test_report_regenerates_a_readme_copy_idempotently(quick, quick_root, tmp_path):
    for question in suite.QUESTIONS:
        quick(question)
    readme = tmp_path / "README.md"
    shutil.copy(REPO / "README.md", readme)
    original = readme.read_text()
    command = [sys.executable, str(RUN), "report", "--results", str(quick_root), "--readme", str(readme)]
    first = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert first.returncode == 0, first.stderr
    once = readme.read_text()
    assert subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120).returncode == 0
    assert readme.read_text() == once  # idempotent
    head, rest = once.split(bench_run.BEGIN)
    section, tail = rest.split(bench_run.END)
    assert original.startswith(head) and original.endswith(tail)  # nothing outside the markers changed
    for question in suite.QUESTIONS:
        envelope = json.loads((quick_root / question / f"{question}.json").read_text())
        assert f"#### `{question}`: {envelope['title']}" in section
        assert f"`{envelope['command']}`" in section and envelope["date"] in section
        assert envelope["git"]["commit"] is None or envelope["git"]["commit"][:10] in section
        assert suite.markdown_table(suite.columns_of(envelope), envelope["rows"]) in section
        link = re.search(rf"\[plot\]\(([^)]*{question}\.png)\)", section).group(1)
        assert (readme.parent / link).resolve() == (quick_root / question / f"{question}.png").resolve()
    assert "Not run yet" not in section


def test_report_lists_questions_without_results_as_not_run_yet(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{bench_run.BEGIN}\nold text\n{bench_run.END}\nafter\n")
    assert bench_run.main(["report", "--results", str(tmp_path / "none"), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old text" not in text and text.startswith("# x\n\nbefore\n") and text.endswith(f"{bench_run.END}\nafter\n")
    for question in suite.QUESTIONS:
        assert f"#### `{question}`\n\nNot run yet: `python benchmarks/run.py {question}`." in text


def test_report_refuses_a_readme_without_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    with pytest.raises(SystemExit, match="needs one `<!-- detq-bench:begin -->` line"):
        bench_run.main(["report", "--results", str(tmp_path), "--readme", str(readme)])
    assert readme.read_text() == "# no markers\n"


def test_envelope_rejects_nan_and_missing_keys_and_renders_spread():
    columns = [suite.Column("name", "name"), suite.Column("map", "mAP", "number", ".3f", spread=True)]
    envelope = suite.build_envelope("accuracy", "t", ["accuracy"], {"quick": False}, columns,
                                    [{"name": "a", "map": float("nan")}, {"name": "b", "map": 0.5, "map_min": 0.4,
                                                                         "map_max": 0.6}], 1.0)
    assert envelope["rows"][0]["map"] == suite.not_measured("the measurement gave nan")
    assert suite.markdown_table(columns, envelope["rows"]).splitlines()[3] == "| b | 0.500 (0.400–0.600) |"
    assert suite.envelope_problems({k: v for k, v in envelope.items() if k != "git"}) == ["missing key 'git'"]
    bad = dict(envelope, rows=[{"name": "c", "map": "n/a"}])
    assert suite.envelope_problems(bad) == ["row 0 'map' = 'n/a' is neither a finite number nor a reason"]
    with pytest.raises(ValueError, match="malformed results: no rows"):
        suite.build_envelope("cost", "t", [], {}, columns, [], 1.0)


def test_seed_aggregation_gives_mean_and_range_or_the_reason():
    assert bench_run.mean_spread([0.2, 0.4], "kept") == {"kept": pytest.approx(0.3), "kept_min": 0.2, "kept_max": 0.4}
    reason = suite.not_measured("float mAP50-95 is 0")
    assert bench_run.mean_spread([0.2, reason], "kept") == {"kept": reason}
    assert bench_run.ratio(0.15, 0.2, "float mAP50-95") == pytest.approx(0.75)
    assert bench_run.ratio(0.1, 0.0, "float mAP50-95") == reason


def test_detq_bench_runs_the_checkout_script(capfd):
    from detq_hooks import cli

    assert cli.main(["bench", "--help"]) == 0
    assert "{accuracy,cost,deploy,peers,report}" in capfd.readouterr().out


def test_detq_bench_names_the_missing_script(monkeypatch, tmp_path):
    from detq_hooks import cli

    monkeypatch.setattr(cli, "__file__", str(tmp_path / "site-packages" / "detq_hooks" / "cli.py"))
    missing = tmp_path / "site-packages" / "benchmarks" / "run.py"
    with pytest.raises(SystemExit, match=re.escape(f"detq bench: {missing} does not exist")):
        cli.main(["bench", "accuracy", "--quick"])


def test_fisher_mmdet_source_normalises_the_committed_study_and_refuses_a_partial_one(monkeypatch, tmp_path):
    # the committed full-size output of bench_fisher_mmdet.py stands in for a run of it
    study = json.loads((REPO / "benchmarks" / "results" / "fisher_mmdet" / "results.json").read_text())

    def fake_run(script, args, log, env=None, rows=study["rows"]):
        out = Path(args[args.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({**study, "rows": rows}))
        return 1.0

    monkeypatch.setattr(bench_run, "run_script", fake_run)
    args = type("Args", (), {"out": tmp_path, "threads": 2, "resume": False, "fisher_bits": "w4a8,w4a4",
                             "fisher_mmdet_variants": "plain,mp,reg,both"})()
    ran, rows = bench_run.fisher_mmdet_runs(args, "0")
    assert ran["args"][ran["args"].index("--reg-every") + 1] == "12"
    assert len(rows) == 8 and {r["model"] for r in rows} == {"DINO (CSPNeXt-tiny)"}
    for row, raw in zip(rows, study["rows"]):
        assert row["method"] == bench_run.FISHER_METHODS[raw["variant"]]
        assert row["kept"] == pytest.approx(raw["map50_95"] / study["float"]["map50_95"])
        assert row["critical_map50_95"] == raw["critical_map50_95"]
    monkeypatch.setattr(bench_run, "run_script", lambda *a, **k: fake_run(*a, rows=study["rows"][:-1]))
    missing = study["rows"][-1]
    with pytest.raises(suite.ScriptFailed, match=f"no result for {missing['bits']} {missing['variant']}"):
        bench_run.fisher_mmdet_runs(args, "0")


def test_fisher_mmdet_reg_unit_and_a_study_that_ran_more_variants_is_reused_for_fewer(monkeypatch, tmp_path):
    """The regulariser's variants are a unit of their own (fisher-mmdet-reg); fisher-mmdet reuses a study that
    ran every variant (its first runs) for the variants it asks now, keeping only their rows."""
    study = json.loads((REPO / "benchmarks" / "results" / "fisher_mmdet" / "results.json").read_text())
    calls = []

    def fake_run(script, args, log, env=None):
        calls.append([str(a) for a in args])
        out = Path(args[args.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        rows = [{**study["rows"][0], "bits": b, "variant": v} for b in args[args.index("--bits") + 1].split(",")
                for v in args[args.index("--variants") + 1].split(",")]
        (out / "results.json").write_text(json.dumps({**study, "rows": rows}))
        return 1.0

    monkeypatch.setattr(bench_run, "run_script", fake_run)
    args = type("Args", (), {"out": tmp_path, "threads": 1, "resume": False, "fisher_bits": "w4a8,w4a4",
                             "fisher_mmdet_variants": "plain,mp,reg,both", "fisher_mmdet_reg_variants": "reg,both"})()
    bench_run.fisher_mmdet_runs(args, "0")  # the first runs: every variant
    args.resume, args.fisher_mmdet_variants = True, "plain,mp"
    ran, rows = bench_run.fisher_mmdet_runs(args, "0")
    assert len(calls) == 1 and ran["reused"]
    assert [r["method"] for r in rows] == [bench_run.FISHER_METHODS[v] for v in ("plain", "mp")] * 2
    ran, rows = bench_run.SOURCES["fisher-mmdet-reg"](args, "0")
    assert len(calls) == 2 and calls[-1][calls[-1].index("--variants") + 1] == "reg,both"
    assert ran["name"] == "fisher-mmdet-reg_seed0" and "reused" not in ran
    assert [r["method"] for r in rows] == [bench_run.FISHER_METHODS[v] for v in ("reg", "both")] * 2
    args.fisher_mmdet_variants = "plain,crqat"  # an item the record did not run: run again
    bench_run.fisher_mmdet_runs(args, "0")
    assert len(calls) == 3


def test_dino_sources_run_their_own_units_of_the_mmdetection_scripts(monkeypatch, tmp_path):
    """crqat-dino: bench_fisher_mmdet.py with the CR-QAT variants, in a unit of its own (the Fisher study's runs
    stay reusable); qat-dino: the same script at W8A8; ptq-dino: bench_ptq_mmdet.py on the slim DINO config."""
    study = json.loads((REPO / "benchmarks" / "results" / "fisher_mmdet" / "results.json").read_text())
    calls = []

    def fake_run(script, args, log, env=None):
        calls.append((script, [str(a) for a in args]))
        out = Path(args[args.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        if script == "bench_fisher_mmdet.py":
            rows = [{**study["rows"][0], "bits": b, "variant": v} for b in args[args.index("--bits") + 1].split(",")
                    for v in args[args.index("--variants") + 1].split(",")]
            (out / "results.json").write_text(json.dumps({**study, "rows": rows}))
        else:
            variants = args[args.index("--variants") + 1].split(",")
            rows = [{"bits": "w4a4", "variant": v, "map50_95": 0.05} for v in variants]
            (out / "ptq.json").write_text(json.dumps({"float_map50_95": 0.08, "rows": rows}))
        return 1.0

    monkeypatch.setattr(bench_run, "run_script", fake_run)
    args = type("Args", (), {"out": tmp_path, "threads": 1, "resume": False, "fisher_bits": "w4a8,w4a4",
                             "dino_crqat_variants": "crqat,crqat-fisher", "bits": "w4a4",
                             "dino_qat_bits": "w8a8", "dino_qat_variants": "plain,crqat",
                             "dino_ptq_methods": "minmax,taskq", "ptq_images": None, "ptq_iterations": None})()
    ran, rows = bench_run.SOURCES["crqat-dino"](args, "1")
    script, argv = calls[-1]
    assert script == "bench_fisher_mmdet.py" and argv[argv.index("--variants") + 1] == "crqat,crqat-fisher"
    assert ran["name"] == "crqat-dino_seed1" and argv[argv.index("--out") + 1] == str(tmp_path / "raw" / "crqat-dino" / "seed1")
    assert [r["method"] for r in rows] == [bench_run.FISHER_METHODS[v] for v in ("crqat", "crqat-fisher")] * 2
    # crqat-rtmdet: the same study on RTMDet-tiny's config, from its 40-epoch float model, a unit of its own
    ran, rows = bench_run.SOURCES["crqat-rtmdet"](args, "0")
    script, argv = calls[-1]
    assert argv[argv.index("--config") + 1] == "rtmdet_tiny_synthetic"
    assert argv[argv.index("--float-epochs") + 1] == "40"
    assert ran["name"] == "crqat-rtmdet_seed0" and {r["model"] for r in rows} == {"RTMDet-tiny"}
    # qat-dino: the same script at W8A8 (which the 4-bit Fisher study leaves out), LSQ and CR-QAT, a unit of its own
    ran, rows = bench_run.SOURCES["qat-dino"](args, "0")
    script, argv = calls[-1]
    assert argv[argv.index("--bits") + 1] == "w8a8" and argv[argv.index("--variants") + 1] == "plain,crqat"
    assert ran["name"] == "qat-dino_seed0" and argv[argv.index("--out") + 1] == str(tmp_path / "raw" / "qat-dino" / "seed0")
    assert [(r["bits"], r["method"]) for r in rows] == [("w8a8", bench_run.QAT_METHODS[v]) for v in ("plain", "both")]
    ran, rows = bench_run.SOURCES["ptq-dino"](args, "0")
    script, argv = calls[-1]
    assert script == "bench_ptq_mmdet.py" and argv[argv.index("--config") + 1] == "dino_cspnext_synthetic"
    assert argv[argv.index("--variants") + 1] == "minmax,taskq"
    assert ran["name"] == "ptq-dino_seed0"
    assert {r["model"] for r in rows} == {"DINO (CSPNeXt-tiny)"} and [r["kept"] for r in rows] == [0.05 / 0.08] * 2
    # qdrop-dino: the same script and config, QDrop only, a unit of its own so ptq-dino's runs stay reusable
    bench_run.SOURCES["qdrop-dino"](args, "1")
    script, argv = calls[-1]
    assert script == "bench_ptq_mmdet.py" and argv[argv.index("--config") + 1] == "dino_cspnext_synthetic"
    assert argv[argv.index("--variants") + 1] == "qdrop"
    assert argv[argv.index("--out") + 1] == str(tmp_path / "raw" / "qdrop-dino" / "seed1")


def test_joined_source_rows_sit_among_the_rows_they_join_in_bits_and_method_order(monkeypatch):
    """qdrop-dino's rows go into ptq-dino's part of the table (by bits, then --ptq-methods' order), seeds averaged
    across the two units; a source nobody joins keeps its own row order."""
    def source(methods, bits_first=True):
        def rows(args, seed):
            pairs = [(b, m) for b in ("w8a8", "w4a4") for m in methods] if bits_first else \
                [(b, m) for m in methods for b in ("w8a8", "w4a4")]
            return {"name": seed}, [bench_run.accuracy_row("MMDetection", "DINO", b, m, seed, 0.04 + int(seed) / 100,
                                                           0.08) for b, m in pairs]
        return rows

    monkeypatch.setitem(bench_run.SOURCES, "ptq-dino", source(["PTQ minmax", "PTQ adaround", "PTQ taskq"]))
    monkeypatch.setitem(bench_run.SOURCES, "qdrop-dino", source(["PTQ qdrop"]))
    monkeypatch.setitem(bench_run.SOURCES, "qat-dino", source(["QAT LSQ", "CR-QAT"], bits_first=False))
    args = type("Args", (), {"sources": "qat-dino:0,ptq-dino,qdrop-dino", "seeds": "0,1",
                             "ptq_methods": "minmax,mse,adaround,qdrop,taskq"})()
    _, _, rows, extra, _ = bench_run.accuracy(args)
    assert [(r["bits"], r["method"]) for r in rows] == [
        ("W8A8", "QAT LSQ"), ("W4A4", "QAT LSQ"), ("W8A8", "CR-QAT"), ("W4A4", "CR-QAT"),
        *[(b, f"PTQ {m}") for b in ("W8A8", "W4A4") for m in ("minmax", "adaround", "qdrop", "taskq")]]
    qdrop = next(r for r in rows if r["method"] == "PTQ qdrop")
    assert qdrop["seeds"] == "0,1" and qdrop["map50_95"] == pytest.approx(0.045) and qdrop["kept_max"] == 0.625
    assert [c["name"] for c in extra["commands"]] == ["0", "0", "1", "0", "1"]


def test_a_source_can_have_its_own_seeds():
    args = type("Args", (), {"sources": "ptq,ptq-dino:0,crqat-dino:1+2", "seeds": "0,1"})()
    assert bench_run.source_seeds(args) == [("ptq", ["0", "1"]), ("ptq-dino", ["0"]), ("crqat-dino", ["1", "2"])]
    args.sources = "ptq,dino:0"
    with pytest.raises(SystemExit, match=r"unknown --sources \['dino'\]"):
        bench_run.source_seeds(args)
    args.sources = "ptq-dino:0,1"  # the comma starts a new source
    with pytest.raises(SystemExit, match=r"unknown --sources \['1'\]"):
        bench_run.source_seeds(args)
    args.sources = "ptq-dino:a"
    with pytest.raises(SystemExit, match="seeds after ':' are integers joined by '\\+'"):
        bench_run.source_seeds(args)


def test_declared_script_versions_are_the_ones_in_the_checkout():
    """Each SAME_RUNS_AS line names the script's content now: an edit since then makes the line dead (the units
    run again), so a stale line is caught here rather than silently never matching."""
    for script, _, now in bench_run.SAME_RUNS_AS:
        assert bench_run.script_content(script) == now, script


def test_lightning_source_names_each_recipe_by_bits_and_method_and_refuses_a_missing_one(monkeypatch, tmp_path):
    """bench_lightning.py --accuracy runs the example's recipe names (``w4a4``, ``w4a4-ptq``, ``w4a4+crqat``);
    the source asks for one per method and bit width and files each row under its method."""
    asked = {}

    def fake_run(script, args, log, env=None, drop=None):
        recipes = args[args.index("--recipes") + 1:]
        asked["recipes"] = recipes
        asked["ptq_images"] = args[args.index("--ptq-images") + 1] if "--ptq-images" in args else None
        rows = [{"recipe": "float", "map50_95": 0.04}] + [
            {"recipe": r, "map50_95": 0.01 * (i + 1)} for i, r in enumerate(recipes) if r != drop]
        path = Path(args[args.index("--json") + 1])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"rows": rows, "float_map50_95": 0.04}))
        return 1.0

    monkeypatch.setattr(bench_run, "run_script", fake_run)
    args = type("Args", (), {"out": tmp_path, "threads": 1, "resume": False, "bits": "w8a8,w4a4",
                             "lightning_methods": "qat,ptq,crqat", "imgsz": None, "num_train": None, "num_val": None,
                             "float_epochs": None, "qat_epochs": None, "ptq_images": None})()
    ran, rows = bench_run.lightning_runs(args, "0")
    assert asked["recipes"] == ["w8a8", "w4a4", "w8a8-ptq", "w4a4-ptq", "w8a8+crqat", "w4a4+crqat"]
    assert asked["ptq_images"] is None  # the script's default (64, as bench_ptq*.py's)
    got = {(r["bits"], r["method"]): r for r in rows}
    assert set(got) == {("w8a8", "QAT LSQ"), ("w4a4", "QAT LSQ"), ("w8a8", "PTQ mse"),
                        ("w4a4", "PTQ mse"), ("w8a8", "CR-QAT (curriculum + distillation)"),
                        ("w4a4", "CR-QAT (curriculum + distillation)")}
    assert got[("w4a4", "CR-QAT (curriculum + distillation)")]["kept"] == pytest.approx(0.06 / 0.04)
    # TASKQ at every width; CR-QAT + Fisher only where a Fisher preset exists (4-bit weights)
    args.lightning_methods = "taskq,crqat-fisher"
    ran, rows = bench_run.lightning_runs(args, "0")
    assert asked["recipes"] == ["w8a8-taskq", "w4a4-taskq", "w4a4-fisher+crqat"]
    assert [(r["bits"], r["method"]) for r in rows] == [
        ("w8a8", "PTQ taskq"), ("w4a4", "PTQ taskq"), ("w4a4", bench_run.FISHER_METHODS["crqat-fisher"])]
    # the ptq-lightning source: the PTQ baselines, named <bits>-ptq+<method>, in a folder of their own
    args.lightning_ptq_methods, args.ptq_images = "minmax,qdrop", 32  # --ptq-images reaches the Lightning script
    ran, rows = bench_run.SOURCES["ptq-lightning"](args, "0")
    assert asked["recipes"] == ["w8a8-ptq+minmax", "w4a4-ptq+minmax", "w8a8-ptq+qdrop", "w4a4-ptq+qdrop"]
    assert asked["ptq_images"] == "32"
    assert [(r["bits"], r["method"]) for r in rows] == [
        ("w8a8", "PTQ minmax"), ("w4a4", "PTQ minmax"), ("w8a8", "PTQ qdrop"), ("w4a4", "PTQ qdrop")]
    assert (tmp_path / "raw" / "ptq-lightning" / "seed0.json").is_file()
    assert bench_run.ROWS_JOIN["ptq-lightning"] == "lightning"
    args.lightning_methods = "qat,ptq,crqat"
    monkeypatch.setattr(bench_run, "run_script", lambda *a, **k: fake_run(*a, drop="w4a4-ptq"))
    with pytest.raises(suite.ScriptFailed, match="no result for w4a4-ptq"):
        bench_run.lightning_runs(args, "0")
    args.lightning_methods = "qat,awq"
    with pytest.raises(SystemExit, match=r"unknown --lightning_methods \['awq'\]"):
        bench_run.lightning_runs(args, "0")


def test_fisher_study_variants_are_the_recipes_they_name():
    """bench_fisher.py's variants: CR-QAT + Fisher turns on curriculum, distillation, mixed precision and the
    regulariser at once; an unknown variant is refused by name."""
    import bench_fisher

    from detq_hooks.recipe import load_recipe

    def on(variant):
        r = load_recipe(bench_fisher.variant_recipe("w4a4", variant, ["star"], 4.02, 0.01, 12))
        return (r.curriculum.enabled, r.distillation.enabled, r.mixed_precision.enabled, r.fisher_regularizer.enabled)

    assert on("plain") == (False, False, False, False)
    assert on("both") == (False, False, True, True)
    assert on("crqat") == (True, True, False, False)
    assert on("crqat-fisher") == (True, True, True, True)
    r = load_recipe(bench_fisher.variant_recipe("w4a4", "crqat-fisher", ["star"], 4.02, 0.01, 12))
    assert r.mixed_precision.budget == {"avg_weight_bits": 4.02} and r.fisher_regularizer.every == 12
    with pytest.raises(SystemExit, match="unknown variant 'fisher'"):
        bench_fisher.variant_recipe("w4a4", "fisher", ["star"], 4.0, 0.01, 12)


def test_accuracy_names_the_machine_each_run_came_from():
    note = bench_run.where_they_ran([
        {"name": "ptq_seed0", "finished": "2026-12-02 13:29:22 UTC"},
        {"name": "fisher_seed0", "finished": "2026-12-04 22:58:42 UTC", "cpu": "Intel Xeon"},
        {"name": "fisher_seed1", "finished": "2026-12-04 22:58:44 UTC", "cpu": "Intel Xeon"}])
    assert note == ("runs by machine: a machine not recorded (records older than the field): ptq_seed0 (2026-12-02); "
                    "Intel Xeon: fisher_seed0 (2026-12-04), fisher_seed1 (2026-12-04)")


def test_a_run_record_names_the_commit_and_machine_it_started_on(monkeypatch, tmp_path):
    """A long run spans commits made meanwhile; the code it imported is the one at its start."""
    heads = iter([{"commit": "a" * 40, "dirty": True}, {"commit": "b" * 40, "dirty": False}])
    monkeypatch.setattr(suite, "git_state", lambda *a: next(heads))
    monkeypatch.setattr(bench_run, "run_script", lambda *a, **k: 2.0)
    args = type("Args", (), {"out": tmp_path, "threads": 1, "resume": False})()
    bench_run.run_logged(args, "fisher_seed0", "bench_fisher.py", ["--seeds", 0], tmp_path / "r.json")
    record = json.loads((tmp_path / "raw" / "logs" / "fisher_seed0.run.json").read_text())
    assert record["commit"] == "a" * 40 and record["dirty_at_start"] is True
    assert record["cpu"] == suite.machine_info()["cpu"]
