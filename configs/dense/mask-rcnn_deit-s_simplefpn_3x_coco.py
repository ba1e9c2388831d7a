# Dense baseline on COCO 2017: Mask R-CNN, DeiT-S backbone (global attention, patch 16), ViTDet's SimpleFPN,
# 3x schedule with multi-scale training. Start from ImageNet DeiT-S weights given as a local file:
#   checkpoints/deit_small_patch16_224-cd65a155.pth (from the DeiT release), or --cfg-options
#   model.backbone.init_cfg.checkpoint=/path/to/weights.pth
# Data: export COCO_ROOT=/path/to/coco/.  8 GPUs: tools/dist_train.sh THIS_FILE 8
_base_ = [
    '../_base_/models/mask-rcnn_vit_simplefpn.py',
    '../_base_/datasets/coco_instance.py',
    '../_base_/schedules/adamw_3x.py',
    '../_base_/default_runtime.py',
]

model = dict(
    backbone=dict(
        embed_dim=384,
        num_heads=6,
        drop_path_rate=0.1,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/deit_small_patch16_224-cd65a155.pth')),
    neck=dict(in_channels=384))

train_pipeline = [
    dict(type='LoadImageFromFile', backend_args={{_base_.backend_args}}),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomResize', scale=[(1333, 640), (1333, 800)], keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
