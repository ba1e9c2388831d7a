# SViT fine-tune of the main job's dense model on the embedded shapes data: gates at blocks 3-11 with keep
# targets 0.7 x3, 0.49 x3, 0.343 x3, ratio loss weight 4, thresholds calibrated during training for
# deterministic inference. Starts from the dense checkpoint (train it first, or let tools/demo.py do both):
#   python tools/train.py configs/dense/mask-rcnn_vit-t_simplefpn_shapes.py --work-dir work_dirs/demo/dense
#   python tools/train.py configs/svit/mask-rcnn_svit-t_simplefpn_shapes.py --work-dir work_dirs/demo/svit
_base_ = ['../dense/mask-rcnn_vit-t_simplefpn_finetune_shapes.py', '../_base_/models/svit.py']

model = dict(
    type='TokenPruneMaskRCNN',
    backbone=dict(
        reducer={{_base_.svit_reducer}}))

custom_hooks = {{_base_.svit_hooks}}
