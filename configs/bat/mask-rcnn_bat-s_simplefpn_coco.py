# BAT (Long et al., CVPR 2023), training-free, on the dense COCO DeiT-S Mask R-CNN (3x): blocks 3, 6, 9 keep
# the 0.7 most attentive patch tokens, merge DPC-KNN clusters of the inattentive ones and homogeneous attentive
# pairs (ceil(0.7 n) + 1 tokens handed on), tokens scored by the attention they receive (no class token).
#   tools/dist_test.sh configs/bat/mask-rcnn_bat-s_simplefpn_coco.py \
#       work_dirs/mask-rcnn_deit-s_simplefpn_3x_coco/epoch_36.pth 8
_base_ = ['../dense/mask-rcnn_deit-s_simplefpn_3x_coco.py', '../_base_/models/bat.py']

load_from = 'work_dirs/mask-rcnn_deit-s_simplefpn_3x_coco/epoch_36.pth'
model = dict(
    type='TokenPruneMaskRCNN',
    backbone=dict(
        init_cfg=None,  # all weights come from the dense checkpoint
        reducer={{_base_.bat_reducer}}))
custom_hooks = {{_base_.bat_hooks}}
