# YOLOX-tiny (float) on the detq-hooks synthetic data, from random weights (nothing is downloaded).
_base_ = ['mmdet::yolox/yolox_tiny_8xb8-300e_coco.py', './synthetic_coco.py']

model = dict(
    # the COCO recipe's multi-scale batches (320-640 px) would dwarf the synthetic images: fixed size instead
    data_preprocessor=dict(batch_augments=None),
    bbox_head=dict(num_classes={{_base_.synth_num_classes}}),
)
train_dataloader = {{_base_.synth_train_dataloader}}
val_dataloader = {{_base_.synth_val_dataloader}}
test_dataloader = {{_base_.synth_val_dataloader}}
val_evaluator = {{_base_.synth_val_evaluator}}
test_evaluator = {{_base_.synth_val_evaluator}}

max_epochs = 12
base_lr = 0.01
train_cfg = dict(_delete_=True, type='EpochBasedTrainLoop', max_epochs=max_epochs, val_interval=max_epochs)
optim_wrapper = dict(optimizer=dict(lr=base_lr))
param_scheduler = [
    dict(type='LinearLR', start_factor=1.0e-3, by_epoch=False, begin=0, end=50),
    dict(type='CosineAnnealingLR', eta_min=base_lr * 0.05, begin=max_epochs // 2, end=max_epochs,
         T_max=max_epochs // 2, by_epoch=True, convert_to_iter_based=True),
]
default_hooks = dict(checkpoint=dict(interval=1, max_keep_ckpts=2, save_best='auto'), logger=dict(interval=10))
# The COCO recipe's mosaic->plain pipeline switch is moot (the synthetic pipeline is plain) and SyncNormHook only
# acts in distributed runs; its EMA is kept.
custom_hooks = [dict(type='EMAHook', ema_type='ExpMomentumEMA', momentum=0.0001, update_buffers=True, priority=49)]
auto_scale_lr = dict(enable=False, base_batch_size=8)
