# EViT on the main job's dense model, embedded shapes data: keep 0.7 at blocks 3, 6, 9 with the CLS-free
# score, inattentive tokens fused. Training-free: evaluate the dense checkpoint with EViT switched on
#   python tools/test.py configs/evit/mask-rcnn_evit-t_simplefpn_shapes.py work_dirs/demo/dense/iter_400.pth
# or fine-tune from it (150 iterations, as SViT's shapes config) and evaluate the result:
#   python tools/train.py configs/evit/mask-rcnn_evit-t_simplefpn_shapes.py --work-dir work_dirs/evit
_base_ = ['../dense/mask-rcnn_vit-t_simplefpn_shapes.py', '../_base_/models/evit.py']

load_from = '{{ fileDirname }}/../../work_dirs/demo/dense/iter_400.pth'
max_iters = 150
model = dict(
    type='TokenPruneMaskRCNN',
    backbone=dict(
        reducer={{_base_.evit_reducer}}))

train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=20),
    dict(type='CosineAnnealingLR', by_epoch=False, begin=20, end=max_iters, eta_min=1e-6),
]
optim_wrapper = dict(optimizer=dict(lr=1e-4, weight_decay=1e-6))
custom_hooks = {{_base_.evit_hooks}}
