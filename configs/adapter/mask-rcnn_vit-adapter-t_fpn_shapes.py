# ViT-Adapter-T Mask R-CNN on the embedded shapes data, beside the main job's SimpleFPN model
# (../dense/mask-rcnn_vit-t_simplefpn_shapes.py): the same DeiT-T-shaped ViT trained from scratch, heads,
# data and schedule (400 iterations x 4 images); only backbone and neck differ: the adapter (narrow stem,
# 32 channels; BatchNorm, as it trains on one CPU process) and an FPN of 128 channels.
#   python tools/train.py configs/adapter/mask-rcnn_vit-adapter-t_fpn_shapes.py --work-dir work_dirs/adapter
#   python tools/test.py configs/adapter/mask-rcnn_vit-adapter-t_fpn_shapes.py work_dirs/adapter/iter_400.pth
_base_ = '../dense/mask-rcnn_vit-t_simplefpn_shapes.py'

model = dict(
    backbone=dict(
        _delete_=True,
        type='TokenPruneViTAdapter',
        img_size=256,
        embed_dim=192,
        depth=12,
        num_heads=3,
        drop_path_rate=0.0,
        conv_inplane=32,
        n_points=4,
        deform_num_heads=6,
        interaction_indexes=[[0, 2], [3, 5], [6, 8], [9, 11]],
        norm='BN'),
    neck=dict(_delete_=True, type='FPN', in_channels=[192, 192, 192, 192], out_channels=128, num_outs=5))
optim_wrapper = dict(paramwise_cfg=dict(custom_keys={'level_embed': dict(decay_mult=0.0)}))
