# EViT baseline of SViT's table on ViT-Adapter-S (COCO 2017): at ViT blocks 3, 6, 9 keep the most attended
# tokens and fuse the rest into one (tokenprune's EViT reducer, CLS-free score: the adapter has no class
# token). EViT shrinks the token set, so it runs per interaction stage (reducer_scope 'auto' -> 'stage'):
# blocks 3, 6 and 9 each open a stage with all tokens, so their keep rates 0.7, 0.49, 0.343 are relative to
# all tokens, the same counts as EViT's 0.7 per step on a plain ViT. Fine-tuned from the dense model with the
# SViT schedule (4 epochs). Published: 47.1 box AP / 41.6 mask AP.
_base_ = ['./mask-rcnn_vit-adapter-s_fpn_3x_coco.py', '../_base_/schedules/svit_finetune.py']

load_from = 'work_dirs/mask-rcnn_vit-adapter-s_fpn_3x_coco/epoch_36.pth'
evit_reducer = dict(type='EViT', blocks=[3, 6, 9], keep_ratio=[0.7, 0.49, 0.343], score='mean_attention')
model = dict(
    type='TokenPruneMaskRCNN',
    backbone=dict(init_cfg=None, reducer=evit_reducer))

train_cfg = dict(max_epochs=4)
param_scheduler = {{_base_.finetune_4e_scheduler}}
optim_wrapper = dict(optimizer={{_base_.finetune_optimizer}})
custom_hooks = [dict(type='TokenStatsHook')]
