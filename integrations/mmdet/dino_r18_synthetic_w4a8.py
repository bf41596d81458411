# DINO R18, W4A8 QAT: the float config plus the detq fragment.
_base_ = ['./dino_r18_synthetic.py', './detq_w4a8.py']
