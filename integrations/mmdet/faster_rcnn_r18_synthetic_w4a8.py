# Faster R-CNN R18-FPN, W4A8 QAT: the float config plus the detq fragment. Two-stage detectors get plain QAT,
# PTQ and TASKQ (without its head term); CR-QAT distils features only (no family reads rpn_head/roi_head):
#   recipe=dict(preset='w4a8-crqat', distillation=dict(relational_weight=0, logit_weight=0, box_weight=0))
_base_ = ['./faster_rcnn_r18_synthetic.py', './detq_w4a8.py']
