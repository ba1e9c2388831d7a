# EViT's published setting (Liang et al., ICLR 2022): at blocks 3, 6, 9, between attention and MLP, keep the
# top 70% of the current tokens by attention and fuse the rest into one attention-weighted token. Detection
# backbones have no class token, so the score is the CLS-free mean attention each token receives (use
# score='cls' with a backbone built with cls_token=True for the paper's class-token attention). A fused
# position keeps its own last value in the output map (restore='last', as SViT keeps pruned tokens), which
# works training-free and fine-tuned; restore='fused' copies the fused token's final value to every fused
# position instead, which collapses a model that was not fine-tuned with it (docs/reducers/evit.md). Use as a
# second base:
#   _base_ = ['<dense config>', '../_base_/models/evit.py']
#   model = dict(type='TokenPruneMaskRCNN', backbone=dict(reducer={{_base_.evit_reducer}}))
#   custom_hooks = {{_base_.evit_hooks}}
evit_reducer = dict(
    type='EViT',
    blocks=[3, 6, 9],
    keep_ratio=0.7,
    score='mean_attention',
    fuse='mean',
    restore='last')
evit_hooks = [dict(type='TokenStatsHook')]
