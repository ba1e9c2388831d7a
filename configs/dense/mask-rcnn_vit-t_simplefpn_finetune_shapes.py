# The shapes fine-tune schedule, shared by every reducer's shapes config, and on its own the "dense continued"
# control: the main job's dense model trained further with exactly the reducers' schedule (150 iterations x 4
# images, AdamW lr 1e-4, weight decay 1e-6, 20-iteration warm-up, cosine to 1e-6), so that a reducer's gap to
# dense is not just the extra iterations. Starts from the dense checkpoint (train it first, or let
# tools/demo.py do it):
#   python tools/train.py configs/dense/mask-rcnn_vit-t_simplefpn_finetune_shapes.py --work-dir work_dirs/dense-ft
# A method's shapes config is this plus its reducer:
#   _base_ = ['../dense/mask-rcnn_vit-t_simplefpn_finetune_shapes.py', '../_base_/models/<method>.py']
#   model = dict(type='TokenPruneMaskRCNN', backbone=dict(reducer={{_base_.<method>_reducer}}))
#   custom_hooks = {{_base_.<method>_hooks}}
# The same config evaluates the dense checkpoint training-free (tools/test.py CONFIG dense.pth).
_base_ = './mask-rcnn_vit-t_simplefpn_shapes.py'

load_from = '{{ fileDirname }}/../../work_dirs/demo/dense/iter_400.pth'
max_iters = 150
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=20),
    dict(type='CosineAnnealingLR', by_epoch=False, begin=20, end=max_iters, eta_min=1e-6),
]
optim_wrapper = dict(optimizer=dict(lr=1e-4, weight_decay=1e-6))
