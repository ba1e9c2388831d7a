# COCO 2017 instance segmentation. The dataset root is one variable: the environment variable COCO_ROOT
# (default data/coco/), holding annotations/instances_{train,val}2017.json, train2017/ and val2017/; with or
# without a trailing slash (paths are joined with os.path.join, never by string concatenation).
_base_ = 'mmdet::_base_/datasets/coco_instance.py'
import os.path as osp  # noqa: E402  (after _base_: mmengine reads a config whose first statement imports as lazy)

data_root = osp.join('{{$COCO_ROOT:data/coco/}}', '')

train_dataloader = dict(dataset=dict(data_root=data_root))
val_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = val_dataloader
val_evaluator = dict(
    ann_file=osp.join(data_root, 'annotations/instances_val2017.json'),
    # all 12 COCO figures, at mmdet's maxDets (100, 300, 1000)
    metric_items=['mAP', 'mAP_50', 'mAP_75', 'mAP_s', 'mAP_m', 'mAP_l',
        'AR@100', 'AR@300', 'AR@1000', 'AR_s@1000', 'AR_m@1000', 'AR_l@1000'],)
test_evaluator = val_evaluator
