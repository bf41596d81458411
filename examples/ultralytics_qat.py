"""QAT of a YOLO detector with detq-hooks inside Ultralytics' own trainer.

    python examples/ultralytics_qat.py [--model yolo11n.pt] [--data data.yaml] [--detq w4a8] [--epochs 10]

Without --data the synthetic data set is generated (offline). The same run from the command line:

    detq train ultralytics model=yolo11n.pt data=data.yaml detq=w4a8 epochs=10
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="yolo11n.yaml", help="float .pt (QAT start and later teacher) or model yaml")
    p.add_argument("--data", default=None)
    p.add_argument("--detq", default="w4a8", help="preset, or integrations/ultralytics/*.yaml")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--imgsz", type=int, default=128)
    p.add_argument("--out", default="runs/detq_example")
    a = p.parse_args()

    from ultralytics import RTDETR, YOLO

    from detq_hooks.ultralytics import DetQTrainer
    from detq_hooks.ultralytics.evaluate import export_model_onnx

    data = a.data
    if data is None:
        from detq_hooks.tools.data import make_synthetic_dataset

        data = str(make_synthetic_dataset(f"{a.out}/data", num_train=64, num_val=16, imgsz=a.imgsz).yolo_yaml)

    model = (RTDETR if "rtdetr" in a.model else YOLO)(a.model)
    model.train(data=data, trainer=DetQTrainer, detq=a.detq, epochs=a.epochs, imgsz=a.imgsz, batch=16,
                device="cpu", workers=0, amp=False, plots=False, project=a.out, name="qat", exist_ok=True)
    best = model.trainer.best

    # The quantized checkpoint loads without the trainer (detq-hooks must be installed).
    q = YOLO(str(best))
    print(q.val(data=data, imgsz=a.imgsz, device="cpu", plots=False).box.map)
    res = export_model_onnx(q.model, f"{a.out}/qat.onnx", a.imgsz)
    print(f"ONNX QDQ: {res.path} ({res.quantize_linear} QuantizeLinear, bits {res.bits_histogram})")


if __name__ == "__main__":
    main()
