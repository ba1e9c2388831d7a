# EViT's published setting (Liang et al., ICLR 2022): at blocks 3, 6, 9, between attention and MLP, keep the
# top 70% of the current tokens by attention and fuse the rest into one attention-weighted token. Detection
# backbones have no class token, so the score is the CLS-free mean attention each token receives (use
# score='cls' with a backbone built with cls_token=True for the paper's class-token attention). Fused
# positions get the fused token's final value in the output map. Use as a second base:
#   _base_ = ['<dense config>', '../_base_/models/evit.py']
#   model = dict(type='TokenPruneMaskRCNN', backbone=dict(reducer={{_base_.evit_reducer}}))
#   custom_hooks = {{_base_.evit_hooks}}
evit_reducer = dict(
    type='EViT',
    reduce_blocks=[3, 6, 9],
    keep_rate=0.7,
    score='mean_attention',
    fuse='mean',
    restore='fused')
evit_hooks = [dict(type='TokenStatsHook')]
