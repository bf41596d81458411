"""Critical-category figures in Ultralytics' own validation output (results, ``results.csv``, the log).

The validator's per-class AP table (``metrics.box.all_ap``: AP at IoU 0.50:0.95 per class present in the
validation labels) restricted to the recipe's critical classes gives ``metrics/critical_mAP50-95(B)`` and
``metrics/critical_mAP50(B)``, the same definition as COCO AP over ``catIds`` (classes without a ground truth
take no part).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np

CRITICAL_KEYS = ("metrics/critical_mAP50-95(B)", "metrics/critical_mAP50(B)")


def critical_figures(all_ap: np.ndarray, class_index: Sequence[int], critical_ids: Sequence[int]) -> dict[str, float]:
    """Mean AP50-95 and AP50 over the critical classes that have ground truth (``nan`` when none has)."""
    ap = np.asarray(all_ap, dtype=np.float64).reshape(-1, 10) if len(all_ap) else np.zeros((0, 10))
    wanted = {int(k) for k in critical_ids}
    rows = [i for i, c in enumerate(class_index) if int(c) in wanted]
    if not rows:
        return dict.fromkeys(CRITICAL_KEYS, float("nan"))
    return {CRITICAL_KEYS[0]: float(ap[rows].mean()), CRITICAL_KEYS[1]: float(ap[rows, 0].mean())}


@lru_cache(maxsize=None)
def with_critical_metrics(validator_cls: type) -> type:
    """A subclass of an Ultralytics detection validator whose ``get_stats`` adds the critical-category keys
    (the classes in its ``detq_critical_ids`` attribute)."""

    class CriticalValidator(validator_cls):
        detq_critical_ids: Sequence[int] = ()

        def get_stats(self):
            stats = super().get_stats()
            box = getattr(self.metrics, "box", None)
            if self.detq_critical_ids and box is not None:
                stats.update(critical_figures(box.all_ap, box.ap_class_index, self.detq_critical_ids))
            return stats

    CriticalValidator.__name__ = CriticalValidator.__qualname__ = f"Critical{validator_cls.__name__}"
    return CriticalValidator


__all__ = ["critical_figures", "with_critical_metrics", "CRITICAL_KEYS"]
