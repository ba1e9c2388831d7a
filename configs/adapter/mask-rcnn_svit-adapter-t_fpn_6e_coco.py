# SViT-Adapter-T on COCO 2017 (SViT's official svit-adapter-t-0.5x-ftune.py): as
# mask-rcnn_svit-adapter-s_fpn_4e_coco.py with DeiT-T and 6 epochs (step at 4), fine-tuned from the dense
# ViT-Adapter-T 3x model. Published: 45.5 box AP / 40.7 mask AP.
_base_ = './mask-rcnn_svit-adapter-s_fpn_4e_coco.py'

load_from = 'work_dirs/mask-rcnn_vit-adapter-t_fpn_3x_coco/epoch_36.pth'
model = dict(
    backbone=dict(embed_dim=192, num_heads=3, drop_path_rate=0.1),
    neck=dict(in_channels=[192, 192, 192, 192]))

train_cfg = dict(max_epochs=6)
param_scheduler = {{_base_.finetune_6e_scheduler}}
