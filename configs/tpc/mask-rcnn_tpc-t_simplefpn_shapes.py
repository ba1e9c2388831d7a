# TPC fine-tune of the main job's dense model on the embedded shapes data: pause/restart controllers at
# blocks 3-11 (keep targets 0.7 x3, 0.49 x3, 0.343 x3), budget and smoothing losses, depth-wise stabilizer,
# inference thresholds recalibrated after training by SViTCalibrationHook. Train the dense model first:
#   python tools/train.py configs/tpc/mask-rcnn_tpc-t_simplefpn_shapes.py --work-dir work_dirs/tpc
_base_ = ['../dense/mask-rcnn_vit-t_simplefpn_shapes.py', '../_base_/models/tpc.py']

load_from = '{{ fileDirname }}/../../work_dirs/demo/dense/iter_400.pth'
max_iters = 150
model = dict(
    type='TokenPruneMaskRCNN',
    backbone=dict(
        reducer={{_base_.tpc_reducer}}))

train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=20),
    dict(type='CosineAnnealingLR', by_epoch=False, begin=20, end=max_iters, eta_min=1e-6),
]
optim_wrapper = dict(optimizer=dict(lr=1e-4, weight_decay=1e-6))
custom_hooks = {{_base_.tpc_hooks}}
