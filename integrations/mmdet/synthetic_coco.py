# The detq-hooks synthetic detection data (detq_hooks.tools.data) as MMDetection dataloaders.
# Generate it first:  python -c "from detq_hooks.tools.data import make_synthetic_dataset as m; m('data/detq_synth')"
# and point DETQ_SYNTH_ROOT at it (default: data/detq_synth/ relative to where you run).
# Its keys are prefixed `synth_` so it can sit beside a model config in `_base_` (MMEngine refuses
# duplicate keys among bases); the model config assigns them, e.g.
#   train_dataloader = {{_base_.synth_train_dataloader}}
synth_root = '{{$DETQ_SYNTH_ROOT:data/detq_synth/}}'
synth_img_scale = (320, 320)
synth_metainfo = dict(classes=('circle', 'triangle', 'striped_square', 'ring', 'cross', 'ellipse', 'star', 'checker'))
synth_num_classes = 8

synth_train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=synth_img_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='Pad', size=synth_img_scale, pad_val=dict(img=(114, 114, 114))),
    dict(type='PackDetInputs'),
]
synth_test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=synth_img_scale, keep_ratio=True),
    dict(type='Pad', size=synth_img_scale, pad_val=dict(img=(114, 114, 114))),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
# `_delete_` drops the COCO settings of the model's base (persistent workers, aspect-ratio sampler, ...).
synth_train_dataloader = dict(
    _delete_=True,
    batch_size=8,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=True),
    dataset=dict(
        type='CocoDataset',
        data_root=synth_root,
        metainfo=synth_metainfo,
        ann_file='annotations/instances_train.json',
        data_prefix=dict(img='images/train/'),
        filter_cfg=dict(filter_empty_gt=True, min_size=0),
        pipeline=synth_train_pipeline))
synth_val_dataloader = dict(
    _delete_=True,
    batch_size=8,
    num_workers=0,
    persistent_workers=False,  # explicit: the same dict serves as test_dataloader, where `_delete_` was already used
    drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type='CocoDataset',
        data_root=synth_root,
        metainfo=synth_metainfo,
        ann_file='annotations/instances_val.json',
        data_prefix=dict(img='images/val/'),
        test_mode=True,
        pipeline=synth_test_pipeline))
synth_val_evaluator = dict(
    _delete_=True, type='CocoMetric', ann_file=synth_root + 'annotations/instances_val.json', metric='bbox',
    format_only=False)
