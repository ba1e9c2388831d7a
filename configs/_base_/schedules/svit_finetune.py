# SViT's COCO fine-tuning recipe (Liu et al., WACV 2024), shared by every reducer fine-tuned from a dense 3x
# model: AdamW lr 1e-5, weight decay 1e-6, 500-iteration linear warm-up, then a x0.1 step; DeiT-S 4 epochs
# (step at 3), DeiT-T 6 epochs (step at 4); batch 16 = 8 GPUs x 2. Use as an extra base and pick the pieces:
#   _base_ = ['<dense config>', '../_base_/schedules/svit_finetune.py']
#   train_cfg = dict(max_epochs=4)
#   param_scheduler = {{_base_.finetune_4e_scheduler}}
#   optim_wrapper = dict(optimizer={{_base_.finetune_optimizer}})
finetune_optimizer = dict(lr=1e-5, weight_decay=1e-6)
finetune_4e_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=4, by_epoch=True, milestones=[3], gamma=0.1),
]
finetune_6e_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=6, by_epoch=True, milestones=[4], gamma=0.1),
]
