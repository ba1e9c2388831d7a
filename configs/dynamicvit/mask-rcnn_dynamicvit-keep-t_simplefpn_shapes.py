# DynamicViT + keep pruned tokens, fine-tuned from the main job's dense model on the embedded shapes data:
# predictors before blocks 3, 6, 9, keep ratios 0.7, 0.49, 0.343, ratio loss weight 2; dropped tokens keep
# their last value in the output map. Train the dense model first (or let tools/demo.py do it):
#   python tools/train.py configs/dynamicvit/mask-rcnn_dynamicvit-keep-t_simplefpn_shapes.py \
#       --work-dir work_dirs/dynamicvit-keep
_base_ = ['../dense/mask-rcnn_vit-t_simplefpn_shapes.py', '../_base_/models/dynamicvit.py']

load_from = '{{ fileDirname }}/../../work_dirs/demo/dense/iter_400.pth'
max_iters = 150
model = dict(
    type='TokenPruneMaskRCNN',
    backbone=dict(
        reducer={{_base_.dynamicvit_reducer}}))

train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=20),
    dict(type='CosineAnnealingLR', by_epoch=False, begin=20, end=max_iters, eta_min=1e-6),
]
optim_wrapper = dict(optimizer=dict(lr=1e-4, weight_decay=1e-6))
custom_hooks = {{_base_.dynamicvit_hooks}}
