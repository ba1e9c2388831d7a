# BAT on the main job's dense model and the embedded shapes data (settings in ../_base_/models/bat.py).
# Training-free: evaluate the dense checkpoint with it switched on
#   python tools/test.py configs/bat/mask-rcnn_bat-t_simplefpn_shapes.py work_dirs/demo/dense/iter_400.pth
# or fine-tune from it with the reducers' shapes schedule and evaluate the result:
#   python tools/train.py configs/bat/mask-rcnn_bat-t_simplefpn_shapes.py --work-dir work_dirs/bat
_base_ = ['../dense/mask-rcnn_vit-t_simplefpn_finetune_shapes.py', '../_base_/models/bat.py']

model = dict(
    type='TokenPruneMaskRCNN',
    backbone=dict(
        reducer={{_base_.bat_reducer}}))

custom_hooks = {{_base_.bat_hooks}}
