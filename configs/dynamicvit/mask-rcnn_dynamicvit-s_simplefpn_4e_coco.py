# DynamicViT as published (dropped tokens discarded: zero in the output map) on COCO 2017, DeiT-S; SViT
# reports that this variant did not converge for DeiT-S. Otherwise as the keep-pruned config.
#   tools/dist_train.sh configs/dynamicvit/mask-rcnn_dynamicvit-s_simplefpn_4e_coco.py 8
_base_ = './mask-rcnn_dynamicvit-keep-s_simplefpn_4e_coco.py'

model = dict(backbone=dict(reducer=dict(keep_pruned=False)))
