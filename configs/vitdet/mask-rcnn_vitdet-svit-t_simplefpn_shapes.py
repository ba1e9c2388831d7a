# SViT inside the tiny windowed ViT on the embedded shapes data: ../svit/mask-rcnn_svit-t_simplefpn_shapes.py on
# the windowed backbone of
# ./mask-rcnn_vitdet-t_simplefpn_shapes.py (4x4 windows on the 16x16 token grid, global blocks 2, 5, 8, 11,
# relative positions) fine-tuned with SViT's gates at blocks 3-11 (keep targets 0.7 x3, 0.49 x3, 0.343 x3, ratio
# loss weight 4, thresholds calibrated for deterministic inference; ../_base_/models/svit.py) on the shapes
# fine-tune schedule of every reducer (../dense/mask-rcnn_vit-t_simplefpn_finetune_shapes.py: 150 iterations x 4
# images, AdamW lr 1e-4, weight decay 1e-6, 20-iteration warm-up, cosine to 1e-6). Gated windowed blocks run
# each window on its kept tokens at their original places, gated global blocks the image's kept tokens
# (docs/vitdet.md, Token reduction in windowed blocks). Starts from the windowed dense checkpoint (the first
# command's default work dir; or --cfg-options load_from=...):
#   python tools/train.py configs/vitdet/mask-rcnn_vitdet-t_simplefpn_shapes.py
#   python tools/train.py configs/vitdet/mask-rcnn_vitdet-svit-t_simplefpn_shapes.py
_base_ = '../svit/mask-rcnn_svit-t_simplefpn_shapes.py'

# the windowed backbone of ./mask-rcnn_vitdet-t_simplefpn_shapes.py
model = dict(
    backbone=dict(window_size=4, global_block_indexes=[2, 5, 8, 11], use_rel_pos=True, rel_pos_input_size=16))

load_from = '{{ fileDirname }}/../../work_dirs/mask-rcnn_vitdet-t_simplefpn_shapes/iter_400.pth'
