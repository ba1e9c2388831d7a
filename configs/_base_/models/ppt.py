# PPT (Wu et al., "PPT: Token Pruning and Pooling for Efficient Vision Transformers"): at blocks 3, 6, 9 each
# image either prunes its lowest-scored tokens or pools (bipartite merging) by a resolution-free redundancy
# test (coefficient of variation of the scores below 1.64, the paper's DeiT-S threshold at 196 tokens); keep
# ratios 146/196, 96/146, 48/96 (the paper's r = 50 schedule as fractions). The detection ViT has no class
# token, so tokens are scored by the attention they receive from all tokens (importance='mean'); see
# docs/reducers/ppt.md. Training-free or fine-tuned. Use as a second base:
#   _base_ = ['<dense config>', '../_base_/models/ppt.py']
#   model = dict(type='TokenPruneMaskRCNN', backbone=dict(reducer={{_base_.ppt_reducer}}))
#   custom_hooks = {{_base_.ppt_hooks}}
ppt_reducer = dict(
    type='PPT',
    blocks=[3, 6, 9],
    keep_ratio=[146 / 196, 96 / 146, 48 / 96],
    criterion='cv',
    threshold=1.64,
    importance='mean',
    prop_attn=True)
ppt_hooks = [dict(type='TokenStatsHook')]
