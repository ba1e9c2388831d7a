# 36 epochs, AdamW 1e-4 (weight decay 0.05, none on position embeddings, class token and norms),
# 500-iteration linear warm-up, steps at epochs 27 and 33: the ViT-Adapter / ViTDet-style 3x schedule.
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=36, val_interval=1)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')

param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=36, by_epoch=True, milestones=[27, 33], gamma=0.1),
]
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(
        custom_keys={
            'pos_embed': dict(decay_mult=0.0),
            'cls_token': dict(decay_mult=0.0),
            'norm': dict(decay_mult=0.0),
        }),
    clip_grad=dict(max_norm=1.0, norm_type=2))
# 8 GPUs x 2 images
auto_scale_lr = dict(enable=False, base_batch_size=16)
