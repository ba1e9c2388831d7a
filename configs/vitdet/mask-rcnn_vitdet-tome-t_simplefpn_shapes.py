# ToMe inside the tiny windowed ViT on the embedded shapes data: ../tome/mask-rcnn_tome-t_simplefpn_shapes.py on
# the windowed backbone of ./mask-rcnn_vitdet-t_simplefpn_shapes.py (4x4 windows on the 16x16 token grid, global
# blocks 2, 5, 8, 11, relative positions). On a windowed backbone ToMe merges, computes and unmerges inside every
# block and window, as ToMe for Stable Diffusion (docs/vitdet.md, Token reduction in windowed blocks): each block
# starts from the full grid, so its keep ratio is the fraction of each window's tokens (a global block: of the
# image's) it computes on, not a running product. Here SViT's keep schedule, for comparison with
# ./mask-rcnn_vitdet-svit-t_simplefpn_shapes.py: blocks 3-11 keep 0.7 x3, 0.49 x3, 0.343 x3 (12, 8 and 6 of a
# window's 16 tokens; 180, 126 and 88 of the 256 of a global block), blocks 0-2 dense; proportional attention.
# Training-free: evaluate the windowed dense checkpoint with it switched on
#   python tools/train.py configs/vitdet/mask-rcnn_vitdet-t_simplefpn_shapes.py
#   python tools/test.py configs/vitdet/mask-rcnn_vitdet-tome-t_simplefpn_shapes.py \
#       work_dirs/mask-rcnn_vitdet-t_simplefpn_shapes/iter_400.pth
# or fine-tune from it with the reducers' shapes schedule (tools/train.py with this config).
_base_ = '../tome/mask-rcnn_tome-t_simplefpn_shapes.py'

# the windowed backbone of ./mask-rcnn_vitdet-t_simplefpn_shapes.py
model = dict(
    backbone=dict(
        window_size=4, global_block_indexes=[2, 5, 8, 11], use_rel_pos=True, rel_pos_input_size=16,
        reducer=dict(
            blocks=[3, 4, 5, 6, 7, 8, 9, 10, 11],
            keep_ratio=[0.7, 0.7, 0.7, 0.49, 0.49, 0.49, 0.343, 0.343, 0.343])))

load_from = '{{ fileDirname }}/../../work_dirs/mask-rcnn_vitdet-t_simplefpn_shapes/iter_400.pth'
