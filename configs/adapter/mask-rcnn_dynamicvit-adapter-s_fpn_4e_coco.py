# DynamicViT baseline of SViT's table on ViT-Adapter-S (COCO 2017), the original method: predictors before
# ViT blocks 3, 6, 9 keep 0.7, 0.49, 0.343 of the tokens, dropped tokens are discarded (zero in the map);
# ratio loss weight 2, no distillation. DynamicViT shrinks the token set at inference, so it runs per
# interaction stage (reducer_scope 'auto' -> 'stage'); its ratios are fractions of all tokens, the same at a
# stage start. Fine-tuned from the dense model with the SViT schedule (4 epochs). Published: did not converge
# (SViT's paper); the "+ keep" variant is mask-rcnn_dynamicvit-keep-adapter-s_fpn_4e_coco.py.
_base_ = ['./mask-rcnn_vit-adapter-s_fpn_3x_coco.py', '../_base_/schedules/svit_finetune.py']

load_from = 'work_dirs/mask-rcnn_vit-adapter-s_fpn_3x_coco/epoch_36.pth'
dynamicvit_reducer = dict(
    type='DynamicViT', blocks=[3, 6, 9], keep_targets=[0.7, 0.49, 0.343], ratio_loss_weight=2.0,
    keep_pruned=False)
model = dict(
    type='TokenPruneMaskRCNN',
    backbone=dict(init_cfg=None, reducer=dynamicvit_reducer))

train_cfg = dict(max_epochs=4)
param_scheduler = {{_base_.finetune_4e_scheduler}}
optim_wrapper = dict(optimizer={{_base_.finetune_optimizer}})
custom_hooks = [dict(type='TokenStatsHook')]
