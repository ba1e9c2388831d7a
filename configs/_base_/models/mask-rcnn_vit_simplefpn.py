# Mask R-CNN with a plain ViT backbone (tokenprune's TokenPruneViT, DeiT-S shape by default) and ViTDet's
# simple feature pyramid. MMDetection's own Mask R-CNN supplies the heads.
_base_ = 'mmdet::_base_/models/mask-rcnn_r50_fpn.py'

custom_imports = dict(imports=['tokenprune'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='TokenPruneViT',
        img_size=224,
        patch_size=16,
        embed_dim=384,
        depth=12,
        num_heads=6,
        mlp_ratio=4.0,
        cls_token=False,
        final_norm=True,
        drop_path_rate=0.1),
    neck=dict(_delete_=True, type='ViTDetFPN', in_channels=384, out_channels=256, num_outs=5),
    rpn_head=dict(num_convs=2))
