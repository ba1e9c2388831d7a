# PPT (Wu et al.), training-free, on the dense COCO DeiT-S Mask R-CNN (3x): blocks 3, 6, 9 prune or pool per
# image (coefficient-of-variation test, threshold 1.64), keep ratios 146/196, 96/146, 48/96, tokens scored by
# the attention they receive (the detection ViT has no class token; see docs/reducers/ppt.md).
#   tools/dist_test.sh configs/ppt/mask-rcnn_ppt-s_simplefpn_coco.py \
#       work_dirs/mask-rcnn_deit-s_simplefpn_3x_coco/epoch_36.pth 8
_base_ = ['../dense/mask-rcnn_deit-s_simplefpn_3x_coco.py', '../_base_/models/ppt.py']

load_from = 'work_dirs/mask-rcnn_deit-s_simplefpn_3x_coco/epoch_36.pth'
model = dict(
    type='TokenPruneMaskRCNN',
    backbone=dict(
        init_cfg=None,  # all weights come from the dense checkpoint
        reducer={{_base_.ppt_reducer}}))
custom_hooks = {{_base_.ppt_hooks}}
