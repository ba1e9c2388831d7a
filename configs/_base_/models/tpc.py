# TPC (Zhu, "TPC-ViT: Token Propagation Controller for Efficient Vision Transformer", 2024), as designed in
# docs/reducers/tpc.md: pause/restart controllers at blocks 3-11 with SViT's keep schedule (0.7 x3, 0.49 x3,
# 0.343 x3) for comparability, budget loss weight 4, smoothing regulariser weight 1, depth-wise 3x3
# stabilizer for paused tokens, deterministic inference by per-block thresholds that SViTCalibrationHook
# recalibrates after training. Use as a second base:
#   _base_ = ['<dense config>', '../_base_/models/tpc.py']
#   model = dict(type='TokenPruneMaskRCNN', backbone=dict(reducer={{_base_.tpc_reducer}}))
#   custom_hooks = {{_base_.tpc_hooks}}
tpc_reducer = dict(
    type='TPC',
    blocks=[3, 4, 5, 6, 7, 8, 9, 10, 11],
    keep_targets=[0.7, 0.7, 0.7, 0.49, 0.49, 0.49, 0.343, 0.343, 0.343],
    budget_loss_weight=4.0,
    smooth_loss_weight=1.0,
    stabilizer=True,
    inference='threshold')
tpc_hooks = [dict(type='TokenStatsHook'), dict(type='SViTCalibrationHook', num_batches=50)]
