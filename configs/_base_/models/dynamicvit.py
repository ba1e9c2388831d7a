# DynamicViT's published setting (Rao et al., NeurIPS 2021): local+global predictors before blocks 3, 6, 9,
# keep ratios 0.7, 0.49, 0.343 of the patch tokens (hierarchical), ratio loss weight 2 (per image), hard
# Gumbel-softmax with the masked-softmax attention in training, fixed top-k at inference. keep_pruned=True
# is "DynamicViT + keep pruned tokens" (SViT's baseline: dropped tokens keep their last value in the map);
# keep_pruned=False is the original method (dropped positions are zero in the map). Use as a second base:
#   _base_ = ['<dense config>', '../_base_/models/dynamicvit.py']
#   model = dict(type='TokenPruneMaskRCNN', backbone=dict(reducer={{_base_.dynamicvit_reducer}}))
#   custom_hooks = {{_base_.dynamicvit_hooks}}
dynamicvit_reducer = dict(
    type='DynamicViT',
    blocks=[3, 6, 9],
    keep_targets=[0.7, 0.49, 0.343],
    ratio_loss_weight=2.0,
    keep_pruned=True)
dynamicvit_hooks = [dict(type='TokenStatsHook')]
