# Dense ViT-Adapter-S Mask R-CNN on COCO 2017, SViT's dense baseline (Liu et al., WACV 2024; official config
# vit-adapter-s-3x.py): DeiT-S with global attention in all 12 blocks and no LayerScale, ViT-Adapter
# (Chen et al., ICLR 2023) with 6 deformable heads, 4 points, interactions [0-2] [3-5] [6-8] [9-11], ConvFFN
# 0.25, SyncBN; FPN (256 channels, 5 levels) and MMDetection's standard Mask R-CNN heads (one-conv RPN head).
# 3x schedule (36 epochs, steps at 27 and 33), AdamW lr 1e-4, weight decay 0.05 (none on norms, biases,
# position and level embeddings), no gradient clipping, batch 16 = 8 GPUs x 2, DETR-style multi-scale training
# with random crops, 1333x800 test. Published: 48.5 box AP / 42.8 mask AP (see README.md here).
# ImageNet DeiT-S weights from a local file (the DeiT release's deit_small_patch16_224-cd65a155.pth):
#   tools/dist_train.sh configs/adapter/mask-rcnn_vit-adapter-s_fpn_3x_coco.py 8 --amp
_base_ = [
    '../_base_/models/mask-rcnn_vit_simplefpn.py',
    '../_base_/datasets/coco_instance.py',
    '../_base_/schedules/adamw_3x.py',
    '../_base_/default_runtime.py',
]

model = dict(
    backbone=dict(
        _delete_=True,
        type='TokenPruneViTAdapter',
        img_size=224,
        embed_dim=384,
        depth=12,
        num_heads=6,
        mlp_ratio=4.0,
        init_values=None,  # SViT trained its dense models with layer_scale=False
        drop_path_rate=0.2,
        conv_inplane=64,
        n_points=4,
        deform_num_heads=6,
        injector_init_values=0.0,
        interaction_indexes=[[0, 2], [3, 5], [6, 8], [9, 11]],
        with_cffn=True,
        cffn_ratio=0.25,
        deform_ratio=1.0,
        add_vit_feature=True,
        use_extra_extractor=True,
        norm='SyncBN',
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/deit_small_patch16_224-cd65a155.pth')),
    neck=dict(_delete_=True, type='FPN', in_channels=[384, 384, 384, 384], out_channels=256, num_outs=5),
    rpn_head=dict(num_convs=1))

# DETR / Sparse R-CNN augmentation, as ViT-Adapter's and SViT's configs
scales = [(480, 1333), (512, 1333), (544, 1333), (576, 1333), (608, 1333), (640, 1333), (672, 1333),
          (704, 1333), (736, 1333), (768, 1333), (800, 1333)]
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args={{_base_.backend_args}}),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomFlip', prob=0.5),
    dict(
        type='RandomChoice',
        transforms=[
            [dict(type='RandomChoiceResize', scales=scales, keep_ratio=True)],
            [
                dict(type='RandomChoiceResize', scales=[(400, 1333), (500, 1333), (600, 1333)], keep_ratio=True),
                dict(type='RandomCrop', crop_type='absolute_range', crop_size=(384, 600), allow_negative_crop=True),
                dict(type='RandomChoiceResize', scales=scales, keep_ratio=True),
            ],
        ]),
    dict(type='RandomCrop', crop_type='absolute_range', crop_size=(1024, 1024), allow_negative_crop=True),
    dict(type='PackDetInputs'),
]
train_dataloader = dict(batch_size=2, dataset=dict(pipeline=train_pipeline))

optim_wrapper = dict(
    paramwise_cfg=dict(
        custom_keys={
            'level_embed': dict(decay_mult=0.0),
            'pos_embed': dict(decay_mult=0.0),
            'norm': dict(decay_mult=0.0),
            'bias': dict(decay_mult=0.0),
        }),
    clip_grad=None)
default_hooks = dict(checkpoint=dict(type='CheckpointHook', interval=1, max_keep_ckpts=3, save_best='auto'))
