# EViT baseline on ViT-Adapter-T (COCO 2017): as mask-rcnn_evit-adapter-s_fpn_4e_coco.py with DeiT-T and the
# 6-epoch fine-tune from the dense ViT-Adapter-T. Published: 44.5 box AP / 39.8 mask AP.
_base_ = './mask-rcnn_evit-adapter-s_fpn_4e_coco.py'

load_from = 'work_dirs/mask-rcnn_vit-adapter-t_fpn_3x_coco/epoch_36.pth'
model = dict(
    backbone=dict(embed_dim=192, num_heads=3, drop_path_rate=0.1),
    neck=dict(in_channels=[192, 192, 192, 192]))

train_cfg = dict(max_epochs=6)
param_scheduler = {{_base_.finetune_6e_scheduler}}
