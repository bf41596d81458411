"""Re-time the files a ``bench_deploy.py`` run exported, side by side with more rounds (no export, no mAP).

    python benchmarks/retime_deploy.py --out /tmp/detq_bench_deploy [--sizes 320 640 --rounds 10
        --variants float w8a8 w8a8+shared --threads 2]

``bench_deploy.py`` times every runner of one size in ``--rounds`` interleaved rounds; on a shared or noisy
machine a closer comparison of a few variants wants more rounds than the full table can afford. This reads
``<out>/s<size>/`` (OpenVINO IR of each variant and NNCF's, onnxruntime files of ours and ``quantize_static``),
times OpenVINO at the default and f32 precision and onnxruntime, and prints the median and the min–max of the
per-round medians; writes ``<out>/retime.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def runners_at(folder: Path, variants: list[str], threads: int) -> dict:
    from detq_hooks.deploy import make_runner

    runners = {}
    for v in [*variants, "nncf"]:
        xml = folder / ("float_ov/float.xml" if v == "float" else "nncf_ov/nncf.xml" if v == "nncf" else f"{v}_ov/{v}.xml")
        runners[f"{v} | openvino default"] = make_runner(xml, "openvino", threads)
        runners[f"{v} | openvino f32"] = make_runner(xml, "openvino", threads, precision="f32")
    for v in [*variants, "ort_qs"]:
        onnx = folder / ("float.onnx" if v == "float" else "ort_qs.onnx" if v == "ort_qs" else f"{v}_ort.onnx")
        runners[f"{v} | onnxruntime"] = make_runner(onnx, "onnxruntime", threads)
    return runners


def main(argv=None) -> None:
    from detq_hooks.deploy import time_runners

    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True, help="the --out folder of a bench_deploy.py run")
    p.add_argument("--sizes", type=int, nargs="+", default=[320, 640])
    p.add_argument("--variants", nargs="+", default=["float", "w8a8", "w8a8+shared"])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    out, results = Path(args.out), {}
    for size in args.sizes:
        x = np.zeros((1, 3, size, size), np.float32)
        res = time_runners(runners_at(out / f"s{size}", args.variants, args.threads), x,
                           reps=max(4, 20 * 320 ** 2 // size ** 2), rounds=args.rounds)
        results[size] = res
        for k, v in res.items():
            r = v["round_medians_ms"]
            print(f"{size} px  {k:32s} {v['median_ms']:7.2f} ms  (round medians {min(r):.2f}-{max(r):.2f})")
    (out / "retime.json").write_text(json.dumps({"settings": vars(args), "results": results}, indent=1))
    print(f"written {out / 'retime.json'}")


if __name__ == "__main__":
    main()
