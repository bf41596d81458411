# DETR R18, W4A8 QAT: the float config plus the detq fragment.
_base_ = ['./detr_r18_synthetic.py', './detq_w4a8.py']
