# DINO with a CSPNeXt-tiny backbone, W4A8 QAT: the float config plus the detq fragment.
_base_ = ['./dino_cspnext_synthetic.py', './detq_w4a8.py']
