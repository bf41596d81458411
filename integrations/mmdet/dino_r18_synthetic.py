# DINO (4-scale, R18) (float) on the detq-hooks synthetic data, from random weights, slim so it runs on a CPU
# (2 encoder + 3 decoder layers, 30 queries, 20 denoising queries). Its deformable attention runs mmcv's PyTorch
# fallback on CPU. The head is a DETR head with one classifier per decoder layer (`cls_branches`) and sigmoid
# scores: the detq MMDetection family reads its last decoder layer's matching queries (the denoising ones left
# out) for distillation, the critical objective and Fisher.
_base_ = ['mmdet::dino/dino-4scale_r50_8xb2-12e_coco.py', './synthetic_coco.py']

model = dict(
    num_queries=30,
    backbone=dict(depth=18, init_cfg=None, frozen_stages=-1, norm_cfg=dict(type='BN', requires_grad=True),
                  norm_eval=False),
    neck=dict(in_channels=[128, 256, 512]),
    encoder=dict(num_layers=2),
    decoder=dict(num_layers=3),
    bbox_head=dict(num_classes={{_base_.synth_num_classes}}),
    dn_cfg=dict(group_cfg=dict(num_dn_queries=20)),
    test_cfg=dict(max_per_img=30),
)
train_dataloader = {{_base_.synth_train_dataloader}}
val_dataloader = {{_base_.synth_val_dataloader}}
test_dataloader = {{_base_.synth_val_dataloader}}
val_evaluator = {{_base_.synth_val_evaluator}}
test_evaluator = {{_base_.synth_val_evaluator}}
# From random weights the backbone learns at the full rate (the COCO recipe's 0.1 assumes ImageNet weights).
optim_wrapper = dict(paramwise_cfg=dict(custom_keys={'backbone': dict(lr_mult=1.0)}))
default_hooks = dict(checkpoint=dict(interval=1, max_keep_ckpts=2), logger=dict(interval=10))
