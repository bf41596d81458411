"""The recipe's ``ptq:`` section turned into block reconstruction (the one-call API is :func:`detq_hooks.ptq`).

The trainers run it through :meth:`QuantSession.run_ptq` (``mode: ptq`` recipes): calibration, then,
for ``ptq.method`` ``adaround``/``qdrop``/``taskq``, :func:`detq_hooks.reconstruction.reconstruct` over the detector
family's blocks — with TASKQ's head-wise units (each scale's box and class branch, :meth:`DetectorFamily.head_paths`)
and detection-aware task regularisation on the head block when the recipe turns them on.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch import nn

from .detectors import DetectorFamily, family_for


def reconstruction_blocks(model: nn.Module, family: DetectorFamily, headwise: bool) -> list[str]:
    """The family's blocks in data-flow order; ``headwise``: a block holding the head's paths is replaced by
    those paths (scale × box/class branch), each its own reconstruction unit (STAHQ)."""
    blocks = list(family.reconstruction_blocks(model))
    paths = family.head_paths(model) if headwise else []
    if not paths:
        return blocks
    out = []
    for block in blocks:
        inside = [p for p in paths if p.startswith(block + ".")]
        out.extend(inside or [block])
    return out


def detection_task_loss(model: nn.Module, family: DetectorFamily, *, weight: float = 1.0, kl_weight: float = 0.0):
    """TASKQ's detection-aware task regularisation as an extra reconstruction loss of the family's head block:
    ``weight·Σ c·(1 − IoU(b_q, b_f)) / Σ c`` over the anchors/queries, boxes decoded from the quantized and the
    float head at the same anchor by the family's own decoder (:meth:`DetectorFamily.decode_head_output`), ``c``
    the float model's confidence (no labels needed), plus ``kl_weight`` × the confidence-weighted KL divergence of
    the class scores (per-class Bernoulli for sigmoid scores). ``weight`` is relative to the block's squared-error
    loss at its first step. Other blocks get nothing (``None``)."""
    from .distill import elementwise_iou

    head = family.head_block(model)
    if head is None:
        from .detectors import UnsupportedDetectorError

        raise UnsupportedDetectorError(f"`ptq.dtr` needs the head of {type(model).__name__}: family {family.name!r} "
                                       "names no head block (DetectorFamily.head_block / decode_head_output); set "
                                       "`ptq.dtr: false`")

    scale: dict[str, float] = {}

    def loss(block: str, quant_output: Any, float_output: Any, reconstruction: torch.Tensor) -> Optional[torch.Tensor]:
        if block != head:
            return None
        qb, qs = family.decode_head_output(model, quant_output)
        with torch.no_grad():
            fb, fs = family.decode_head_output(model, float_output)
            conf = fs.float().amax(-1)
            conf = conf / conf.sum(-1, keepdim=True).clamp_min(1e-12)  # per image
        term = ((1.0 - elementwise_iou(qb.float(), fb.float())) * conf).sum(-1).mean()
        if kl_weight > 0:
            p, q = fs.float().clamp(1e-6, 1 - 1e-6), qs.float().clamp(1e-6, 1 - 1e-6)
            kl = (p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()).sum(-1)
            term = term + kl_weight * (kl * conf).sum(-1).mean()
        # λ is relative: 1 makes the term as large as the block's squared-error loss at the first step (the two
        # live on unrelated scales: pixels² summed over the head's outputs vs a confidence-weighted 1 − IoU).
        if block not in scale and float(term) > 0:
            scale[block] = float(reconstruction.detach()) / float(term.detach())
        return weight * scale.get(block, 1.0) * term

    return loss


def uses_dtr(model: nn.Module, family: DetectorFamily, section) -> bool:
    """Whether detection-aware task regularisation runs: asked for explicitly (an error later if the family has
    no head decoder), or on by default for ``taskq`` where the family names a head block (else skipped, warned)."""
    if not section.part("dtr"):
        return False
    if section.dtr is None and family.head_block(model) is None:
        warnings.warn(f"ptq: the {family.name!r} detector family names no head block (DetectorFamily.head_block / "
                      "decode_head_output); TASKQ runs without detection-aware task regularisation", stacklevel=2)
        return False
    return True


def reconstruction_blocks_for(model: nn.Module, family: DetectorFamily, section, dtr: Optional[bool] = None) -> list[str]:
    """Blocks of a recipe's ``ptq`` section: head-wise paths if on, and the head block once more at the end
    when detection-aware task regularisation is on but the head was split into paths (DTR reads the whole
    head's decoded boxes; its layers' rounding is already learned, so that pass mostly tunes step sizes)."""
    blocks = reconstruction_blocks(model, family, section.part("headwise"))
    dtr = uses_dtr(model, family, section) if dtr is None else dtr
    head = family.head_block(model) if dtr else None
    if head is not None and head not in blocks:
        blocks.append(head)
    return blocks


def reconstruction_config(section):
    """The :class:`~detq_hooks.reconstruction.ReconstructionConfig` of a recipe's ``ptq`` section."""
    from .reconstruction import ReconstructionConfig

    return ReconstructionConfig(iterations=section.iterations, batch_size=section.batch_size, lr=section.lr,
                                scale_lr=section.scale_lr, round_weight=section.round_weight, warmup=section.warmup,
                                qdrop_prob=section.mixing_probability(), seed=section.seed)


def reconstruct_from_recipe(model: nn.Module, float_model: nn.Module, batches: list, forward_fn, section,
                            family: Optional[DetectorFamily] = None, *, progress: bool = False):
    """Block reconstruction of a calibrated ``model`` as the recipe's ``ptq`` section says (see module docs)."""
    from .reconstruction import reconstruct

    family = family or family_for(model)
    dtr = uses_dtr(model, family, section)
    blocks = reconstruction_blocks_for(model, family, section, dtr)
    extra = None
    if dtr:
        extra = detection_task_loss(model, family, weight=section.dtr_weight, kl_weight=section.kl_weight)
    return reconstruct(model, float_model, batches, forward_fn, blocks=blocks, config=reconstruction_config(section),
                       family=family, progress=progress, **({"extra_loss": extra} if extra is not None else {}))


__all__ = ["reconstruct_from_recipe", "detection_task_loss", "reconstruction_blocks_for", "reconstruction_blocks", "reconstruction_config"]
