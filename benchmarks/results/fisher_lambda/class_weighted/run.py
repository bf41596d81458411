"""Plain QAT of the Fisher study (``bench_fisher.py``) with Ultralytics' inverse-frequency class weights on the
classification loss (``cls_pw``), to see whether a loss weighted toward the rare classes keeps more of the critical
pair than plain QAT. Only the QAT runs get the weights; the float fine-tune stays as in the study.

    YOLO_OFFLINE=1 python benchmarks/results/fisher_lambda/class_weighted/run.py --cls-pw 1.0 -- \\
        --bits w4a4 --variants plain --seeds 0 --reg-every 12 --out benchmarks/results/fisher_lambda/class_weighted/s0
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # benchmarks/
import bench_fisher  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--cls-pw", type=float, required=True)
a, rest = p.parse_known_args()
rest = [x for x in rest if x != "--"]

from ultralytics import YOLO  # noqa: E402

_train = YOLO.train


def train(self, *args, **kwargs):
    if "detq" in kwargs:  # a QAT run, not the float fine-tune
        kwargs["cls_pw"] = a.cls_pw
    return _train(self, *args, **kwargs)


YOLO.train = train
raise SystemExit(bench_fisher.main(rest))
