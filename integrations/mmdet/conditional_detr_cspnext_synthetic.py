# Conditional DETR (float) on the detq-hooks synthetic data: a DETR head with sigmoid focal classification.
# - Its head is a DETR head (`fc_cls`, no priors): the detq MMDetection family, the Fisher estimate and the
#   critical objective read it as such (sigmoid scores, Hungarian positives); `tests/test_fisher_trainers.py`
#   runs the Fisher recipe on it.
# - Backbone: CSPNeXt-tiny (RTMDet-tiny's), its stride-32 output only. DETRs start from a pretrained backbone;
#   with no downloads here, `benchmarks/bench_fisher_mmdet.py` initialises it from RTMDet-tiny trained on the
#   same data (set `model.backbone.init_cfg` to your own checkpoint the same way). Random weights otherwise.
#   Measured here: even so, 50 epochs at 160 px reach only mAP50-95 0.002 (README, "Fisher-aware QAT").
# - Slim transformer: 3 encoder + 3 decoder layers, 30 queries; 256-d because MMDetection's Conditional DETR
#   decoder hard-codes a 256-d sine embedding of the reference points.
_base_ = ['mmdet::conditional_detr/conditional-detr_r50_8xb2-50e_coco.py', './synthetic_coco.py']

model = dict(
    num_queries=30,
    backbone=dict(_delete_=True, type='CSPNeXt', arch='P5', expand_ratio=0.5, deepen_factor=0.167, widen_factor=0.375,
                  channel_attention=True, out_indices=(4, ), norm_cfg=dict(type='BN'),
                  act_cfg=dict(type='SiLU', inplace=True), init_cfg=None),
    neck=dict(in_channels=[384]),
    encoder=dict(num_layers=3, layer_cfg=dict(ffn_cfg=dict(feedforward_channels=512))),
    decoder=dict(num_layers=3, layer_cfg=dict(ffn_cfg=dict(feedforward_channels=512))),
    bbox_head=dict(num_classes={{_base_.synth_num_classes}}),
    test_cfg=dict(max_per_img=30),
)
train_dataloader = {{_base_.synth_train_dataloader}}
val_dataloader = {{_base_.synth_val_dataloader}}
test_dataloader = {{_base_.synth_val_dataloader}}
val_evaluator = {{_base_.synth_val_evaluator}}
test_evaluator = {{_base_.synth_val_evaluator}}
# The COCO recipe's backbone lr x 0.1 assumes ImageNet weights; here the backbone saw only this data.
optim_wrapper = dict(optimizer=dict(lr=2e-4), paramwise_cfg=dict(custom_keys={'backbone': dict(lr_mult=0.5)}))
train_cfg = dict(max_epochs=50, val_interval=50)
param_scheduler = [dict(type='MultiStepLR', begin=0, end=50, by_epoch=True, milestones=[40], gamma=0.1)]
default_hooks = dict(checkpoint=dict(interval=1, max_keep_ckpts=2), logger=dict(interval=10))
