# DETR R18 (float) on the detq-hooks synthetic data, from random weights, with a slimmer transformer
# (3+3 layers, 128-d, 30 queries) so it trains on a CPU. nn.MultiheadAttention's out_proj is read by
# the attention kernel directly: DetQHook keeps it float and says so in its report.
_base_ = ['mmdet::detr/detr_r18_8xb2-500e_coco.py', './synthetic_coco.py']

embed_dims = 128
model = dict(
    num_queries=30,
    backbone=dict(init_cfg=None, frozen_stages=-1, norm_cfg=dict(type='BN', requires_grad=True), norm_eval=False),
    neck=dict(out_channels=embed_dims),
    encoder=dict(num_layers=3, layer_cfg=dict(self_attn_cfg=dict(embed_dims=embed_dims, num_heads=4),
                                              ffn_cfg=dict(embed_dims=embed_dims, feedforward_channels=512))),
    decoder=dict(num_layers=3, layer_cfg=dict(self_attn_cfg=dict(embed_dims=embed_dims, num_heads=4),
                                              cross_attn_cfg=dict(embed_dims=embed_dims, num_heads=4),
                                              ffn_cfg=dict(embed_dims=embed_dims, feedforward_channels=512))),
    positional_encoding=dict(num_feats=embed_dims // 2),
    bbox_head=dict(num_classes={{_base_.synth_num_classes}}, embed_dims=embed_dims),
    test_cfg=dict(max_per_img=30),  # at most one detection per query
)
train_dataloader = {{_base_.synth_train_dataloader}}
val_dataloader = {{_base_.synth_val_dataloader}}
test_dataloader = {{_base_.synth_val_dataloader}}
val_evaluator = {{_base_.synth_val_evaluator}}
test_evaluator = {{_base_.synth_val_evaluator}}
train_cfg = dict(max_epochs=50, val_interval=50)
param_scheduler = [dict(type='MultiStepLR', begin=0, end=50, by_epoch=True, milestones=[40], gamma=0.1)]
default_hooks = dict(checkpoint=dict(interval=1, max_keep_ckpts=2), logger=dict(interval=10))
