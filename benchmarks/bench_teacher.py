"""The distillation teacher's forward: as given, as the inference copy CR-QAT runs (BatchNorms folded, channels-last
weights on CPU), and that copy under bf16 autocast (``distillation.teacher_precision: bfloat16``).

    YOLO_OFFLINE=1 python benchmarks/bench_teacher.py [--rounds 7 --json out.json]

Two teachers with random weights and randomised BatchNorm statistics: YOLO11n (batch 16 at 160 px, the cost suite's
step) and torchvision's RetinaNet ResNet-50 FPN backbone (FrozenBatchNorm2d, batch 2 at 320 px). The three forms run
in turns on the same input (several rounds: this machine's timings are noisy); per form the median time, min-max, the
ratio to the plain forward per round, the largest difference from the plain forward's output relative to its largest
value, and how many norms were folded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")

import torch  # noqa: E402


def randomise_norms(model: torch.nn.Module) -> None:
    """Statistics away from their initial values, so that a wrong fold would show in the output."""
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "running_var") and m.running_var is not None:
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)


def teachers():
    import torchvision
    from ultralytics.nn.tasks import DetectionModel

    yolo = DetectionModel("yolo11n.yaml", nc=8, verbose=False)
    x = torch.rand(16, 3, 160, 160)
    yield "YOLO11n, batch 16 at 160 px", yolo, lambda m: m(x)[0]
    retina = torchvision.models.detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=5)
    images = torch.rand(2, 3, 320, 320)
    yield "RetinaNet R50-FPN backbone (FrozenBatchNorm2d), batch 2 at 320 px", retina.backbone, lambda m: m(images)["0"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--json", default=None)
    a = p.parse_args()

    from detq_hooks.distill import Teacher

    torch.manual_seed(0)
    rows = []
    for name, model, forward in teachers():
        randomise_norms(model)
        teacher = Teacher.from_model(model)
        fast = teacher.inference_module(forward)
        half = Teacher(teacher.module, "bfloat16")
        forms = {"as given": lambda: teacher.run(forward), "folded": lambda: teacher.run(forward, fast),
                 "folded, bf16 autocast": lambda: half.run(forward, fast)}
        reference = forms["as given"]()
        errors = {k: ((f().float() - reference).abs().max() / reference.abs().max()).item() for k, f in forms.items()}
        times: dict[str, list[float]] = {k: [] for k in forms}
        for _ in range(a.rounds):
            for k, f in forms.items():
                t = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t)
        plain_modules = dict(teacher.module.named_modules())
        folded = sum(isinstance(m, torch.nn.Identity) and not isinstance(plain_modules[n], torch.nn.Identity)
                     for n, m in fast.named_modules())
        for k in forms:
            ratios = [t / p for t, p in zip(times[k], times["as given"])]
            row = {"teacher": name, "form": k, "median_ms": statistics.median(times[k]) * 1e3,
                   "min_ms": min(times[k]) * 1e3, "max_ms": max(times[k]) * 1e3,
                   "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
                   "max_relative_difference": errors[k], "norms_folded": folded}
            rows.append(row)
            print(f"{name:<66} {k:<22} {row['median_ms']:8.1f} ms ({row['min_ms']:.1f}-{row['max_ms']:.1f})  "
                  f"÷ as given {row['ratio_median']:.3f} ({row['ratio_min']:.3f}-{row['ratio_max']:.3f})  "
                  f"max rel diff {errors[k]:.1e}  norms folded {folded}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"torch_threads": torch.get_num_threads(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
