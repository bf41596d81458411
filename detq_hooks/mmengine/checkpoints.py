"""MMEngine checkpoints and torch's safe loader (torch >= 2.6 loads with ``weights_only=True`` by default).

Importing :mod:`detq_hooks.mmengine` applies both registrations below; their behaviour is that of 0.1.0.
"""

from __future__ import annotations

import os.path as osp
import pickle
import warnings
from typing import Any

import torch


def _history_buffer_reduce(self):
    # Plain data only (two arrays and an int): the default pickle of a HistoryBuffer also stores its
    # statistics methods through `builtins.getattr`, which a safe (weights_only) load must refuse.
    return (type(self), (self._log_history, self._count_history, self.max_length))


def register_safe_checkpoint_globals() -> None:
    """Let ``torch.load``'s default ``weights_only=True`` read MMEngine checkpoints.

    MMEngine calls ``torch.load`` without ``weights_only``; its checkpoints carry a message hub with
    ``HistoryBuffer`` objects and numpy arrays. Instead of turning the safe loader off (or asking users for an
    environment variable), ``HistoryBuffer`` is made to pickle as plain data and the few classes involved are
    allow-listed. Checkpoints written without this import need a full load (see
    :func:`register_local_checkpoint_loader`).
    """
    import numpy as np

    try:
        from mmengine.logging.history_buffer import HistoryBuffer
    except Exception:  # pragma: no cover - very old mmengine
        return
    HistoryBuffer.__reduce__ = _history_buffer_reduce
    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core
    safe: list[Any] = [HistoryBuffer, np.ndarray, np.dtype, core.multiarray._reconstruct, core.multiarray.scalar]
    for name in dir(np.dtypes):
        cls = getattr(np.dtypes, name)
        if isinstance(cls, type):
            safe.append(cls)
    torch.serialization.add_safe_globals(safe)


def _load_from_local(filename, map_location=None):
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f"{filename} can not be found.")
    try:
        return torch.load(filename, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        warnings.warn(
            f"detq-hooks: {filename} needs a full (weights_only=False) unpickle ({str(e).splitlines()[0][:120]}...); "
            "loading it because the config names it. Checkpoints written with detq_hooks.mmengine imported load safely.",
            stacklevel=2,
        )
        return torch.load(filename, map_location=map_location, weights_only=False)


def register_local_checkpoint_loader() -> None:
    """Local checkpoints: torch's safe load first; a file that only a full unpickle reads (an MMEngine checkpoint
    written by a run that did not import this module: its message hub pickles through ``builtins.getattr``) is the
    user's own file, named in their config (``load_from``/``resume``), so it is loaded fully, as MMEngine did
    before torch 2.6, with a warning that names it."""
    try:
        from mmengine.runner.checkpoint import CheckpointLoader
    except Exception:  # pragma: no cover - an MMEngine without CheckpointLoader schemes
        return
    CheckpointLoader.register_scheme(prefixes="", loader=_load_from_local, force=True)


def read_weights(path: str) -> dict:
    """A float checkpoint named in a config (local path, URL, ``open-mmlab://``) → its state dict."""
    from mmengine.runner.checkpoint import _load_checkpoint

    ckpt = _load_checkpoint(str(path), map_location="cpu")
    return ckpt.get("state_dict", ckpt)


__all__ = ["register_safe_checkpoint_globals", "register_local_checkpoint_loader", "read_weights"]
