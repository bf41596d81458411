# detq-hooks fragment: quantize any MMDetection model with the `w4a8-crqat` recipe.
#   _base_ = ['mmdet::retinanet/retinanet_r50_fpn_1x_coco.py', 'path/to/integrations/mmdet/detq_w4a8_crqat.py']
# A base config that already sets `custom_hooks` (RTMDet: EMAHook, PipelineSwitchHook) cannot be merged
# with this file (MMEngine refuses duplicate keys among bases): list its hooks and DetQHook yourself,
# as rtmdet_tiny_synthetic_w4a8.py does.
custom_imports = dict(imports=['detq_hooks.mmengine'], allow_failed_imports=False)
custom_hooks = [dict(type='DetQHook', recipe='w4a8-crqat')]
