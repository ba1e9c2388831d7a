# DynamicViT + keep pruned tokens on ViT-Adapter-S (COCO 2017): as mask-rcnn_dynamicvit-adapter-s_fpn_4e_coco.py,
# but a dropped token keeps its last value in the map (the variant SViT's paper compares with). Published:
# 47.2 box AP / 41.6 mask AP.
_base_ = './mask-rcnn_dynamicvit-adapter-s_fpn_4e_coco.py'

model = dict(backbone=dict(reducer=dict(keep_pruned=True)))
