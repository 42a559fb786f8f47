"""LVIS v1 detection with the DETR augmentation recipe: detectron2's builtin ``lvis_v1_train`` /
``lvis_v1_val`` (1203 classes; the images are COCO's, see detectron2's datasets/README.md for
the layout under $DETECTRON2_DATASETS).

Training samples images by repeat factor (detectron2's ``RepeatFactorTrainingSampler``, the
authors' ``ClassBalancedDataset(oversample_thr=1e-3)``): an image is repeated
max(1, sqrt(0.001 / f)) times, f the image frequency of its rarest class. Evaluation is
``codetr.evaluation.LVISEvaluator`` (detectron2's, runnable with the PyPI ``lvis`` 0.5.3 and
numpy >= 1.24) on up to 1000 detections per image (LVIS's own limit).
"""

from detectron2.config import LazyCall as L
from detectron2.data.samplers import RepeatFactorTrainingSampler

from codetr.evaluation import LVISEvaluator

from .coco import dataloader

dataloader.train.dataset.names = "lvis_v1_train"
dataloader.train.sampler = L(RepeatFactorTrainingSampler)(
    repeat_factors=L(RepeatFactorTrainingSampler.repeat_factors_from_category_frequency)(
        dataset_dicts="${dataloader.train.dataset}", repeat_thresh=0.001
    )
)
dataloader.test.dataset.names = "lvis_v1_val"
dataloader.evaluator = L(LVISEvaluator)(
    dataset_name="${..test.dataset.names}", max_dets_per_image=1000, output_dir=None
)
