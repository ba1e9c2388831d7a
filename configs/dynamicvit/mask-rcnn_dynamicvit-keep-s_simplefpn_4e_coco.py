# DynamicViT + keep pruned tokens on COCO 2017, DeiT-S (SViT's baseline that converged): predictors before
# blocks 3, 6, 9, keep ratios 0.7, 0.49, 0.343, ratio loss weight 2, fine-tuned from the dense 3x model with
# SViT's recipe (AdamW lr 1e-5, weight decay 1e-6, 500-iteration warm-up, 4 epochs, step at 3; batch 16).
#   tools/dist_train.sh configs/dynamicvit/mask-rcnn_dynamicvit-keep-s_simplefpn_4e_coco.py 8
_base_ = ['../dense/mask-rcnn_deit-s_simplefpn_3x_coco.py', '../_base_/models/dynamicvit.py', '../_base_/schedules/svit_finetune.py']

load_from = 'work_dirs/mask-rcnn_deit-s_simplefpn_3x_coco/epoch_36.pth'
model = dict(
    type='TokenPruneMaskRCNN',
    backbone=dict(
        init_cfg=None,  # all weights come from load_from
        reducer={{_base_.dynamicvit_reducer}}))

train_cfg = dict(max_epochs=4)
param_scheduler = {{_base_.finetune_4e_scheduler}}
optim_wrapper = dict(optimizer={{_base_.finetune_optimizer}})
custom_hooks = {{_base_.dynamicvit_hooks}}
