# SViT inside ViTDet-B on COCO 2017: the dense ViTDet-B Mask R-CNN of ./mask-rcnn_vitdet-b_simplefpn_lsj-100e_coco.py
# (14x14 windows, global blocks 2, 5, 8, 11, relative positions, LSJ at 1024) fine-tuned with SViT's gates at
# blocks 3-11 (keep targets 0.7 x3, 0.49 x3, 0.343 x3, ratio loss weight 4, calibrated thresholds;
# ../_base_/models/svit.py) and SViT's fine-tune recipe (../_base_/schedules/svit_finetune.py: AdamW lr 1e-5,
# weight decay 1e-6, no layer-wise decay, 500-iteration linear warm-up, 4 epochs with a x0.1 step after 3), here
# in iterations of ViTDet's batch of 64 images (16 GPUs x 4): 4 epochs = 7375 iterations, the step at 5531.
# Gated windowed blocks run each window on its kept tokens at their original places, gated global blocks (5, 8,
# 11) each image's kept tokens with their relative positions (docs/vitdet.md, Token reduction in windowed
# blocks). Starts from the dense ViTDet-B checkpoint: set load_from below (or --cfg-options load_from=...).
#   tools/dist_train.sh configs/vitdet/mask-rcnn_vitdet-b_simplefpn_lsj-100e_coco.py 16
#   tools/dist_train.sh configs/vitdet/mask-rcnn_vitdet-b-svit_simplefpn_lsj-100e_coco.py 16
_base_ = [
    './mask-rcnn_vitdet-b_simplefpn_lsj-100e_coco.py',
    '../_base_/models/svit.py',
    '../_base_/schedules/svit_finetune.py',
]

load_from = 'work_dirs/mask-rcnn_vitdet-b_simplefpn_lsj-100e_coco/iter_184375.pth'
model = dict(
    type='TokenPruneMaskRCNN',
    backbone=dict(
        init_cfg=None,  # all weights come from load_from
        reducer={{_base_.svit_reducer}}))
custom_hooks = {{_base_.svit_hooks}}

# SViT's recipe: plain AdamW (ViTDet's layer-wise lr decay and weight-decay exemptions dropped, but no decay on
# norm layers), mixed precision kept
optim_wrapper = dict(
    optimizer={{_base_.finetune_optimizer}},
    paramwise_cfg=dict(_delete_=True, norm_decay_mult=0.0))
max_iters = 7375  # 4 epochs x 118000 images / 64
train_cfg = dict(
    _delete_=True, type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=max_iters, by_epoch=False, milestones=[5531], gamma=0.1),
]
default_hooks = dict(checkpoint=dict(interval=max_iters // 4))
