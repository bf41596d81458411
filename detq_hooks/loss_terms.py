"""The loss-term seam: extra terms a method adds to the trainer's own loss, computed the same way in every
trainer (inside its DDP-wrapped forward, so their gradients are all-reduced with the task loss).

A :class:`LossTerm` names the module outputs it reads (:meth:`LossTerm.taps`; the session records them during
the trainer's forward) and maps a :class:`StepContext` to named tensors. The trainer adapters only decide
*where* the sum is added (Lightning: the ``training_step`` loss; MMEngine: ``model.loss``'s dict; Ultralytics:
the criterion's loss vector).
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn
from torch.utils._pytree import tree_map

from .curriculum import Stage
from .distill import DistillationLoss, Teacher
from .quantizers import iter_quantizers
from .recording import Recorded, Taps, record, stop_after


@dataclass
class StepContext:
    """What a loss term sees at one training step.

    Attributes:
        model: the quantized (unwrapped) model.
        batch: the batch in the detector family's convention (Ultralytics: the preprocessed batch dict;
            torchvision/Lightning: ``(images, targets)``; MMDetection: ``(inputs, data_samples)``).
        recorded: the taps recorded during this step's forward.
        stage: the curriculum stage index (``None`` without a curriculum).
        outputs: the trainer's own step output where it has one.
        task_loss: the trainer's own loss of this step, detached (a scalar tensor, read only by a term that needs
            it), in the units the terms are added in (``None`` where the adapter does not know it): a yardstick
            for terms whose scale is not the loss's own.
    """

    model: nn.Module
    batch: Any
    recorded: Recorded
    stage: Optional[int] = None
    outputs: Any = None
    logs: dict[str, float] = field(default_factory=dict)
    task_loss: Optional[Union[torch.Tensor, float]] = None


class LossTerm:
    """An extra loss term. Subclass and implement :meth:`__call__` (and :meth:`taps` if it reads module outputs).

    Terms whose name starts with ``_`` are added to the loss but not logged.
    """

    name = "term"

    def taps(self, model: nn.Module) -> Taps:
        return Taps()

    def log_names(self) -> list[str]:
        """The names this term logs at every step (trainers that need a fixed set of loss items ask first)."""
        return [] if self.name.startswith("_") else [self.name]

    def prefetch(self, batch: Any, stage: Optional[int]) -> None:
        """The trainer holds the step's batch, before the student's forward (:meth:`QuantSession.batch_ready`):
        start work that does not depend on the student. Nothing by default."""

    def close(self) -> None:
        """End of training: release what :meth:`prefetch` holds. Nothing by default."""

    def __call__(self, ctx: StepContext) -> dict[str, torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError


class FunctionTerm(LossTerm):
    """A plain function ``fn(ctx) -> {name: tensor}`` as a loss term."""

    def __init__(self, name: str, fn: Callable[[StepContext], dict[str, torch.Tensor]], taps: Optional[Taps] = None) -> None:
        self.name, self.fn, self._taps = name, fn, taps or Taps()

    def taps(self, model: nn.Module) -> Taps:
        return self._taps

    def __call__(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        return self.fn(ctx)


class DisabledQuantizerAnchor(LossTerm):
    """Keeps the parameters of quantizers switched off by the curriculum in the autograd graph (gradient exactly 0).

    A disabled quantizer passes its input through, so its scale takes no part in the loss, and DDP without
    ``find_unused_parameters`` stops at the next iteration ("parameters that were not used in producing
    loss"). The curriculum restores frozen stages after every step anyway.
    """

    name = "_ddp_anchor"

    def __call__(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        params = [p for _, q in iter_quantizers(ctx.model) if not q.enabled
                  for p in q.parameters(recurse=False) if p.requires_grad]
        return {"_ddp_anchor": torch.stack([p.sum() for p in params]).sum() * 0.0} if params else {}


class DistillationTerm(LossTerm):
    """CR-QAT distillation from the frozen float teacher: PKD on the stages' output features and, for
    families that read their head, the relational, logit and box terms on the teacher's positives."""

    name = "distill"

    def __init__(self, family, teacher: Teacher, loss: DistillationLoss, stages: Sequence[Stage]) -> None:
        self.family, self.teacher, self.loss = family, teacher, loss
        self.feature_modules = [list(st.outputs) for st in list(stages)[:-1]]
        cfg = loss.cfg
        self.reads_head = any(w > 0 for w in (cfg.relational_weight, cfg.logit_weight, cfg.box_weight))
        self.last_terms: dict[str, float] = {}
        self._last_once: Optional[bool] = None  # the last step's graph check (None: no step yet)
        self._worker: Optional[ThreadPoolExecutor] = None
        self._pending: Optional[tuple[tuple, Future]] = None  # (what it was planned for, the teacher's pass)

    def __getstate__(self) -> dict:  # a copy (deepcopy, pickling) starts without the worker and its pending pass
        return {**self.__dict__, "_worker": None, "_pending": None}

    def log_names(self) -> list[str]:
        parts = [f"pkd_stage{i + 1}" for i in range(len(self.feature_modules))]
        parts += ["relational", "logit", "box"] if self.reads_head else []
        return [f"distill_{p}" for p in parts]

    def taps(self, model: nn.Module) -> Taps:
        taps = Taps(outputs=[n for group in self.feature_modules for n in group])
        if self.reads_head:
            taps = taps | self.family.head_taps(model)
        return taps

    def _plan(self, stage: Optional[int]) -> tuple[list[list[str]], list[str], bool]:
        """The feature groups, their module names and whether the head is read at curriculum ``stage``."""
        final = self.loss.num_stages - 1
        active = final if stage is None else stage
        reads_head = self.reads_head and active >= final
        groups = self.feature_modules[:min(active + 1, final)] if self.loss.cfg.feature_weight > 0 else []
        return groups, [n for group in groups for n in group], reads_head

    def _teacher_pass(self, batch: Any, names: list[str], reads_head: bool, once: bool) -> tuple[Recorded, Any]:
        """The teacher's forward on ``batch``: what its taps recorded and, where the head is read, its head outputs."""
        # the teacher with its BatchNorms folded (CPU: channels-last): the same function, fewer passes; no conv
        # whose output a tap reads is folded
        forward = lambda m: self.family.teacher_forward(m, batch)  # noqa: E731
        teacher = self.teacher.inference_module(forward, keep=self.taps(self.teacher.module).outputs)
        taps = Taps(outputs=names) | (self.family.head_taps(teacher) if reads_head else Taps())
        # cut the teacher short only where each read module ran once in the student's forward (the same graph)
        with record(teacher, taps) as t_rec, stop_after(teacher, names if once and not reads_head else ()):
            self.teacher.run(forward, teacher)
        if self.teacher.precision != "float32":
            # a half-precision teacher's outputs, rounded once: decoded (anchors, boxes) and compared in float32
            t_rec = Recorded(*(tree_map(_float32, store) for store in (t_rec.outputs, t_rec.inputs)))
        return t_rec, (self.family.head_outputs(teacher, t_rec, batch) if reads_head else None)

    def prefetch(self, batch: Any, stage: Optional[int]) -> None:
        """Start the teacher's forward on ``batch`` in a worker thread while the student's forward runs, where a
        CPU teacher has cores the trainer leaves idle (Ultralytics runs at most cores − 1 threads: one of two
        cores); :meth:`__call__` takes its result when the step's batch, stage and graph are the ones planned.
        Off after the first step only (that one traces the teacher) and with ``DETQ_TEACHER_THREAD=0``."""
        if self._last_once is None or not _spare_cores_for(self.teacher):
            return
        _, names, reads_head = self._plan(stage)
        if not names and not reads_head:
            return
        self._drop_pending()
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="detq-teacher")
        key = (_batch_key(batch), tuple(names), reads_head, self._last_once)
        self._pending = (key, self._worker.submit(self._teacher_pass, batch, names, reads_head, self._last_once))

    def close(self) -> None:
        """End of training: no pass left running, the worker thread ended."""
        self._drop_pending()
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None

    def _drop_pending(self) -> None:
        """Wait for a prefetched pass nobody takes (its hooks sit on the teacher until it ends), ignoring it."""
        pending, self._pending = self._pending, None
        if pending is not None:
            wait([pending[1]])

    def __call__(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        # Before the curriculum's last stage only the started stages' features are distilled: the teacher
        # then stops after the last module those terms read, and no head is read (terms not yet active are
        # exactly the ones skipped, so the loss is the same as from a full teacher forward).
        groups, names, reads_head = self._plan(ctx.stage)
        if not names and not reads_head:
            self._drop_pending()
            self.last_terms = {}
            return {"distill": _zero_like_parameters(ctx.model)}
        once = all(len(ctx.recorded.outputs.get(n, ())) == 1 for n in names)
        key = (_batch_key(ctx.batch), tuple(names), reads_head, once)
        if self._pending is not None and self._pending[0] == key:
            future, self._pending = self._pending[1], None
            t_rec, t_head = future.result()
        else:
            self._drop_pending()
            t_rec, t_head = self._teacher_pass(ctx.batch, names, reads_head, once)
        self._last_once = once
        s_feats = [[f for n in group for f in _feature_maps(ctx.recorded.output(n))] for group in groups]
        t_feats = [[f for n in group for f in _feature_maps(t_rec.output(n))] for group in groups]
        s_head = assignment = None
        if reads_head:
            s_head = self.family.head_outputs(ctx.model, ctx.recorded, ctx.batch)
            targets = self.family.targets(ctx.model, ctx.recorded, ctx.batch)
            s_head, t_head, assignment = self.family.distillation_pair(s_head, t_head, targets)
        total, parts = self.loss(stage=ctx.stage, student_feats=s_feats, teacher_feats=t_feats,
                                 student_head=s_head, teacher_head=t_head, assignment=assignment)
        self.last_terms = parts
        ctx.logs.update({f"distill_{k}": v for k, v in parts.items()})
        return {"distill": total}


# ``DETQ_TEACHER_THREAD=0``: the teacher's forward always runs in the loss call, never ahead in a worker thread.
_TEACHER_THREAD = os.environ.get("DETQ_TEACHER_THREAD", "") in ("", "1")


def _spare_cores_for(teacher: Teacher) -> bool:
    """A CPU teacher can run beside the student: this process may use at least twice the intra-op threads torch
    runs with, and it is not one of several training processes (ranks) sharing the machine."""
    if not _TEACHER_THREAD:
        return False
    p = next(teacher.module.parameters(), None)
    if p is None or p.device.type != "cpu":
        return False
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        return False
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores >= 2 * torch.get_num_threads()


def _batch_key(batch: Any) -> int:
    """Which batch: its images tensor for a dict batch (RT-DETR's loss gets a new dict around the same images)."""
    return id(batch["img"]) if isinstance(batch, dict) and isinstance(batch.get("img"), torch.Tensor) else id(batch)


def _zero_like_parameters(model: nn.Module) -> torch.Tensor:
    """A 0-d zero on the model's device and dtype (a term that has nothing to add this step)."""
    p = next(model.parameters(), None)
    return p.new_zeros(()) if p is not None else torch.zeros(())


def _float32(x: Any) -> Any:
    return x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def _feature_maps(output: Any) -> list[torch.Tensor]:
    """The (N, C, ...) feature maps in a module's output (a tensor, or a tuple/list/dict of them)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        return [v for v in output.values() if isinstance(v, torch.Tensor) and v.dim() >= 3]
    if isinstance(output, (list, tuple)):
        return [v for v in output if isinstance(v, torch.Tensor) and v.dim() >= 3]
    return []


__all__ = ["LossTerm", "FunctionTerm", "StepContext", "DistillationTerm", "DisabledQuantizerAnchor"]
