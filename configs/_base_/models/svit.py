# SViT's published setting (Liu et al., WACV 2024): gates at blocks 3-11 of 12, keep targets 0.7 x3,
# 0.49 x3, 0.343 x3, ratio loss weight 4 on the batch-mean keep fraction, reactivation on, deterministic
# inference by calibrated per-block thresholds. Use as a second base:
#   _base_ = ['<dense config>', '../_base_/models/svit.py']
#   model = dict(type='TokenPruneMaskRCNN', backbone=dict(reducer={{_base_.svit_reducer}}))
#   custom_hooks = {{_base_.svit_hooks}}
svit_reducer = dict(
    type='SViT',
    blocks=[3, 4, 5, 6, 7, 8, 9, 10, 11],
    keep_targets=[0.7, 0.7, 0.7, 0.49, 0.49, 0.49, 0.343, 0.343, 0.343],
    ratio_loss_weight=4.0,
    ratio_loss='batch',
    reactivation=True,
    inference='threshold')
svit_hooks = [dict(type='TokenStatsHook'), dict(type='SViTCalibrationHook', num_batches=50)]
