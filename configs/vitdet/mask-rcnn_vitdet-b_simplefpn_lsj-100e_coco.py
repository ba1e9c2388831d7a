# ViTDet-B Mask R-CNN on COCO 2017, trained as ViTDet trains it (detectron2's projects/ViTDet
# configs/COCO/mask_rcnn_vitdet_b_100ep.py; MMDetection's projects/ViTDet/configs/lsj-100e_coco-instance.py and
# vitdet_mask-rcnn_vit-b-mae_lsj-100e.py): the model of ../_base_/models/mask-rcnn_vitdet_simplefpn.py from MAE
# ViT-B weights; large-scale jitter at 1024 (flip, resize by 0.1-2.0 of 1024x1024, crop to 1024x1024, pad to
# 1024x1024); 100 epochs = 184375 iterations of 64 images (16 GPUs x 4); AdamW lr 1e-4, betas (0.9, 0.999),
# weight decay 0.1 (none on norm layers and the position embeddings), layer-wise lr decay 0.7 over the 12 blocks,
# 250-iteration linear warm-up from 0.001, lr x0.1 at iterations 163889 and 177546 (epochs 88, 96); mixed
# precision (AmpOptimWrapper: GPU only).
# MAE ViT-B weights from a local file (nothing is downloaded): checkpoints/mae_pretrain_vit_base.pth (MAE's
# release), or --cfg-options model.backbone.init_cfg.checkpoint=PATH with a detectron2 ViTDet .pkl or an
# MMDetection ViTDet .pth (their backbone is taken; see docs/vitdet.md).
# Data: export COCO_ROOT=/path/to/coco/.  tools/dist_train.sh THIS_FILE 16
_base_ = [
    '../_base_/models/mask-rcnn_vitdet_simplefpn.py',
    '../_base_/datasets/coco_instance.py',
    '../_base_/default_runtime.py',
]

image_size = (1024, 1024)
model = dict(
    backbone=dict(init_cfg=dict(type='Pretrained', checkpoint='checkpoints/mae_pretrain_vit_base.pth')))

train_pipeline = [
    dict(type='LoadImageFromFile', backend_args={{_base_.backend_args}}),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='RandomResize', scale=image_size, ratio_range=(0.1, 2.0), keep_ratio=True),
    dict(
        type='RandomCrop',
        crop_type='absolute_range',
        crop_size=image_size,
        recompute_bbox=True,
        allow_negative_crop=True),
    dict(type='FilterAnnotations', min_gt_bbox_wh=(1e-2, 1e-2)),
    dict(type='Pad', size=image_size, pad_val=dict(img=(114, 114, 114))),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args={{_base_.backend_args}}),
    dict(type='Resize', scale=image_size, keep_ratio=True),
    dict(type='Pad', size=image_size, pad_val=dict(img=(114, 114, 114))),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(
    batch_size=4,
    num_workers=8,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=True),
    batch_sampler=None,
    dataset=dict(filter_cfg=dict(filter_empty_gt=True, min_size=32), pipeline=train_pipeline))
val_dataloader = dict(batch_size=1, num_workers=2, dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

# detectron2's get_vit_lr_decay_rate: patch and position embeddings at 0.7^13, block i at 0.7^(12 - i), the
# neck and heads at 1; weight decay 0 on every norm layer (norm_decay_mult; the blocks' norms by their keys) and
# on the position embeddings
lr_decay_rate = 0.7
num_layers = 12
layer_decay_keys = {
    'backbone.patch_embed.': dict(lr_mult=lr_decay_rate**(num_layers + 1)),
    'backbone.pos_embed': dict(lr_mult=lr_decay_rate**(num_layers + 1), decay_mult=0.0),
}
layer_decay_keys.update(
    {f'backbone.blocks.{i}.': dict(lr_mult=lr_decay_rate**(num_layers - i)) for i in range(num_layers)})
layer_decay_keys.update({
    f'backbone.blocks.{i}.{norm}.': dict(lr_mult=lr_decay_rate**(num_layers - i), decay_mult=0.0)
    for i in range(num_layers) for norm in ('norm1', 'norm2')
})
optim_wrapper = dict(
    type='AmpOptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.1),
    paramwise_cfg=dict(norm_decay_mult=0.0, custom_keys=layer_decay_keys))

# 100 epochs = 184375 iterations x 64 images / 118000 images per epoch
max_iters = 184375
interval = 5000
train_cfg = dict(
    type='IterBasedTrainLoop',
    max_iters=max_iters,
    val_interval=interval,
    dynamic_intervals=[(max_iters // interval * interval + 1, max_iters)])
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=250),
    dict(type='MultiStepLR', begin=0, end=max_iters, by_epoch=False, milestones=[163889, 177546], gamma=0.1),
]

default_hooks = dict(
    logger=dict(type='LoggerHook', interval=50),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, save_last=True, interval=interval, max_keep_ckpts=5))
log_processor = dict(type='LogProcessor', window_size=50, by_epoch=False)
auto_scale_lr = dict(enable=False, base_batch_size=64)
