# Conditional DETR (CSPNeXt-tiny), W4A8 QAT: the float config plus the detq fragment.
_base_ = ['./conditional_detr_cspnext_synthetic.py', './detq_w4a8.py']
