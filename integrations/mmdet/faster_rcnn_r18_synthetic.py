# Faster R-CNN R18-FPN (float, two-stage) on the detq-hooks synthetic data, from random weights.
_base_ = ['mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py', './synthetic_coco.py']

model = dict(backbone=dict(depth=18, init_cfg=None), neck=dict(in_channels=[64, 128, 256, 512]),
             roi_head=dict(bbox_head=dict(num_classes={{_base_.synth_num_classes}})))
train_dataloader = {{_base_.synth_train_dataloader}}
val_dataloader = {{_base_.synth_val_dataloader}}
test_dataloader = {{_base_.synth_val_dataloader}}
val_evaluator = {{_base_.synth_val_evaluator}}
test_evaluator = {{_base_.synth_val_evaluator}}
train_cfg = dict(max_epochs=12, val_interval=12)
default_hooks = dict(checkpoint=dict(interval=1, max_keep_ckpts=2), logger=dict(interval=10))
