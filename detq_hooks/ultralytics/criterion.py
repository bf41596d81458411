"""The loss-term seam in Ultralytics: the model's criterion is wrapped, so the session's terms are computed
inside the model's (DDP-wrapped) forward and join the loss vector the trainer's own loop, AMP and logging
already handle. Each logged term is a loss item (``d_pkd_stage1``, ``d_relational``, ``d_logit``, ``d_box``)."""

from __future__ import annotations

import torch
from torch import nn

from ..session import QuantSession


class DetQCriterion:
    """The student's Ultralytics criterion plus the session's loss terms (a constant set of item keys)."""

    def __init__(self, base, model: nn.Module, session: QuantSession) -> None:
        self.base, self.model, self.session = base, model, session
        self.images = None  # the training batch's images, set by the trainer's preprocess_batch
        self.item_names = [_item_name(n) for n in session.log_names()]

    def __getattr__(self, name):  # update(), hyp, ... of the wrapped criterion
        if name in ("base", "__setstate__", "__getstate__"):
            raise AttributeError(name)
        return getattr(self.base, name)

    def __deepcopy__(self, memo):  # EMA copies of the model keep no training-time criterion
        return None

    def __call__(self, preds, batch, **kwargs):
        out = self.base(preds, batch, **kwargs)
        if "img" not in batch and self.images is not None:
            # RT-DETR's loss passes its targets (cls, bboxes, batch_idx, gt_groups) without the images the
            # teacher needs: the images of the batch the trainer preprocessed for this forward
            if len(batch.get("gt_groups", ())) != self.images.shape[0]:
                raise RuntimeError("detq: the images stored for this loss call do not belong to its batch")
            batch = {**batch, "img": self.images}
        terms = self.session.loss_terms(self.model, batch, preds, task_loss=_task_loss(out, batch))
        if isinstance(out, dict):  # RT-DETR: a dict of losses (the model sums its values), called with dn_* kwargs
            return {**out, **{f"detq_{name.lstrip('_')}": t.float().reshape(()) for name, t in terms.items()}}
        loss, items = out
        if not terms:
            return loss, items
        total = torch.stack([t.float().reshape(()) for t in terms.values()]).sum()
        # Ultralytics sums the loss vector after multiplying each entry by the batch size.
        loss = torch.cat([loss.reshape(-1), (total * batch["img"].shape[0]).reshape(1).to(loss.dtype)])
        items = dict(items)
        logged = self.session.last_terms
        for name in self.session.log_names():
            items[_item_name(name)] = torch.tensor(logged.get(name, 0.0), device=loss.device)
        return loss, items


def _task_loss(out, batch) -> torch.Tensor:
    """The criterion's loss in the units detq's terms are added in: RT-DETR's dict is summed as it is; the loss
    vector of the other models is already multiplied by the batch size, and so are the terms below."""
    if isinstance(out, dict):
        return sum(v.detach().float().sum() for v in out.values() if isinstance(v, torch.Tensor))
    return out[0].detach().float().sum() / max(int(batch["img"].shape[0]), 1)


def _item_name(name: str) -> str:
    return "d_" + name[len("distill_"):] if name.startswith("distill_") else name


__all__ = ["DetQCriterion"]
