# Dense baseline on COCO 2017 with a DeiT-B backbone; otherwise as mask-rcnn_deit-s_simplefpn_3x_coco.py.
# ImageNet DeiT-B weights from a local file: checkpoints/deit_base_patch16_224-b5f2ef4d.pth (DeiT release).
_base_ = './mask-rcnn_deit-s_simplefpn_3x_coco.py'

model = dict(
    backbone=dict(
        embed_dim=768,
        num_heads=12,
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/deit_base_patch16_224-b5f2ef4d.pth')),
    neck=dict(in_channels=768))
