# Dense baseline on COCO 2017 with a DeiT-T backbone; otherwise as mask-rcnn_deit-s_simplefpn_3x_coco.py.
# ImageNet DeiT-T weights from a local file: checkpoints/deit_tiny_patch16_224-a1311bcf.pth (DeiT release).
_base_ = './mask-rcnn_deit-s_simplefpn_3x_coco.py'

model = dict(
    backbone=dict(
        embed_dim=192,
        num_heads=3,
        drop_path_rate=0.1,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/deit_tiny_patch16_224-a1311bcf.pth')),
    neck=dict(in_channels=192))
