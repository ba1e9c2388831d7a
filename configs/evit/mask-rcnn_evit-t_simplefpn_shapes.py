# EViT on the main job's dense model, embedded shapes data: keep 0.7 at blocks 3, 6, 9 with the CLS-free
# score, inattentive tokens fused. Training-free: evaluate the dense checkpoint with EViT switched on
#   python tools/test.py configs/evit/mask-rcnn_evit-t_simplefpn_shapes.py work_dirs/demo/dense/iter_400.pth
# or fine-tune from it (150 iterations, as SViT's shapes config) and evaluate the result:
#   python tools/train.py configs/evit/mask-rcnn_evit-t_simplefpn_shapes.py --work-dir work_dirs/evit
_base_ = ['../dense/mask-rcnn_vit-t_simplefpn_finetune_shapes.py', '../_base_/models/evit.py']

model = dict(
    type='TokenPruneMaskRCNN',
    backbone=dict(
        reducer={{_base_.evit_reducer}}))

custom_hooks = {{_base_.evit_hooks}}
