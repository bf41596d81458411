# YOLOX-tiny, W4A8 QAT from a float checkpoint (set `load_from`), with the COCO recipe's EMAHook kept.
#   mim train / python tools/train.py integrations/mmdet/yolox_tiny_synthetic_w4a8.py --cfg-options load_from=float.pth
# CR-QAT: recipe='w4a4-crqat' (YOLOX's class scores are distilled with its objectness folded in).
_base_ = './yolox_tiny_synthetic.py'

custom_imports = dict(imports=['detq_hooks.mmengine'], allow_failed_imports=False)
custom_hooks = [
    dict(type='EMAHook', ema_type='ExpMomentumEMA', momentum=0.0001, update_buffers=True, priority=49),
    dict(type='DetQHook', recipe='w4a8'),
]
