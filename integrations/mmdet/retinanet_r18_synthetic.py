# RetinaNet R18-FPN (float) on the detq-hooks synthetic data, from random weights.
_base_ = ['mmdet::retinanet/retinanet_r18_fpn_1x_coco.py', './synthetic_coco.py']

model = dict(backbone=dict(init_cfg=None), bbox_head=dict(num_classes={{_base_.synth_num_classes}}))
train_dataloader = {{_base_.synth_train_dataloader}}
val_dataloader = {{_base_.synth_val_dataloader}}
test_dataloader = {{_base_.synth_val_dataloader}}
val_evaluator = {{_base_.synth_val_evaluator}}
test_evaluator = {{_base_.synth_val_evaluator}}
train_cfg = dict(max_epochs=12, val_interval=12)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=50),
    dict(type='MultiStepLR', begin=0, end=12, by_epoch=True, milestones=[8, 11], gamma=0.1),
]
default_hooks = dict(checkpoint=dict(interval=1, max_keep_ckpts=2), logger=dict(interval=10))
