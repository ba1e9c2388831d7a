# The main job's dense model: Mask R-CNN with a DeiT-T-shaped ViT (192 channels, 12 blocks, 3 heads) trained
# from scratch on the embedded shapes data, with narrow heads so that it trains on 2 CPU cores in minutes.
#   python tools/train.py configs/dense/mask-rcnn_vit-t_simplefpn_shapes.py
_base_ = [
    '../_base_/models/mask-rcnn_vit_simplefpn.py',
    '../_base_/datasets/shapes_instance.py',
    '../_base_/schedules/adamw_3x.py',
    '../_base_/default_runtime.py',
]

max_iters = 400
model = dict(
    backbone=dict(img_size=256, embed_dim=192, num_heads=3, drop_path_rate=0.0),
    neck=dict(in_channels=192, out_channels=128),
    rpn_head=dict(in_channels=128, feat_channels=128),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=128),
        bbox_head=dict(in_channels=128, fc_out_channels=256, num_classes=3),
        mask_roi_extractor=dict(out_channels=128),
        mask_head=dict(num_convs=2, in_channels=128, conv_out_channels=128, num_classes=3)),
    train_cfg=dict(
        rpn_proposal=dict(nms_pre=1000, max_per_img=500),
        rcnn=dict(sampler=dict(num=128))),
    test_cfg=dict(
        rpn=dict(nms_pre=500, max_per_img=300),
        rcnn=dict(max_per_img=50)))

train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=50),
    dict(type='CosineAnnealingLR', by_epoch=False, begin=50, end=max_iters, eta_min=1e-6),
]
# AdamW as in the 3x schedule, at a from-scratch learning rate
optim_wrapper = dict(optimizer=dict(lr=3e-4))

default_hooks = dict(
    logger=dict(type='LoggerHook', interval=20),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=100, max_keep_ckpts=2))
log_processor = dict(by_epoch=False)
env_cfg = dict(dist_cfg=dict(backend='gloo'))
