# TPC fine-tune of the main job's dense model on the embedded shapes data: pause/restart controllers at
# blocks 3-11 (keep targets 0.7 x3, 0.49 x3, 0.343 x3), budget and smoothing losses, depth-wise stabilizer,
# inference thresholds recalibrated after training by SViTCalibrationHook. Train the dense model first:
#   python tools/train.py configs/tpc/mask-rcnn_tpc-t_simplefpn_shapes.py --work-dir work_dirs/tpc
_base_ = ['../dense/mask-rcnn_vit-t_simplefpn_finetune_shapes.py', '../_base_/models/tpc.py']

model = dict(
    type='TokenPruneMaskRCNN',
    backbone=dict(
        reducer={{_base_.tpc_reducer}}))

custom_hooks = {{_base_.tpc_hooks}}
