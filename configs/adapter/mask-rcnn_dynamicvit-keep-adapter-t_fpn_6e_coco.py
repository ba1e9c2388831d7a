# DynamicViT + keep pruned tokens on ViT-Adapter-T (COCO 2017): as mask-rcnn_dynamicvit-adapter-t_fpn_6e_coco.py
# with dropped tokens kept in the map. Published: 44.1 box AP / 39.3 mask AP.
_base_ = './mask-rcnn_dynamicvit-adapter-t_fpn_6e_coco.py'

model = dict(backbone=dict(reducer=dict(keep_pruned=True)))
