# DINO (4-scale, slim) with a CSPNeXt-tiny backbone (float) on the detq-hooks synthetic data: the DETR-family
# model of the MMDetection Fisher benchmark (`benchmarks/bench_fisher_mmdet.py --config dino_cspnext_synthetic`).
# - The slim transformer of `dino_r18_synthetic.py` (2 encoder + 3 decoder layers, 30 queries, 20 denoising
#   queries; deformable attention runs mmcv's PyTorch fallback on CPU).
# - Backbone: CSPNeXt-tiny (RTMDet-tiny's), strides 8/16/32. DETRs start from a pretrained backbone; with no
#   downloads here, the benchmark initialises it from RTMDet-tiny trained on the same data (set
#   `model.backbone.init_cfg` to your own checkpoint the same way). Random weights otherwise.
#   Measured here from that start (160 px, batch 8, 256 images): mAP50-95 0.055 after 10 epochs, 0.091 after 25.
_base_ = ['./dino_r18_synthetic.py']

model = dict(
    backbone=dict(_delete_=True, type='CSPNeXt', arch='P5', expand_ratio=0.5, deepen_factor=0.167, widen_factor=0.375,
                  channel_attention=True, out_indices=(2, 3, 4), norm_cfg=dict(type='BN'),
                  act_cfg=dict(type='SiLU', inplace=True), init_cfg=None),
    neck=dict(in_channels=[96, 192, 384]),
)
