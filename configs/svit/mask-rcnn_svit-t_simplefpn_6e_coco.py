# SViT on COCO 2017, DeiT-T: as mask-rcnn_svit-s_simplefpn_4e_coco.py with SViT's DeiT-T schedule
# (6 epochs, step at 4), fine-tuned from the dense DeiT-T 3x model.
_base_ = './mask-rcnn_svit-s_simplefpn_4e_coco.py'

load_from = 'work_dirs/mask-rcnn_deit-t_simplefpn_3x_coco/epoch_36.pth'
model = dict(
    backbone=dict(embed_dim=192, num_heads=3, drop_path_rate=0.1),
    neck=dict(in_channels=192))

train_cfg = dict(max_epochs=6)
param_scheduler = {{_base_.finetune_6e_scheduler}}
