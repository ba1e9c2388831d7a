# ToMe (Bolya et al., ICLR 2023), training-free, on the dense COCO DeiT-S Mask R-CNN (3x): every block keeps
# 0.875 of its patch tokens by bipartite soft matching, proportional attention, exact unmerge.
#   tools/dist_test.sh configs/tome/mask-rcnn_tome-s_simplefpn_coco.py \
#       work_dirs/mask-rcnn_deit-s_simplefpn_3x_coco/epoch_36.pth 8
_base_ = ['../dense/mask-rcnn_deit-s_simplefpn_3x_coco.py', '../_base_/models/tome.py']

load_from = 'work_dirs/mask-rcnn_deit-s_simplefpn_3x_coco/epoch_36.pth'
model = dict(
    type='TokenPruneMaskRCNN',
    backbone=dict(
        init_cfg=None,  # all weights come from the dense checkpoint
        reducer={{_base_.tome_reducer}}))
custom_hooks = {{_base_.tome_hooks}}
