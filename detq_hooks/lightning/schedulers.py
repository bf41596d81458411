"""LR schedulers built by ``configure_optimizers`` before the quantizer parameter group existed."""

from __future__ import annotations

import torch

from ..optim import QUANTIZER_GROUP_NAME


def _extend_schedulers(trainer, optimizer: torch.optim.Optimizer, n_before: int) -> None:
    """Schedulers built before the quantizer group existed remember one base value per old group: give the
    new group (the last one) its values too."""
    for cfg in trainer.lr_scheduler_configs:
        sched = cfg.scheduler
        if getattr(sched, "optimizer", None) is not optimizer:
            continue
        group = optimizer.param_groups[-1]
        group.setdefault("initial_lr", group["lr"])
        if hasattr(sched, "base_lrs") and len(sched.base_lrs) == n_before:
            sched.base_lrs.append(group["initial_lr"])
        if hasattr(sched, "_last_lr") and isinstance(sched._last_lr, list) and len(sched._last_lr) == n_before:
            sched._last_lr.append(group["lr"])
        fns = getattr(sched, "lr_lambdas", None)
        if isinstance(fns, list) and len(fns) == n_before:
            if len({id(f) for f in fns}) != 1:
                raise RuntimeError(
                    f"DetQCallback: {type(sched).__name__} has one lambda per parameter group; give the quantizer "
                    f"group ('{QUANTIZER_GROUP_NAME}') its own in configure_optimizers or use one lambda"
                )
            fns.append(fns[0])
        if type(sched).__name__ in ("OneCycleLR", "CyclicLR"):
            for key in ("max_lr", "min_lr", "max_momentum", "base_momentum"):
                if key in optimizer.param_groups[0] and key not in group:
                    ratio = group["initial_lr"] / max(optimizer.param_groups[0].get("initial_lr", 1.0), 1e-30)
                    group[key] = optimizer.param_groups[0][key] * (ratio if "lr" in key else 1.0)
            if hasattr(sched, "max_lrs") and len(sched.max_lrs) == n_before:
                sched.max_lrs.append(group.get("max_lr", group["lr"]))


__all__ = ["_extend_schedulers"]
