# PPT on the main job's dense model and the embedded shapes data (settings in ../_base_/models/ppt.py).
# Training-free: evaluate the dense checkpoint with it switched on
#   python tools/test.py configs/ppt/mask-rcnn_ppt-t_simplefpn_shapes.py work_dirs/demo/dense/iter_400.pth
# or fine-tune from it with the reducers' shapes schedule and evaluate the result:
#   python tools/train.py configs/ppt/mask-rcnn_ppt-t_simplefpn_shapes.py --work-dir work_dirs/ppt
_base_ = ['../dense/mask-rcnn_vit-t_simplefpn_finetune_shapes.py', '../_base_/models/ppt.py']

model = dict(
    type='TokenPruneMaskRCNN',
    backbone=dict(
        reducer={{_base_.ppt_reducer}}))

custom_hooks = {{_base_.ppt_hooks}}
