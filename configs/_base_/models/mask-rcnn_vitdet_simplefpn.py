# ViTDet's Mask R-CNN (Li et al., "Exploring Plain Vision Transformer Backbones for Object Detection", ECCV 2022;
# detectron2's projects/ViTDet configs/common/models/mask_rcnn_vitdet.py, ported in MMDetection's
# projects/ViTDet/configs/vitdet_mask-rcnn_vit-b-mae_lsj-100e.py), ViT-B:
# - backbone: tokenprune's TokenPruneViT as ViTDet's ViT-B (tokenprune.models.vitdet_base): 768 channels, 12 blocks,
#   12 heads, 14x14 window attention in every block but the global 2, 5, 8, 11 (padding of the token grid to a
#   multiple of the window inside windowed blocks), decomposed relative position embeddings (the global blocks'
#   tables built for the 64x64 grid of a 1024-pixel input), absolute position embeddings stored at the 224
#   pre-training grid (14x14) and resized bicubically to the input's grid, no class token, no final norm,
#   LayerNorm eps 1e-6, drop-path 0.1;
# - neck: ViTDet's simple feature pyramid with LayerNorm (ViTDetFPN, strides 4-32 plus 64 by subsampling);
# - heads: MMDetection's Mask R-CNN with a two-conv RPN head, the 4conv1fc box head and LayerNorm after every conv
#   of the box and mask heads (detectron2's conv_norm='LN': a channel LayerNorm with eps 1e-6).
_base_ = 'mmdet::_base_/models/mask-rcnn_r50_fpn.py'

custom_imports = dict(imports=['tokenprune'], allow_failed_imports=False)

head_norm_cfg = dict(type='ViTDetLN2d', eps=1e-6)

model = dict(
    backbone=dict(
        _delete_=True,
        type='TokenPruneViT',
        img_size=224,
        patch_size=16,
        embed_dim=768,
        depth=12,
        num_heads=12,
        mlp_ratio=4.0,
        qkv_bias=True,
        cls_token=False,
        final_norm=False,
        drop_path_rate=0.1,
        window_size=14,
        global_block_indexes=[2, 5, 8, 11],
        use_rel_pos=True,
        rel_pos_input_size=64,
        norm_eps=1e-6),
    neck=dict(_delete_=True, type='ViTDetFPN', in_channels=768, out_channels=256, num_outs=5),
    rpn_head=dict(num_convs=2),
    roi_head=dict(
        bbox_head=dict(type='Shared4Conv1FCBBoxHead', conv_out_channels=256, norm_cfg=head_norm_cfg),
        mask_head=dict(norm_cfg=head_norm_cfg)))
