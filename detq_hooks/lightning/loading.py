"""Loading a checkpoint of a :class:`~detq_hooks.lightning.DetQCallback` run outside the Trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.utilities.model_helpers import is_overridden

from ..checkpoint import CHECKPOINT_KEY, CheckpointMismatchError, read_state
from ..session import QuantSession

#: where 0.1.0 kept the distillation teacher (now inside the ``detq`` entry)
LEGACY_TEACHER_KEY = "detq_teacher"
#: the name of DetQCallback's own state in ``checkpoint["callbacks"]`` (0.1.0 kept the curriculum there)
CALLBACK_STATE_KEY = "DetQCallback"


def read_entry(checkpoint: dict, source: str, callback_state_key: str = CALLBACK_STATE_KEY) -> Optional[dict]:
    """The checkpoint's ``detq`` entry in the current format (0.1.0 Lightning checkpoints included: their
    teacher was in ``checkpoint["detq_teacher"]`` and their curriculum in the callback's state)."""
    entry = read_state(checkpoint.get(CHECKPOINT_KEY), source=source, legacy_teacher=checkpoint.get(LEGACY_TEACHER_KEY))
    if entry is not None and entry.get("curriculum") is None:
        legacy = (checkpoint.get("callbacks") or {}).get(callback_state_key) or {}
        if legacy.get("curriculum") is not None:
            entry["curriculum"] = legacy["curriculum"]
    return entry


def load_quantized_checkpoint(
    module_cls: type,
    checkpoint_path: Union[str, Path],
    *,
    map_location: Any = None,
    strict: bool = True,
    **kwargs: Any,
) -> "pl.LightningModule":
    """Load a checkpoint written by a run with :class:`DetQCallback` into a new ``module_cls`` instance.

    The module is built like ``module_cls.load_from_checkpoint`` does (hyper-parameters from the checkpoint,
    ``kwargs`` override them), rebuilt from the checkpoint's saved per-layer plan (the authority: bit widths
    changed after conversion come back as saved), verified, then loaded strictly.

    Raises:
        CheckpointMismatchError: the checkpoint has no quantization state (a float checkpoint: use
            ``module_cls.load_from_checkpoint``) or does not fit the module (naming the layer).

    Example:
        >>> model = load_quantized_checkpoint(MyDetector, "last.ckpt", map_location="cpu")  # doctest: +SKIP
    """
    source = str(checkpoint_path)
    orig = module_cls.on_load_checkpoint

    def on_load_checkpoint(self, checkpoint):
        orig(self, checkpoint)
        entry = read_entry(checkpoint, source)
        if entry is None:
            raise CheckpointMismatchError(
                f"{source}: no detq quantization state (was it written by a run with DetQCallback?); "
                f"load float checkpoints with {module_cls.__name__}.load_from_checkpoint"
            )
        if is_overridden("configure_model", self, parent=pl.LightningModule):
            self.configure_model()
        target = entry.get("target") or ""
        model = self.get_submodule(target) if target else self
        session = QuantSession(entry["recipe"])
        session.restore(model, entry, source=source)
        session.verify(model, checkpoint.get("state_dict", {}), entry, source=source, prefix=f"{target}." if target else "")
        session.load_state(model, entry, source=source, resume=False)

    loader_cls = type(module_cls.__name__, (module_cls,), {"on_load_checkpoint": on_load_checkpoint,
                                                           "__module__": module_cls.__module__})
    model = loader_cls.load_from_checkpoint(checkpoint_path, map_location=map_location, strict=strict, **kwargs)
    model.__class__ = module_cls
    return model


__all__ = ["load_quantized_checkpoint", "read_entry"]
