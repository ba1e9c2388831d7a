# BAT (Long et al., "Beyond Attentive Tokens", CVPR 2023): at blocks 3, 6, 9 the 0.7 most attentive patch
# tokens are kept, the inattentive ones clustered by DPC-KNN (0.1 centres per inattentive token, k = 5) and
# merged, and as many homogeneous attentive pairs merged as the clusters cost, so each block hands on
# ceil(0.7 n) + 1 tokens (EViT's count). The detection ViT has no class token: tokens are scored by the
# attention they receive from all tokens (importance='mean'). A clustered position keeps its own value from
# before it was clustered (restore='last'); restore='merged' copies the cluster's value to all its positions,
# which on the shapes data cost 0.304 -> 0.125 box mAP training-free (docs/reducers/bat.md). Training-free or
# fine-tuned. Use as a second base:
#   _base_ = ['<dense config>', '../_base_/models/bat.py']
#   model = dict(type='TokenPruneMaskRCNN', backbone=dict(reducer={{_base_.bat_reducer}}))
#   custom_hooks = {{_base_.bat_hooks}}
bat_reducer = dict(
    type='BAT',
    blocks=[3, 6, 9],
    keep_ratio=0.7,
    cluster_ratio=0.1,
    knn=5,
    importance='mean',
    prop_attn=False,
    restore='last')
bat_hooks = [dict(type='TokenStatsHook')]
