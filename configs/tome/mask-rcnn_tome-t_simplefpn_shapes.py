# ToMe (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023), training-free, on the main job's dense
# model and the embedded shapes data: in every block, bipartite soft matching merges the most similar tokens
# (each block keeps 0.875 of its patch tokens: 0.2 after 12 blocks, the final count of the paper's DeiT-S
# r = 13), proportional attention; every merged token is copied back to all its positions (exact unmerge).
# Evaluate the dense checkpoint with it (train the dense model first, or let tools/demo.py do it):
#   python tools/test.py configs/tome/mask-rcnn_tome-t_simplefpn_shapes.py work_dirs/demo/dense/iter_400.pth
_base_ = '../dense/mask-rcnn_vit-t_simplefpn_shapes.py'

load_from = '{{ fileDirname }}/../../work_dirs/demo/dense/iter_400.pth'
tome_reducer = dict(type='ToMe', blocks=None, keep_ratio=0.875, prop_attn=True)
model = dict(
    type='TokenPruneMaskRCNN',
    backbone=dict(reducer=tome_reducer))
custom_hooks = [dict(type='TokenStatsHook')]
