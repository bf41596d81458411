"""Detector families: what detq-hooks needs to know about a model family, written once and used by every
trainer adapter (Ultralytics, Lightning, MMEngine).

    from detq_hooks.detectors import family_for
    family = family_for(model)            # UltralyticsFamily, TorchvisionFamily, TorchvisionSSDFamily, MMDetFamily or the generic one
    family.prediction_layers(model), family.stages(model), family.reconstruction_blocks(model)

Your own detector: subclass :class:`DetectorFamily` (see the README, "Your own detector") and pass an
instance as ``family=`` to the adapter (``DetQCallback(family=...)``, ``DetQHook(family=...)``) or
register it with :func:`register_family`.
"""

from __future__ import annotations

import importlib
from typing import Optional

from torch import nn

from ..recording import Recorded, Taps
from .base import PREDICTION_LEAF, DetectorFamily, UnsupportedDetectorError

# Checked in order; each module imports its detector library only when a model of that library is asked about.
_BUILTIN = (
    "detq_hooks.detectors.ultralytics:UltralyticsFamily",
    "detq_hooks.detectors.torchvision:TorchvisionFamily",
    "detq_hooks.detectors.torchvision:TorchvisionSSDFamily",
    "detq_hooks.detectors.mmdet:MMDetFamily",
)
_registered: list[type[DetectorFamily]] = []


def register_family(cls: type[DetectorFamily]) -> type[DetectorFamily]:
    """Register a family (usable as a class decorator); registered families are asked before the built-in ones."""
    if not (isinstance(cls, type) and issubclass(cls, DetectorFamily)):
        raise TypeError(f"register_family expects a DetectorFamily subclass, got {cls!r}")
    if cls not in _registered:
        _registered.insert(0, cls)
    return cls


def _builtin(path: str) -> type[DetectorFamily]:
    mod, _, name = path.partition(":")
    return getattr(importlib.import_module(mod), name)


def family_for(model: nn.Module, family: Optional[DetectorFamily] = None) -> DetectorFamily:
    """The family that answers for ``model``: ``family`` if given, else the first registered or built-in one
    whose ``matches(model)`` is true, else the generic :class:`DetectorFamily`."""
    if family is not None:
        if isinstance(family, type) and issubclass(family, DetectorFamily):
            return family()
        if not isinstance(family, DetectorFamily):
            raise TypeError(f"`family` = {family!r} must be a detq_hooks.detectors.DetectorFamily (instance or subclass)")
        return family
    for cls in list(_registered) + [_builtin(p) for p in _BUILTIN]:
        if cls.matches(model):
            return cls()
    return DetectorFamily()


__all__ = ["DetectorFamily", "UnsupportedDetectorError", "Taps", "Recorded", "family_for", "register_family", "PREDICTION_LEAF"]
