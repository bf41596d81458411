"""MMEngine / MMDetection adapter: one hook in the config quantizes the model.

    custom_imports = dict(imports=["detq_hooks.mmengine"], allow_failed_imports=False)
    custom_hooks = [dict(type="DetQHook", recipe="w4a8")]

Life cycle (MMEngine builds the model, its DDP wrapper, the optimizer and the parameter schedulers before
any hook runs):

* ``before_run`` (priority ``VERY_HIGH``, so before ``EMAHook`` copies the model): swap the layers for
  fake-quant ones, put the new quantizer parameters into their own optimizer group (no weight decay,
  ``quantizer_lr_scale`` × base lr), rebuild the parameter schedulers from the config so they cover that
  group, and re-wrap the model in a fresh DDP wrapper so the quantizer parameters are all-reduced.
* ``after_load_checkpoint`` (called before the weights are copied into the model): a checkpoint written by
  a quantized run is verified against this run's recipe; resuming a float checkpoint into a quantized run is
  an error; ``load_from`` a float checkpoint is the normal "QAT from float weights" start.
* ``before_train``: calibrate on training batches unless the weights came with quantizer state.
* ``before_save_checkpoint``: the recipe and per-layer bits go to ``checkpoint["meta"]["detq"]``.

The adapter holds no algorithm: conversion, calibration and checkpoint checks are the core's.
"""

from __future__ import annotations

import re
from typing import Any, Optional, Sequence

import torch
from torch import nn

from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from .calibration import calibrate
from .checkpoint import CheckpointMismatchError, check_compatible, quantization_state
from .optim import add_quantizer_param_group
from .quantizers import iter_quantizers
from .recipe import load_recipe
from .surgery import is_quantized, quantize, quantized_layers

# Final prediction layers of MMDetection heads (kept at `prediction_layer_bits`).
_PREDICTION_LEAF = re.compile(
    r"(^|\.)(conv_cls|conv_reg|retina_cls|retina_reg|fc_cls|fc_reg|conv_centerness|conv_objectness|"
    r"rtm_cls\.\d+|rtm_reg\.\d+|rtm_obj\.\d+|multi_level_conv_cls\.\d+|multi_level_conv_reg\.\d+|"
    r"multi_level_conv_obj\.\d+|cls_branches\.\d+)$"
)
_PREDICTION_BRANCH = re.compile(r"(^|\.)(reg_branches\.\d+|cls_branches\.\d+)$")  # MLP branches: their last layer
_HEAD_ROOTS = ("bbox_head", "roi_head", "rpn_head")


def _history_buffer_reduce(self):
    # Plain data only (two arrays and an int): the default pickle of a HistoryBuffer also stores its
    # statistics methods through `builtins.getattr`, which a safe (weights_only) load must refuse.
    return (type(self), (self._log_history, self._count_history, self.max_length))


def _register_safe_checkpoint_globals() -> None:
    """Let ``torch.load``'s default ``weights_only=True`` (torch >= 2.6) read MMEngine checkpoints.

    MMEngine calls ``torch.load`` without ``weights_only``; its checkpoints carry a message hub with
    ``HistoryBuffer`` objects and numpy arrays. Instead of turning the safe loader off (or asking users
    for an environment variable), ``HistoryBuffer`` is made to pickle as plain data and the few classes
    involved are allow-listed. Checkpoints written before this import still need a trusted
    ``weights_only=False`` load.
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


_register_safe_checkpoint_globals()


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if is_model_wrapper(model) else model


def mmdet_prediction_layers(model: nn.Module) -> list[str]:
    """Names of the final classification/regression layers of an MMDetection model's heads."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    in_head = [n for n in names if n.split(".")[0] in _HEAD_ROOTS]
    chosen = [n for n in in_head if _PREDICTION_LEAF.search(n)]
    branches: dict[str, str] = {}
    for n in in_head:
        parts = n.split(".")
        for i in range(len(parts), 0, -1):
            root = ".".join(parts[:i])
            if _PREDICTION_BRANCH.search(root) and root != n:
                branches[root] = n  # modules come in order: the last one wins
                break
    return sorted(set(chosen) | set(branches.values()), key=names.index)


def mmdet_forward(model: nn.Module, batch: Any) -> Any:
    """Run one dataloader batch through an MMEngine model the way its test step does (raw head outputs)."""
    data = model.data_preprocessor(batch, False)
    if isinstance(data, dict):
        return model(**data, mode="tensor")
    return model(*data, mode="tensor")


@HOOKS.register_module()
class DetQHook(Hook):
    """Quantize an MMEngine model (QAT or PTQ) from a detq-hooks recipe.

    Args:
        recipe: preset name (``w8a8``, ``w4a8``, ``w4a4``, ...), recipe YAML path or dict.
        calibrate: calibrate activation ranges on training batches before the first iteration
            (skipped when the loaded weights already carry quantizer state).
        calibration_batches: overrides ``calibration.num_batches`` of the recipe.
        prediction_layers: names of the final prediction layers (default: found in ``bbox_head``).
        first_layers: names of the layers that see the image (default: the first layer).
        log_interval: every how many iterations quantizer figures go to the message hub (0: never).

    Example:
        >>> custom_hooks = [dict(type="DetQHook", recipe="w4a8")]  # in an MMDetection config
    """

    priority = "VERY_HIGH"

    def __init__(
        self,
        recipe: Any = "w8a8",
        calibrate: bool = True,
        calibration_batches: Optional[int] = None,
        prediction_layers: Optional[Sequence[str]] = None,
        first_layers: Optional[Sequence[str]] = None,
        log_interval: int = 50,
    ) -> None:
        self.recipe = load_recipe(recipe)  # validated now: a bad config fails before the runner starts
        if not isinstance(calibrate, bool):
            raise TypeError(f"DetQHook: `calibrate` = {calibrate!r} must be True or False")
        if calibration_batches is not None and (not isinstance(calibration_batches, int) or calibration_batches < 1):
            raise ValueError(f"DetQHook: `calibration_batches` = {calibration_batches!r} must be a positive integer")
        if not isinstance(log_interval, int) or log_interval < 0:
            raise ValueError(f"DetQHook: `log_interval` = {log_interval!r} must be an integer >= 0")
        self.calibrate = calibrate
        self.calibration_batches = calibration_batches
        self.prediction_layers = list(prediction_layers) if prediction_layers is not None else None
        self.first_layers = list(first_layers) if first_layers is not None else None
        self.log_interval = log_interval
        self._converted_model: Optional[nn.Module] = None
        self._weights_have_quantizer_state = False

    # ------------------------------------------------------------------ conversion
    def before_run(self, runner) -> None:
        model = unwrap(runner.model)
        if model is self._converted_model:
            return  # the same runner running again (e.g. test after train)
        if is_quantized(model):
            raise RuntimeError(
                "DetQHook: the model is already quantized; is DetQHook listed twice in `custom_hooks`?"
            )
        preds = self.prediction_layers if self.prediction_layers is not None else (mmdet_prediction_layers(model) or None)
        quantize(model, self.recipe, prediction_layers=preds, first_layers=self.first_layers)
        self._converted_model = model
        n_layers = len(quantized_layers(model))
        runner.logger.info(f"DetQHook: {n_layers} layers quantized with recipe {self.recipe.name!r}; prediction layers {preds}")
        self._attach_to_optimizer(runner, model)
        if is_model_wrapper(runner.model):
            # The old DDP wrapper registered only the float parameters: wrap again so the quantizer
            # parameters are all-reduced as well.
            runner.model = runner.wrap_model(runner.cfg.get("model_wrapper_cfg"), model)

    def _attach_to_optimizer(self, runner, model: nn.Module) -> None:
        from mmengine.optim import OptimWrapper, OptimWrapperDict

        wrapper = getattr(runner, "optim_wrapper", None)
        if not isinstance(wrapper, OptimWrapper):
            return  # validation/test run, or optimizer not built (no training)
        if isinstance(wrapper, OptimWrapperDict):
            raise NotImplementedError("DetQHook: models with several optimizers (OptimWrapperDict) are not supported yet")
        n = add_quantizer_param_group(wrapper.optimizer, model, self.recipe.quantization.quantizer_lr_scale)
        runner.logger.info(f"DetQHook: {n} quantizer parameters in their own optimizer group (no weight decay)")
        if runner.param_schedulers is not None and runner.cfg.get("param_scheduler") is not None:
            # Schedulers remember each group's base value when built: build them again to cover the new group.
            runner.param_schedulers = runner.build_param_scheduler(runner.cfg.get("param_scheduler"))

    # ------------------------------------------------------------------ checkpoints
    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        model = unwrap(runner.model)
        state_dict = checkpoint.get("state_dict", checkpoint)
        saved = (checkpoint.get("meta") or {}).get("detq")
        has_quantizer_state = any(".weight_quantizer." in k or ".input_quantizer." in k for k in state_dict)
        source = str(getattr(runner, "_load_from", None) or "checkpoint")
        if not has_quantizer_state and saved is None and not runner._resume:
            # `load_from` a float model: the usual start of QAT. Ranges are calibrated in before_train.
            self._weights_have_quantizer_state = False
            return
        if not has_quantizer_state and runner._resume:
            raise CheckpointMismatchError(
                f"DetQHook: cannot resume from {source}: it was written by a float run (no quantizer state). "
                "Use `load_from` (without `resume`) to start QAT from float weights."
            )
        check_compatible(model, state_dict, saved, source=source)
        self._weights_have_quantizer_state = True

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        checkpoint.setdefault("meta", {})["detq"] = quantization_state(unwrap(runner.model))

    # ------------------------------------------------------------------ training
    def before_train(self, runner) -> None:
        if not self.calibrate or self._weights_have_quantizer_state:
            return
        model = unwrap(runner.model)
        num = self.calibration_batches or self.recipe.calibration.num_batches
        result = calibrate(model, runner.train_dataloader, forward_fn=mmdet_forward, num_batches=num)
        runner.logger.info(f"DetQHook: calibrated {len(result.ranges)} activation ranges on {result.num_batches} batches ({result.method})")
        # EMAHook copied the model in its before_run, before calibration: without this its copy keeps the
        # uncalibrated ranges, which a small EMA momentum would take thousands of steps to forget.
        for hook in runner.hooks:
            ema = getattr(hook, "ema_model", None)
            if isinstance(ema, nn.Module) and hasattr(ema, "module"):
                ema.module.load_state_dict(model.state_dict())

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if self.log_interval and self.every_n_train_iters(runner, self.log_interval):
            scales = [q.scale.detach().float().mean() for _, q in iter_quantizers(unwrap(runner.model)) if q.role == "activation"]
            if scales:
                runner.message_hub.update_scalar("train/detq_act_scale_mean", float(torch.stack(scales).mean()))


__all__ = ["DetQHook", "mmdet_prediction_layers", "mmdet_forward"]
