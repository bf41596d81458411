# RetinaNet R18-FPN, W4A8 QAT: the float config plus the detq fragment.
_base_ = ['./retinanet_r18_synthetic.py', './detq_w4a8.py']
