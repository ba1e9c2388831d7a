# DynamicViT + keep pruned tokens, fine-tuned from the main job's dense model on the embedded shapes data:
# predictors before blocks 3, 6, 9, keep ratios 0.7, 0.49, 0.343, ratio loss weight 2; dropped tokens keep
# their last value in the output map. Train the dense model first (or let tools/demo.py do it):
#   python tools/train.py configs/dynamicvit/mask-rcnn_dynamicvit-keep-t_simplefpn_shapes.py \
#       --work-dir work_dirs/dynamicvit-keep
_base_ = ['../dense/mask-rcnn_vit-t_simplefpn_finetune_shapes.py', '../_base_/models/dynamicvit.py']

model = dict(
    type='TokenPruneMaskRCNN',
    backbone=dict(
        reducer={{_base_.dynamicvit_reducer}}))

custom_hooks = {{_base_.dynamicvit_hooks}}
