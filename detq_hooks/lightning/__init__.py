"""Lightning adapter: one callback quantizes any LightningModule's detector (QAT, PTQ, CR-QAT).

    from detq_hooks.lightning import DetQCallback
    trainer = Trainer(callbacks=[DetQCallback(recipe="w4a8")])      # or "w8a8-ptq", "w4a8-crqat", a YAML path

Life cycle: each Lightning event becomes a :class:`~detq_hooks.session.QuantSession` call.

* ``setup`` (or right after ``configure_model``) → ``session.convert(target)``: teacher copied, layers
  swapped, stages and loss terms from the detector family; before restore, DDP and the optimizers.
* module ``on_load_checkpoint`` (wrapped; before Lightning copies the weights) → the checkpoint's saved
  plan rebuilds a freshly converted module (``session.restore``), then ``session.verify`` and
  ``session.load_state`` (curriculum stage, teacher); a mismatch is a ``CheckpointMismatchError``.
* ``on_fit_start`` → ``session.attach_optimizer`` (quantizer group) + LR schedulers extended; EMA guarded.
* ``on_sanity_check_start`` / ``on_train_start`` → ``session.calibrate`` on train batches (RNG forked);
  then ``session.start_training``. PTQ recipes: ``session.run_ptq``, then the fit stops (no optimizer step).
* ``on_validation_start`` / ``on_test_start`` / ``on_predict_start`` (PTQ recipes) → ``session.run_ptq``.
* ``on_train_batch_start`` → ``session.before_step(progress)`` (curriculum stage).
* ``training_step`` (wrapped, inside the DDP forward; ``manual_backward`` for manual optimization) →
  ``session.loss_terms(model, (images, targets), out)`` added to the loss, logged as ``detq/<name>``.
* ``on_train_batch_end`` → ``session.after_optimizer_step(model, averaged=[EMA/SWA copies])``; figures logged.
* ``on_save_checkpoint`` → ``checkpoint["detq"] = session.state(model, target=...)``.
* ``on_train_end`` / ``teardown`` → ``session.end_training``; wrappers removed, the module stays quantized.

Outside the Trainer, :func:`load_quantized_checkpoint` rebuilds a module from such a checkpoint.
"""

from ..checkpoint import CheckpointMismatchError
from ..session import quantization_figures
from .callback import DetQCallback
from .loading import load_quantized_checkpoint

__all__ = ["DetQCallback", "load_quantized_checkpoint", "quantization_figures", "CheckpointMismatchError"]
