# A tiny windowed ViT (ViTDet's attention at DeiT-T width) on the embedded shapes data, for tests and studies:
# the dense shapes model (../dense/mask-rcnn_vit-t_simplefpn_shapes.py: 192 channels, 12 blocks, 3 heads, narrow
# heads, 400 iterations from scratch, which it keeps so that the two differ only in the attention) with 4x4
# windows on the 16x16 token grid of the 256x256 images (16 windows) in every block but the global 2, 5, 8, 11,
# as ViTDet-B, and decomposed relative position embeddings (the global blocks' tables for the 16x16 grid).
#   python tools/train.py configs/vitdet/mask-rcnn_vitdet-t_simplefpn_shapes.py
_base_ = '../dense/mask-rcnn_vit-t_simplefpn_shapes.py'

model = dict(
    backbone=dict(window_size=4, global_block_indexes=[2, 5, 8, 11], use_rel_pos=True, rel_pos_input_size=16))
