# Mask R-CNN with a DeiT-S backbone and ViTDet's simple pyramid (configs/dense/mask-rcnn_deit-s_simplefpn_3x_coco.py)
# on your own COCO-format dataset with its own classes. Copy this file and edit the block below: it is the one
# place that sets the data, the class names (and with them the heads' sizes), the image sizes and the schedule;
# the rest of the file passes them on to the train, val and test settings. See docs/own_data.md, also for a short
# first run. A copy outside configs/examples/ needs _base_ as an absolute path (or relative to the copy).
#   python tools/train.py my_config.py
#   python tools/test.py my_config.py work_dirs/my_config/epoch_36.pth --metrics-out metrics.json
# Backbone weights: ImageNet DeiT-S from checkpoints/deit_small_patch16_224-cd65a155.pth (see README.md), or
# --cfg-options model.backbone.init_cfg.checkpoint=/path/to/file.pth (model.backbone.init_cfg=None: random init).
_base_ = '../dense/mask-rcnn_deit-s_simplefpn_3x_coco.py'
import os.path as osp  # noqa: E402  (after _base_: mmengine reads a config whose first statement imports as lazy)

# ---- edit here ------------------------------------------------------------------------------------------------
data_root = 'data/my_coco/'  # the paths below are relative to it
classes = ('cat', 'dog')  # category names, in the annotation files' order; label i is classes[i]
train_split = ('annotations/instances_train2017.json', 'train2017/')  # (annotation file, image folder)
val_split = ('annotations/instances_val2017.json', 'val2017/')  # evaluated after every training epoch
test_split = ('annotations/instances_val2017.json', 'val2017/')  # evaluated by tools/test.py
train_scales = [(1333, 640), (1333, 800)]  # (long, short) side limits; training draws one between the two
test_scale = (1333, 800)  # the same for val and test
batch_size = 2  # images per GPU; the learning rate is set for 16 in all (8 GPUs x 2), see --auto-scale-lr
max_epochs = 36
lr_steps = [27, 33]  # epochs after which the learning rate drops x0.1
warmup_iters = 500  # linear warm-up, in iterations, well below the run's total; 0: none
# ----------------------------------------------------------------------------------------------------------------

metainfo = dict(classes=classes)
model = dict(roi_head=dict(bbox_head=dict(num_classes=len(classes)), mask_head=dict(num_classes=len(classes))))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomResize', scale=train_scales, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=test_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
# val and test are separate settings (the base's test_dataloader = val_dataloader is a copy, not a link):
# each gets the data, classes and pipeline here
train_dataloader = dict(
    batch_size=batch_size,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file=train_split[0],
        data_prefix=dict(img=train_split[1]),
        pipeline=train_pipeline))
val_dataloader = dict(
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file=val_split[0],
        data_prefix=dict(img=val_split[1]),
        pipeline=test_pipeline))
test_dataloader = dict(
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file=test_split[0],
        data_prefix=dict(img=test_split[1]),
        pipeline=test_pipeline))
val_evaluator = dict(ann_file=osp.join(data_root, val_split[0]))
test_evaluator = dict(ann_file=osp.join(data_root, test_split[0]))

train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=warmup_iters),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=lr_steps, gamma=0.1),
]
if warmup_iters < 2:  # mmengine's LinearLR reaches the full rate at iteration end - 1: with end=1 it never does
    param_scheduler = param_scheduler[1:]
