# Dense ViT-Adapter-T Mask R-CNN on COCO 2017 (SViT's official vit-adapter-t-3x.py): DeiT-T (192 channels,
# 3 heads), drop path 0.1; otherwise as mask-rcnn_vit-adapter-s_fpn_3x_coco.py. Published: 45.8 box AP /
# 40.9 mask AP. ImageNet DeiT-T weights from a local file (deit_tiny_patch16_224-a1311bcf.pth, DeiT release).
#   tools/dist_train.sh configs/adapter/mask-rcnn_vit-adapter-t_fpn_3x_coco.py 8 --amp
_base_ = './mask-rcnn_vit-adapter-s_fpn_3x_coco.py'

model = dict(
    backbone=dict(
        embed_dim=192,
        num_heads=3,
        drop_path_rate=0.1,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/deit_tiny_patch16_224-a1311bcf.pth')),
    neck=dict(in_channels=[192, 192, 192, 192]))
