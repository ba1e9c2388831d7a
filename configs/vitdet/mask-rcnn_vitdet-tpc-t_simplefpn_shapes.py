# TPC inside the tiny windowed ViT on the embedded shapes data: ../tpc/mask-rcnn_tpc-t_simplefpn_shapes.py on the
# windowed backbone of ./mask-rcnn_vitdet-t_simplefpn_shapes.py (4x4 windows on the 16x16 token grid, global
# blocks 2, 5, 8, 11, relative positions), fine-tuned with TPC's pause/restart controllers at blocks 3-11 (keep
# targets 0.7 x3, 0.49 x3, 0.343 x3, budget and smoothing losses, the stabilizer; ../_base_/models/tpc.py) on
# the shapes fine-tune schedule of every reducer. As SViT's (./mask-rcnn_vitdet-svit-t_simplefpn_shapes.py),
# controlled windowed blocks run each window on its active tokens at their original places at inference and
# mask the paused tokens out as keys window by window in training (docs/vitdet.md, Token reduction in windowed
# blocks); train_compute='sparse' is refused in these blocks. Starts from the windowed dense checkpoint:
#   python tools/train.py configs/vitdet/mask-rcnn_vitdet-t_simplefpn_shapes.py
#   python tools/train.py configs/vitdet/mask-rcnn_vitdet-tpc-t_simplefpn_shapes.py
_base_ = '../tpc/mask-rcnn_tpc-t_simplefpn_shapes.py'

# the windowed backbone of ./mask-rcnn_vitdet-t_simplefpn_shapes.py
model = dict(
    backbone=dict(window_size=4, global_block_indexes=[2, 5, 8, 11], use_rel_pos=True, rel_pos_input_size=16))

load_from = '{{ fileDirname }}/../../work_dirs/mask-rcnn_vitdet-t_simplefpn_shapes/iter_400.pth'
