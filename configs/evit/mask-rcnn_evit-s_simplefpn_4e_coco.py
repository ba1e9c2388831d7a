# EViT on COCO 2017, DeiT-S: keep 0.7 at blocks 3, 6, 9 (CLS-free score, inattentive tokens fused),
# fine-tuned from the dense 3x model with SViT's recipe (AdamW lr 1e-5, weight decay 1e-6, 500-iteration
# warm-up, 4 epochs, step at 3; batch 16 = 8 GPUs x 2), as SViT's EViT baseline. Training-free evaluation of
# the dense model: tools/dist_test.sh THIS_FILE work_dirs/mask-rcnn_deit-s_simplefpn_3x_coco/epoch_36.pth 8
#   tools/dist_train.sh configs/evit/mask-rcnn_evit-s_simplefpn_4e_coco.py 8
_base_ = ['../dense/mask-rcnn_deit-s_simplefpn_3x_coco.py', '../_base_/models/evit.py', '../_base_/schedules/svit_finetune.py']

load_from = 'work_dirs/mask-rcnn_deit-s_simplefpn_3x_coco/epoch_36.pth'
model = dict(
    type='TokenPruneMaskRCNN',
    backbone=dict(
        init_cfg=None,  # all weights come from load_from
        reducer={{_base_.evit_reducer}}))

train_cfg = dict(max_epochs=4)
param_scheduler = {{_base_.finetune_4e_scheduler}}
optim_wrapper = dict(optimizer={{_base_.finetune_optimizer}})
custom_hooks = {{_base_.evit_hooks}}
