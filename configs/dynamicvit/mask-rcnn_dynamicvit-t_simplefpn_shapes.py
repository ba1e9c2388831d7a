# DynamicViT as published (dropped tokens discarded: zero in the output map), otherwise as
# mask-rcnn_dynamicvit-keep-t_simplefpn_shapes.py:
#   python tools/train.py configs/dynamicvit/mask-rcnn_dynamicvit-t_simplefpn_shapes.py --work-dir work_dirs/dynamicvit
_base_ = './mask-rcnn_dynamicvit-keep-t_simplefpn_shapes.py'

model = dict(backbone=dict(reducer=dict(keep_pruned=False)))
