"""The one way detq-hooks reads module outputs during a forward: forward hooks that record, by module name,
every call's output (and, where asked, every call's first input) of a few named sub-modules.

A head tower shared across pyramid levels runs once per level, so each name keeps a list, one entry per
call. The student's recorder is installed for the whole training and records only while autograd is on
and the module trains (so validation and calibration forwards keep no tensors); a teacher's recorder
records always (the teacher runs without gradients).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn


@dataclass
class Taps:
    """Modules whose outputs (``outputs``) or first positional inputs (``inputs``) a method reads, by name."""

    outputs: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)

    def __or__(self, other: "Taps") -> "Taps":
        return Taps(sorted(set(self.outputs) | set(other.outputs)), sorted(set(self.inputs) | set(other.inputs)))

    def __bool__(self) -> bool:
        return bool(self.outputs or self.inputs)


class Recorded:
    """What a :class:`Recorder` saw: ``outputs[name]`` / ``inputs[name]``, one entry per call."""

    def __init__(self, outputs: dict[str, list[Any]], inputs: dict[str, list[Any]]) -> None:
        self.outputs, self.inputs = outputs, inputs

    def output(self, name: str, call: int = -1) -> Any:
        return self._get(self.outputs, name, call, "output")

    def input(self, name: str, call: int = -1) -> Any:
        return self._get(self.inputs, name, call, "input")

    @staticmethod
    def _get(store: dict, name: str, call: int, what: str) -> Any:
        if name not in store:
            raise KeyError(f"no {what} of {name!r} was asked to be recorded (taps: {sorted(store)})")
        if not store[name]:
            raise KeyError(f"{name!r} did not run in the recorded forward (is it on the model's forward path?)")
        return store[name][call]


def _named_modules(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    """``model``'s sub-modules by name; a name it lacks is a ``KeyError`` naming all such names."""
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise KeyError(f"no sub-module named {missing} in {type(model).__name__}")
    return modules


class Recorder:
    """Forward hooks on the modules named by ``taps``.

    Args:
        model: the module tree the names refer to.
        taps: which outputs and inputs to record.
        always: record in every forward (teacher); else only while autograd is enabled and the module is in
            training mode (the student during its training step).
    """

    def __init__(self, model: nn.Module, taps: Taps, *, always: bool = False) -> None:
        modules = _named_modules(model, list(taps.outputs) + list(taps.inputs))
        self.always = always
        self.outputs: dict[str, list[Any]] = {n: [] for n in taps.outputs}
        self.inputs: dict[str, list[Any]] = {n: [] for n in taps.inputs}
        self._handles = [modules[n].register_forward_hook(self._output_hook(n)) for n in taps.outputs]
        self._handles += [modules[n].register_forward_pre_hook(self._input_hook(n)) for n in taps.inputs]

    def _active(self, module: nn.Module) -> bool:
        return self.always or (module.training and torch.is_grad_enabled())

    def _output_hook(self, name: str):
        def hook(module, args, output):
            if self._active(module):
                self.outputs[name].append(output)
        return hook

    def _input_hook(self, name: str):
        def hook(module, args):
            if self._active(module) and args:
                self.inputs[name].append(args[0])
        return hook

    @property
    def recorded(self) -> Recorded:
        return Recorded(self.outputs, self.inputs)

    def clear(self) -> None:
        for store in (self.outputs, self.inputs):
            for v in store.values():
                v.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.clear()


@contextlib.contextmanager
def record(model: nn.Module, taps: Taps, *, always: bool = True):
    """``with record(model, Taps(outputs=[...])) as rec: model(x)`` — then ``rec.output(name)``."""
    recorder = Recorder(model, taps, always=always)
    try:
        yield recorder.recorded
    finally:
        for h in recorder._handles:
            h.remove()


class _ForwardStopped(BaseException):
    """Raised by :func:`stop_after` inside a forward; a ``BaseException`` so that no ``except Exception`` in
    the model's own code catches or wraps it on its way out."""


@contextlib.contextmanager
def stop_after(model: nn.Module, names: Sequence[str]):
    """``with stop_after(model, names): model(x)`` — the forward ends as soon as every named sub-module has
    returned once (its output hooks, e.g. a :func:`record` entered before this, have run); the rest of the
    model is not computed and the call returns nothing. Without names the forward runs to the end.

    Only for a forward whose result is read through hooks (a teacher's features), and only when each named
    module runs once per forward: a module called again later would be cut off after its first call."""
    modules = _named_modules(model, names)
    pending = set(names)

    def hook_for(name: str):
        def hook(module, args, output):
            pending.discard(name)
            if not pending:
                raise _ForwardStopped
        return hook

    handles = [modules[n].register_forward_hook(hook_for(n)) for n in dict.fromkeys(names)]
    try:
        yield
    except _ForwardStopped:
        pass
    finally:
        for h in handles:
            h.remove()


def capture_outputs(model: nn.Module, module_names: Sequence[str]):
    """Outputs of the named sub-modules during forwards inside the block, as ``{name: last output}``.

    Kept for scripts written against 0.1.0; new code uses :func:`record`."""
    return _LastOutputs(model, module_names)


class _LastOutputs(contextlib.AbstractContextManager):
    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self._recorder = Recorder(model, Taps(outputs=list(names)), always=True)

    def __enter__(self) -> "dict[str, Any]":
        self._view = _LastView(self._recorder.outputs)
        return self._view

    def __exit__(self, *exc) -> None:
        for h in self._recorder._handles:
            h.remove()


class _LastView(dict):
    def __init__(self, store: dict[str, list[Any]]) -> None:
        super().__init__()
        self._store = store

    def __getitem__(self, name: str) -> Any:
        return self._store[name][-1]

    def __contains__(self, name: object) -> bool:
        return name in self._store and bool(self._store[name])


__all__ = ["Taps", "Recorded", "Recorder", "record", "stop_after", "capture_outputs"]
