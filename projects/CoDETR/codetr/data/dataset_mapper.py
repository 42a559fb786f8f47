"""
Dataset mapper and augmentation builders of the DETR-family training recipes (spec §4).

DETR recipe (the authors' mmdet pipeline, expressed with detectron2 augmentations):

- train: horizontal flip, then with probability 0.5 each
  (a) resize the short side to one of 480, 512, ..., 800 (long side <= 1333), or
  (b) resize the short side to one of 400 / 500 / 600, crop a random region whose height and
      width are each drawn from [384, 600], resize the short side to one of 480, ..., 800;
- test: short side 800, long side <= 1333.

LSJ recipe (large-scale jitter, square ``image_size``):

- train: horizontal flip, scale the image to fit a square of side ``s * image_size`` with
  ``s ~ U(0.1, 2.0)``, crop a random ``image_size`` square region (when larger), pad the
  right and bottom to the ``image_size`` square with the value 114;
- test: scale the image so that its long side is ``image_size``, pad to the square with 114.

LSJ images leave the mapper already padded to the square, so the model sees no padding: the
whole square is the image (the authors switch the padding mask off for LSJ and normalise boxes
by the padded size, which this gives for free). At test time the mapper then sets "height" and
"width" (the resolution ``detector_postprocess`` rescales predictions to) to the padded square
mapped back to the original scale, so that predictions are rescaled by the same factor on both
axes; for a test image of original size (h, w) this is about (max(h, w), max(h, w)).

Deviations from the authors' pipelines: images are resized with detectron2's PIL bilinear
interpolation (mmdet uses OpenCV bilinear); LSJ is box-only (no copy-paste, which needs masks);
in the DETR crop branch the first resize has no long-side limit (mmdet: 4200, never reached on
COCO).
"""

import copy
import logging
import multiprocessing
from multiprocessing.context import get_spawning_popen
from multiprocessing.reduction import ForkingPickler
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import get_worker_info

from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import Instances

__all__ = [
    "DetrDatasetMapper",
    "DETR_TRAIN_MIN_SIZES",
    "LSJ_PAD_VALUE",
    "build_detr_train_augmentation",
    "build_detr_crop_train_augmentation",
    "build_detr_test_augmentation",
    "build_lsj_train_augmentation",
    "build_lsj_test_augmentation",
]

DETR_TRAIN_MIN_SIZES = tuple(range(480, 801, 32))
LSJ_PAD_VALUE = 114

AugmentationOrTransform = Union[T.Augmentation, T.Transform]


def _int_tuple(values: Sequence[int], name: str) -> tuple:
    values = tuple(int(v) for v in values)
    if not values or min(values) <= 0:
        raise ValueError(f"{name} must be a non-empty sequence of positive ints, got {values}")
    return values


def build_detr_train_augmentation(
    *, min_sizes: Sequence[int] = DETR_TRAIN_MIN_SIZES, max_size: int = 1333
) -> List[T.Augmentation]:
    """
    Branch (a) of the DETR training recipe: flip, then resize the short side to a size drawn
    from ``min_sizes`` with the long side at most ``max_size``.
    """
    return [
        T.RandomFlip(horizontal=True),
        T.ResizeShortestEdge(_int_tuple(min_sizes, "min_sizes"), max_size, sample_style="choice"),
    ]


def build_detr_crop_train_augmentation(
    *,
    crop_resize_sizes: Sequence[int] = (400, 500, 600),
    crop_size_range: Sequence[int] = (384, 600),
    min_sizes: Sequence[int] = DETR_TRAIN_MIN_SIZES,
    max_size: int = 1333,
) -> List[T.Augmentation]:
    """
    Branch (b) of the DETR training recipe: flip, resize the short side to a size drawn from
    ``crop_resize_sizes``, crop a region whose height and width are each drawn from
    ``crop_size_range`` (inclusive; clipped to the image), then resize as branch (a).
    """
    crop_size_range = _int_tuple(crop_size_range, "crop_size_range")
    if len(crop_size_range) != 2 or crop_size_range[0] > crop_size_range[1]:
        raise ValueError(f"crop_size_range must be (min, max), got {crop_size_range}")
    return [
        T.RandomFlip(horizontal=True),
        T.ResizeShortestEdge(
            _int_tuple(crop_resize_sizes, "crop_resize_sizes"), sample_style="choice"
        ),
        T.RandomCrop("absolute_range", crop_size_range),
        T.ResizeShortestEdge(_int_tuple(min_sizes, "min_sizes"), max_size, sample_style="choice"),
    ]


def build_detr_test_augmentation(
    *, min_size: int = 800, max_size: int = 1333
) -> List[T.Augmentation]:
    """Resize the short side to ``min_size`` with the long side at most ``max_size``."""
    return [T.ResizeShortestEdge(min_size, max_size)]


def _check_lsj_size(image_size: int) -> int:
    if int(image_size) <= 0:
        raise ValueError(f"image_size must be a positive int, got {image_size}")
    return int(image_size)


def build_lsj_train_augmentation(
    *, image_size: int = 1024, min_scale: float = 0.1, max_scale: float = 2.0
) -> List[T.Augmentation]:
    """
    Large-scale jitter to a fixed ``image_size`` square (see the module docstring). The flip
    comes first so that the padding always ends up at the right and bottom.
    """
    image_size = _check_lsj_size(image_size)
    if not 0 < min_scale <= max_scale:
        raise ValueError(f"need 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
    return [
        T.RandomFlip(horizontal=True),
        T.ResizeScale(min_scale, max_scale, image_size, image_size),
        T.FixedSizeCrop((image_size, image_size), pad=True, pad_value=LSJ_PAD_VALUE),
    ]


def build_lsj_test_augmentation(*, image_size: int = 1024) -> List[T.Augmentation]:
    """Scale the long side to ``image_size``, pad the right and bottom to the square."""
    image_size = _check_lsj_size(image_size)
    return [
        T.ResizeScale(1.0, 1.0, image_size, image_size),
        T.FixedSizeCrop((image_size, image_size), pad=True, pad_value=LSJ_PAD_VALUE),
    ]


class _SharedCounter:
    """
    A count shared by the process that creates it and the processes it starts afterwards
    (DataLoader workers, with the fork, spawn or forkserver start method).

    Each process increments its own slot (0: not a DataLoader worker, 1 + id: worker ``id``),
    so increments need no lock; the count is the sum of the slots.
    """

    _SLOTS = 64

    def __init__(self, initial: int = 0):
        self._slots = multiprocessing.RawArray("q", self._SLOTS)
        self._slots[0] = initial

    def increment(self) -> None:
        worker = get_worker_info()
        self._slots[0 if worker is None else 1 + worker.id % (self._SLOTS - 1)] += 1

    @property
    def value(self) -> int:
        return sum(self._slots)

    def __reduce__(self):
        if get_spawning_popen() is None:  # not starting a process (e.g. copy.deepcopy)
            return _SharedCounter, (self.value,)
        # Starting a spawn / forkserver worker: detectron2 pickles the mapper with cloudpickle,
        # which would copy the memory; multiprocessing's pickler shares it.
        return _attach_shared_slots, (bytes(ForkingPickler.dumps(self._slots)),)


def _attach_shared_slots(pickled_slots: bytes) -> _SharedCounter:
    """Unpickles a ``_SharedCounter`` in a started process, sharing its creator's memory."""
    counter = _SharedCounter.__new__(_SharedCounter)
    counter._slots = ForkingPickler.loads(pickled_slots)
    return counter


class DetrDatasetMapper:
    """
    Maps a detectron2 dataset dict (e.g. from ``load_coco_json``) to the model's input:

    - "image": uint8 tensor of shape (3, H, W) in ``image_format`` channel order, augmented;
    - "instances" (training only): ``Instances`` with "gt_boxes" (``Boxes``, XYXY absolute
      pixels of the augmented image) and "gt_classes" (int64 contiguous ids). Crowd
      annotations are dropped, boxes left empty by a crop are removed; an image without
      objects gives empty ``Instances``;
    - "height", "width": the output resolution for ``detector_postprocess`` (the original
      size; for padded test images see the module docstring);
    - "file_name", "image_id" and the other fields of the input dict, except "annotations".

    An image that cannot be read (missing, truncated, not an image, or of another size than the
    dict says) is an error naming the file in inference; in training it is skipped with a
    warning naming the file, and counted in ``skipped_images``.
    """

    def __init__(
        self,
        *,
        is_train: bool,
        augmentation: List[AugmentationOrTransform],
        augmentation_with_crop: Optional[List[AugmentationOrTransform]] = None,
        image_format: str = "RGB",
    ):
        """
        Args:
            is_train: whether to produce "instances" for training.
            augmentation: augmentations applied to every image.
            augmentation_with_crop: optional alternative list (training only); when given,
                each image uses it instead of ``augmentation`` with probability 0.5.
            image_format: channel order of the output image, "RGB" or "BGR".
        """
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        if augmentation_with_crop is not None and not is_train:
            raise ValueError("augmentation_with_crop is only used in training (is_train=True)")
        self.is_train = is_train
        self.augmentation = T.AugmentationList(list(augmentation))
        self.augmentation_with_crop = (
            None
            if augmentation_with_crop is None
            else T.AugmentationList(list(augmentation_with_crop))
        )
        self.image_format = image_format
        # Created here, before DataLoader workers start, so that they all share it.
        self._skipped_images = _SharedCounter()

        mode = "training" if is_train else "inference"
        logger = logging.getLogger(__name__)
        logger.info(f"[DetrDatasetMapper] Augmentations used in {mode}: {self.augmentation}")
        if self.augmentation_with_crop is not None:
            logger.info(f"[DetrDatasetMapper] Alternative with crop: {self.augmentation_with_crop}")

    @property
    def skipped_images(self) -> int:
        """Training images skipped as unreadable so far, by this process and its workers."""
        return self._skipped_images.value

    def __call__(self, dataset_dict: Dict) -> Optional[Dict]:
        """
        Args:
            dataset_dict: one image in detectron2's dataset format; not modified.

        Returns:
            the model input described in the class docstring; None for an unreadable image in
            training.
        """
        dataset_dict = copy.deepcopy(dataset_dict)
        file_name = dataset_dict["file_name"]
        try:
            image = utils.read_image(file_name, format=self.image_format)
            utils.check_image_size(dataset_dict, image)
        except (OSError, ValueError) as e:
            message = f"Cannot read image {file_name}: {type(e).__name__}: {e}"
            if not self.is_train:
                raise (OSError if isinstance(e, OSError) else ValueError)(message) from e
            self._skipped_images.increment()
            logging.getLogger(__name__).warning(
                f"{message}. Skipped ({self.skipped_images} training images skipped so far)"
            )
            # detectron2's MapDataset maps a random other record instead (iterable: skips it).
            return None
        original_height, original_width = image.shape[:2]

        augmentation = self.augmentation
        if self.augmentation_with_crop is not None and np.random.rand() < 0.5:
            augmentation = self.augmentation_with_crop
        aug_input = T.AugInput(image)
        transforms = augmentation(aug_input)
        image = aug_input.image
        image_shape = image.shape[:2]  # (H, W)
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))

        annotations = dataset_dict.pop("annotations", [])
        if not self.is_train:
            if any(isinstance(t, T.PadTransform) for t in transforms.transforms):
                # The padded canvas is the model's whole image: ask for predictions on the
                # canvas mapped back to the original scale (same scale factor on both axes).
                original_box = np.array([[0, 0, original_width, original_height]], np.float64)
                content_width, content_height = transforms.apply_box(original_box)[0, 2:]
                dataset_dict["height"] = image_shape[0] * original_height / content_height
                dataset_dict["width"] = image_shape[1] * original_width / content_width
            return dataset_dict

        annotations = [
            utils.transform_instance_annotations(
                {k: v for k, v in obj.items() if k not in ("segmentation", "keypoints")},
                transforms,
                image_shape,
            )
            for obj in annotations
            if obj.get("iscrowd", 0) == 0
        ]
        instances: Instances = utils.annotations_to_instances(annotations, image_shape)
        dataset_dict["instances"] = utils.filter_empty_instances(instances)
        return dataset_dict
