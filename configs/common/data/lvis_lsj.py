"""LVIS v1 (``lvis.py``: repeat-factor sampling, ``LVISEvaluator``) with the large-scale jitter
of ``coco_lsj.py`` (a 1024 square; box-only: the authors' recipe also pastes objects between
images, which needs masks)."""

from .coco_lsj import dataloader as lsj
from .lvis import dataloader

dataloader.train.mapper = lsj.train.mapper
dataloader.test.mapper = lsj.test.mapper
