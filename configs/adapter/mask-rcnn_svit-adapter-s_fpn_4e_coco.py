# SViT-Adapter-S on COCO 2017 (SViT's official svit-adapter-s-0.33x-ftune.py): fine-tune the dense 3x
# ViT-Adapter-S with SViT's gates at ViT blocks 3-11 (keep targets 0.7 x3, 0.49 x3, 0.343 x3, ratio loss
# weight 4, reactivation, deterministic inference by calibrated thresholds); the adapter sees all tokens.
# AdamW lr 1e-5, weight decay 1e-6, 500-iteration warm-up, 4 epochs with a step at 3, batch 16 = 8 GPUs x 2.
# Published: 48.2 box AP / 42.5 mask AP.
#   tools/dist_train.sh configs/adapter/mask-rcnn_vit-adapter-s_fpn_3x_coco.py 8 --amp
#   tools/dist_train.sh configs/adapter/mask-rcnn_svit-adapter-s_fpn_4e_coco.py 8 --amp
# load_from below is the dense run's last checkpoint; for the official dense checkpoint, convert it first
# (tools/model_converters/official_to_tokenprune.py) and pass --cfg-options load_from=CONVERTED.pth.
_base_ = ['./mask-rcnn_vit-adapter-s_fpn_3x_coco.py', '../_base_/models/svit.py', '../_base_/schedules/svit_finetune.py']

load_from = 'work_dirs/mask-rcnn_vit-adapter-s_fpn_3x_coco/epoch_36.pth'
model = dict(
    type='TokenPruneMaskRCNN',
    backbone=dict(
        init_cfg=None,  # all weights come from load_from
        reducer={{_base_.svit_reducer}}))

train_cfg = dict(max_epochs=4)
param_scheduler = {{_base_.finetune_4e_scheduler}}
optim_wrapper = dict(optimizer={{_base_.finetune_optimizer}})
custom_hooks = {{_base_.svit_hooks}}
