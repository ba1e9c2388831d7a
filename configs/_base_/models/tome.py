# ToMe (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023): in every block, bipartite soft matching
# merges the most similar tokens (each block keeps 0.875 of its patch tokens: 0.2 after 12 blocks, the final
# count of the paper's DeiT-S r = 13), proportional attention; every merged token is copied back to all its
# positions (exact unmerge). Training-free or fine-tuned. Use as a second base:
#   _base_ = ['<dense config>', '../_base_/models/tome.py']
#   model = dict(type='TokenPruneMaskRCNN', backbone=dict(reducer={{_base_.tome_reducer}}))
#   custom_hooks = {{_base_.tome_hooks}}
tome_reducer = dict(type='ToMe', blocks=None, keep_ratio=0.875, prop_attn=True)
tome_hooks = [dict(type='TokenStatsHook')]
