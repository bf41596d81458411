"""The README's "Your own detector": a LightningModule detq-hooks has never seen, with a small DetectorFamily,
trains W4A8 CR-QAT with every distillation term through DetQCallback (examples/own_detector.py)."""

import sys
from pathlib import Path

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import own_detector  # noqa: E402

from detq_hooks.detectors import UnsupportedDetectorError  # noqa: E402
from detq_hooks.lightning import DetQCallback  # noqa: E402


def test_own_family_gets_curriculum_and_every_distillation_term(tmp_path):
    terms = own_detector.main(steps=6, root=str(tmp_path))
    for k in ("distill_pkd_stage1", "distill_relational", "distill_logit", "distill_box"):
        assert terms[k] > 0, (k, terms)


def test_without_the_family_head_terms_are_refused_before_training(tmp_path):
    module = own_detector.LitPointDetector()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[DetQCallback(recipe="w4a8-crqat")])
    with pytest.raises(UnsupportedDetectorError, match=r"LitPointDetector .*DetectorFamily"):
        trainer.fit(module, own_detector.loader())
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
