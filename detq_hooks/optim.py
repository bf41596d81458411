"""Optimizer plumbing shared by the adapters: quantizer parameters (LSQ scales, LSQ+ offsets) are
optimised in their own group, without weight decay (decay would shrink the ranges) and at
``quantization.quantizer_lr_scale`` times the base learning rate."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .quantizers import quantizer_parameters

QUANTIZER_GROUP_NAME = "detq_quantizers"


def split_quantizer_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(model parameters without quantizer ones, quantizer parameters)``."""
    qparams = quantizer_parameters(model)
    ids = {id(p) for p in qparams}
    return [p for p in model.parameters() if id(p) not in ids], qparams


def add_quantizer_param_group(
    optimizer: torch.optim.Optimizer, model: nn.Module, lr_scale: float = 0.1, base_lr: Optional[float] = None
) -> int:
    """Move the model's quantizer parameters into one new group of ``optimizer`` (weight decay 0, learning
    rate ``lr_scale × base_lr``; ``base_lr`` defaults to the first group's). Parameters the optimizer already
    holds in other groups are taken out of them first. Returns the number of parameters in the group."""
    qparams = [p for p in quantizer_parameters(model) if p.requires_grad]
    if not qparams:
        return 0
    ids = {id(p) for p in qparams}
    for group in optimizer.param_groups:
        if group.get("name") == QUANTIZER_GROUP_NAME:
            raise ValueError("the optimizer already has a detq quantizer parameter group")
        group["params"] = [p for p in group["params"] if id(p) not in ids]
    base = base_lr if base_lr is not None else optimizer.param_groups[0]["lr"]
    group = {"params": qparams, "lr": base * lr_scale, "weight_decay": 0.0, "name": QUANTIZER_GROUP_NAME}
    if "initial_lr" in optimizer.param_groups[0]:
        group["initial_lr"] = optimizer.param_groups[0]["initial_lr"] * lr_scale
    optimizer.add_param_group(group)
    return len(qparams)


__all__ = ["split_quantizer_parameters", "add_quantizer_param_group", "QUANTIZER_GROUP_NAME"]
