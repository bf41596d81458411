"""Curriculum QAT (CR-QAT's CQAT): quantize and train the model stage by stage along its data flow.

During stage k, stages 1..k are quantized and trained; stages k+1..K stay full precision and frozen, which
isolates the quantization error of the early stages from the not-yet-adapted later ones. The adapters give
the stages (:class:`Stage`: module-name prefixes in data-flow order) and call the schedule from their
trainer's loop: :meth:`CurriculumSchedule.update` with the training progress before a step, and
:meth:`CurriculumSchedule.after_optimizer_step` after the optimizer stepped.

Freezing is done without touching ``requires_grad`` (DDP registers the parameters that need gradients once,
when it wraps the model; toggling the flag later makes it hang or silently skip the all-reduce of a stage
that is unfrozen later). Instead the gradients of frozen parameters are zeroed as they are produced, the
parameters and BatchNorm statistics are restored after every optimizer step (weight decay and momentum
would otherwise still move them), and frozen BatchNorm layers run in eval mode.
"""

from __future__ import annotations

import fnmatch
import re
import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn

from .recipe import CurriculumSection, RecipeError
from .surgery import quantized_layers


@dataclass
class Stage:
    """A stage of the model: the modules whose names start with one of ``prefixes`` (or match a glob /
    ``re:`` regex), and the modules whose outputs are the stage's features for feature distillation."""

    name: str
    prefixes: list[str]
    outputs: list[str] = field(default_factory=list)

    def contains(self, module_name: str) -> bool:
        for p in self.prefixes:
            if p.startswith("re:"):
                if re.match(p[3:], module_name):
                    return True
            elif any(ch in p for ch in "*?["):
                if fnmatch.fnmatchcase(module_name, p):
                    return True
            elif module_name == p or module_name.startswith(p + "."):
                return True
        return False


def stages_from_recipe(section: CurriculumSection) -> Optional[list[Stage]]:
    if section.stages is None:
        return None
    return [Stage(s.name, list(s.modules), list(s.outputs or [])) for s in section.stages]


def assign_parameters(model: nn.Module, stages: Sequence[Stage]) -> dict[str, int]:
    """Map every parameter name to its stage index (the first stage that contains its module).

    Raises:
        RecipeError: a stage matches nothing, or a parameter belongs to no stage.
    """
    owner: dict[str, int] = {}
    hits = [0] * len(stages)
    for name, _ in model.named_parameters():
        module_name = name.rsplit(".", 1)[0] if "." in name else ""
        for i, st in enumerate(stages):
            if st.contains(module_name):
                owner[name] = i
                hits[i] += 1
                break
    for i, n in enumerate(hits):
        if n == 0:
            raise RecipeError(f"curriculum stage {stages[i].name!r} ({stages[i].prefixes}) matches no parameter of the model")
    orphans = [n for n, _ in model.named_parameters() if n not in owner]
    if orphans:
        raise RecipeError(
            f"{len(orphans)} parameters belong to no curriculum stage, e.g. {orphans[:4]}; "
            "extend `curriculum.stages` so that every module is in one stage"
        )
    return owner


class CurriculumSchedule:
    """Which stage is trained at a given point of the QAT budget, and the freezing that goes with it.

    Args:
        stages: the model's stages in data-flow order (at least 2).
        boundaries: fractions of the budget at which stages 2..K start (``len == K - 1``).

    Example:
        >>> sched = CurriculumSchedule([Stage("backbone", ["backbone"]), Stage("head", ["neck", "head"])], [1 / 3])
        >>> sched.stage_at(0.2), sched.stage_at(0.5)
        (0, 1)
    """

    def __init__(self, stages: Sequence[Stage], boundaries: Sequence[float]) -> None:
        if len(stages) < 2:
            raise RecipeError(f"a curriculum needs at least 2 stages, got {[s.name for s in stages]}")
        if len(boundaries) != len(stages) - 1:
            raise RecipeError(f"{len(stages)} stages need {len(stages) - 1} boundaries, got {list(boundaries)}")
        self.stages = list(stages)
        self.boundaries = [float(b) for b in boundaries]
        self.current = -1  # no stage applied yet
        self._param_stage: dict[str, int] = {}
        self._frozen_snapshot: dict[str, torch.Tensor] = {}
        self._hooks: list = []
        self._frozen_ids: set[int] = set()

    @classmethod
    def from_recipe(cls, section: CurriculumSection, default_stages: Sequence[Stage]) -> "CurriculumSchedule":
        stages = stages_from_recipe(section) or list(default_stages)
        return cls(stages, section.boundaries_for(len(stages)))

    # ------------------------------------------------------------------ schedule
    def stage_at(self, progress: float) -> int:
        """0-based stage index for a progress fraction in [0, 1]."""
        return sum(1 for b in self.boundaries if progress >= b)

    def stage_name(self, index: Optional[int] = None) -> str:
        return self.stages[self.current if index is None else index].name

    def layer_stage(self, layer_name: str) -> Optional[int]:
        for i, st in enumerate(self.stages):
            if st.contains(layer_name):
                return i
        return None

    # ------------------------------------------------------------------ applying
    def update(self, model: nn.Module, progress: float) -> bool:
        """Apply the stage for ``progress`` (idempotent). Returns True when the stage changed."""
        k = self.stage_at(progress)
        if k == self.current and self._hooks:
            return False
        self.apply(model, k)
        return True

    def apply(self, model: nn.Module, k: int) -> None:
        """Quantize and train stages 0..k; keep stages k+1.. float and frozen."""
        if not self._param_stage:
            self._param_stage = assign_parameters(model, self.stages)
        self.remove_hooks()
        self.current = k
        for name, layer in quantized_layers(model):
            idx = self.layer_stage(name)
            on = idx is not None and idx <= k
            layer.weight_quantizer.enabled = on
            if layer.input_quantizer is not None:
                layer.input_quantizer.enabled = on
        frozen = {n for n, i in self._param_stage.items() if i > k}
        params = dict(model.named_parameters())
        self._frozen_ids = {id(params[n]) for n in frozen}
        self._frozen_snapshot = {n: params[n].detach().clone() for n in frozen}
        for n in frozen:
            if params[n].requires_grad:  # parameters the host keeps fixed (e.g. DFL's conv) take no gradient hook
                self._hooks.append(params[n].register_hook(torch.zeros_like))
        for mname, m in model.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and (self._module_stage(mname) or 0) > k:
                for bname, buf in m.named_buffers(recurse=False):
                    self._frozen_snapshot[f"{mname}.{bname}"] = buf.detach().clone()
                self._hooks.append(m.register_forward_pre_hook(_force_eval))
        # A placeholder so that `update` knows the stage was applied even when nothing is frozen.
        self._hooks.append(_NullHandle())

    def _module_stage(self, module_name: str) -> Optional[int]:
        return self.layer_stage(module_name)

    @torch.no_grad()
    def after_optimizer_step(self, model: nn.Module) -> None:
        """Undo whatever the optimizer did to frozen parameters (weight decay, momentum) and BN statistics."""
        if not self._frozen_snapshot:
            return
        state = dict(model.named_parameters())
        state.update(dict(model.named_buffers()))
        for name, saved in self._frozen_snapshot.items():
            state[name].copy_(saved)

    def is_frozen(self, param: torch.Tensor) -> bool:
        return id(param) in self._frozen_ids

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict:
        # The prefixes are saved too: a stage's name says nothing of which layers it holds, and a resumed run
        # must freeze and quantize the same layers as the run that wrote the checkpoint.
        return {"current": self.current, "stages": [s.name for s in self.stages], "boundaries": list(self.boundaries),
                "prefixes": [list(s.prefixes) for s in self.stages], "outputs": [list(s.outputs) for s in self.stages]}

    def load_state_dict(self, state: dict, model: Optional[nn.Module] = None, *, check: bool = True) -> None:
        """Resume the saved stage (after :meth:`check_state`, unless the caller ran it: ``check=False``)."""
        if check:
            self.check_state(state, model)
        current = int(state.get("current", -1))
        if model is not None and current >= 0:
            self.apply(model, current)
        else:
            self.current = current

    def check_state(self, state: dict, model: Optional[nn.Module] = None) -> None:
        """Raises :class:`RecipeError` when the checkpoint's curriculum differs from this run's: other stage
        names or boundaries, or the same names holding other parameters (a recipe whose ``curriculum.stages``
        changed, or a detector family whose default stages changed between versions). Changes nothing."""
        names = [s.name for s in self.stages]
        if state.get("stages") != names or [float(b) for b in state.get("boundaries", [])] != self.boundaries:
            raise RecipeError(
                f"the checkpoint's curriculum (stages {state.get('stages')}, boundaries {state.get('boundaries')}) "
                f"differs from this run's (stages {names}, boundaries {self.boundaries})"
            )
        current = int(state.get("current", -1))
        if state.get("prefixes") is not None:
            self._check_same_assignment(state["prefixes"], state.get("outputs"), model)
        elif 0 <= current < len(self.stages) - 1:
            warnings.warn(
                f"the checkpoint's curriculum state (stage {current + 1}/{len(self.stages)}, "
                f"{self.stages[current].name!r}) does not record which layers each stage holds (written before "
                "detq-hooks saved it); resuming with this run's stages, which may freeze other layers than the run "
                "that wrote it",
                stacklevel=3,
            )

    def _check_same_assignment(self, saved_prefixes: Sequence[Sequence[str]],
                               saved_outputs: Optional[Sequence[Sequence[str]]], model: Optional[nn.Module]) -> None:
        saved = [Stage(s.name, list(p)) for s, p in zip(self.stages, saved_prefixes)]
        if model is None:  # nothing to compare the assignments on: the prefixes themselves must agree
            if [list(p) for p in saved_prefixes] == [list(s.prefixes) for s in self.stages]:
                return
            moved = [f"{s.name}: {p} in the checkpoint, {s.prefixes} now" for s, p in zip(self.stages, saved_prefixes)
                     if list(p) != list(s.prefixes)]
        else:
            # Different prefixes that select the same parameters are the same curriculum.
            try:
                theirs = assign_parameters(model, saved)
            except RecipeError as err:
                raise RecipeError(f"the checkpoint's curriculum stages do not fit this model: {err}") from None
            ours = self._param_stage or assign_parameters(model, self.stages)
            if theirs == ours:
                return
            moved = [f"{n} ({self.stages[theirs[n]].name} in the checkpoint, {self.stages[ours[n]].name} now)"
                     for n in ours if theirs.get(n) != ours[n]]
        recipe = [{"name": s.name, "modules": list(p)} for s, p in zip(self.stages, saved_prefixes)]
        for spec, outputs in zip(recipe, saved_outputs or []):
            if outputs:
                spec["outputs"] = list(outputs)
        raise RecipeError(
            f"the checkpoint's curriculum stages hold other layers than this run's ({len(moved)} differ, e.g. "
            f"{moved[:3]}); to resume the run as it was, give its stages in the recipe: "
            f"curriculum.stages = {recipe}"
        )


def _force_eval(module: nn.Module, args) -> None:
    # Frozen stages keep their BatchNorm running statistics: the trainer's model.train() is undone per call.
    module.training = False


class _NullHandle:
    def remove(self) -> None:
        pass


__all__ = ["Stage", "CurriculumSchedule", "assign_parameters", "stages_from_recipe"]
