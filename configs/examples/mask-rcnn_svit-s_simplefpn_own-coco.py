# SViT on your own COCO-format dataset: fine-tunes the dense model of mask-rcnn_deit-s_simplefpn_own-coco.py with
# SViT's recipe (configs/svit/mask-rcnn_svit-s_simplefpn_4e_coco.py: gates at blocks 3-11, AdamW 1e-5, 4 epochs).
# The data, classes and image sizes come from that file (edit them there, once); the block below sets the
# fine-tune's own length. Copy both files into one folder and run the dense one first (docs/own_data.md):
#   python tools/train.py my_dense.py
#   python tools/train.py my_svit.py        # load_from: the dense model's last checkpoint
#   python tools/test.py my_svit.py work_dirs/my_svit/epoch_4.pth --metrics-out metrics.json
_base_ = [
    './mask-rcnn_deit-s_simplefpn_own-coco.py',
    '../_base_/models/svit.py',
    '../_base_/schedules/svit_finetune.py',
]

# ---- edit here ------------------------------------------------------------------------------------------------
load_from = 'work_dirs/mask-rcnn_deit-s_simplefpn_own-coco/epoch_36.pth'  # the dense model to start from
max_epochs = 4
lr_steps = [3]  # epochs after which the learning rate drops x0.1
warmup_iters = 500  # linear warm-up, in iterations, well below the run's total; 0: none
calibration_batches = 50  # after the last iteration: this many batches of 4 training images through the backbone
# ----------------------------------------------------------------------------------------------------------------

model = dict(
    type='TokenPruneMaskRCNN',
    backbone=dict(
        init_cfg=None,  # all weights come from load_from
        reducer={{_base_.svit_reducer}}))

train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=warmup_iters),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=lr_steps, gamma=0.1),
]
if warmup_iters < 2:  # mmengine's LinearLR reaches the full rate at iteration end - 1: with end=1 it never does
    param_scheduler = param_scheduler[1:]
optim_wrapper = dict(optimizer={{_base_.finetune_optimizer}})
custom_hooks = [dict(type='TokenStatsHook'), dict(type='SViTCalibrationHook', num_batches=calibration_batches)]
