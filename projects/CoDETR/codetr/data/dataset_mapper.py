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

Instance masks (``use_instance_mask=True``, training only): "gt_masks" go through every
augmentation with the boxes (detectron2's ``transform_instance_annotations``: polygons are
transformed exactly, then kept as ``PolygonMasks`` or rasterised to ``BitMasks`` at the
augmented size). When the image was cropped (a ``CropTransform`` among its transforms: the
DETR crop branch, and LSJ always, whose ``FixedSizeCrop`` crops even a smaller image, to its
full size), the boxes are recomputed from the cropped masks, as detectron2's
``recompute_boxes`` and the authors' LSJ ``RandomCrop(recompute_bbox=True)``: a clipped box is
no longer tight around the visible part of the object. Uncropped images keep their annotated
boxes. LSJ with masks can add copy-paste (``copy_paste=CopyPaste(...)``, see
``copy_paste.py``), as the authors' LSJ instance recipes; box-only LSJ has none.

Deviations from the authors' pipelines: images are resized with detectron2's PIL bilinear
interpolation (mmdet uses OpenCV bilinear); masks are transformed as polygons and rasterised
at the augmented size (mmdet rasterises at the original size and resizes the bitmap with
nearest-neighbour interpolation); box-only LSJ has no copy-paste (it needs masks); in the
DETR crop branch the first resize has no long-side limit (mmdet: 4200, never reached on
COCO).
"""

import collections
import copy
import importlib.util
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
from detectron2.structures import BitMasks, Instances, PolygonMasks

from .copy_paste import CopyPaste

__all__ = [
    "DetrDatasetMapper",
    "INSTANCE_MASK_FORMATS",
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
INSTANCE_MASK_FORMATS = ("polygon", "bitmask")

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
      pixels of the augmented image), "gt_classes" (int64 contiguous ids) and, with
      ``use_instance_mask``, "gt_masks" (``PolygonMasks`` or ``BitMasks`` of the augmented
      image). Crowd annotations are dropped, objects left empty by a crop are removed (boxes
      and masks together: detectron2's ``filter_empty_instances``); an image without objects
      gives empty ``Instances`` (with empty "gt_masks" of the image's size);
    - "height", "width": the output resolution for ``detector_postprocess`` (the original
      size; for padded test images see the module docstring);
    - "file_name", "image_id" and the other fields of the input dict, except "annotations".

    An image that cannot be read (missing, truncated, not an image, or of another size than the
    dict says) is an error naming the file in inference; in training it is skipped with a
    warning naming the file, and counted in ``skipped_images``. With ``use_instance_mask``, a
    non-crowd annotation without "segmentation" is an error naming the file and the
    annotation's index (``load_checked_dataset_dicts(require_masks=True)`` finds them all
    before training).
    """

    def __init__(
        self,
        *,
        is_train: bool,
        augmentation: List[AugmentationOrTransform],
        augmentation_with_crop: Optional[List[AugmentationOrTransform]] = None,
        image_format: str = "RGB",
        use_instance_mask: bool = False,
        instance_mask_format: str = "polygon",
        copy_paste: Optional[CopyPaste] = None,
    ):
        """
        Args:
            is_train: whether to produce "instances" for training.
            augmentation: augmentations applied to every image.
            augmentation_with_crop: optional alternative list (training only); when given,
                each image uses it instead of ``augmentation`` with probability 0.5.
            image_format: channel order of the output image, "RGB" or "BGR".
            use_instance_mask: add "gt_masks" to the training instances (from each
                annotation's "segmentation": polygons, or RLE with "bitmask"); boxes of cropped
                images are then recomputed from the masks (see the module docstring).
            instance_mask_format: "polygon" (``PolygonMasks``) or "bitmask" (``BitMasks``),
                as detectron2's ``DatasetMapper``.
            copy_paste: paste objects of another training image onto each image (training
                only; needs ``use_instance_mask`` with "bitmask" and a fixed-size
                augmentation such as LSJ). See ``copy_paste.py`` for where the other image
                comes from.
        """
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        if augmentation_with_crop is not None and not is_train:
            raise ValueError("augmentation_with_crop is only used in training (is_train=True)")
        if instance_mask_format not in INSTANCE_MASK_FORMATS:
            raise ValueError(
                f"instance_mask_format must be one of {INSTANCE_MASK_FORMATS}, "
                f"got {instance_mask_format!r}"
            )
        if copy_paste is not None:
            if not is_train:
                raise ValueError("copy_paste is only used in training (is_train=True)")
            if not (use_instance_mask and instance_mask_format == "bitmask"):
                raise ValueError(
                    "copy_paste needs instance masks as bitmaps: use_instance_mask=True, "
                    f'instance_mask_format="bitmask" (got use_instance_mask={use_instance_mask}, '
                    f"instance_mask_format={instance_mask_format!r})"
                )
        if is_train and use_instance_mask and importlib.util.find_spec("shapely") is None:
            # detectron2 crops polygons with shapely, imported only when a crop happens
            raise ImportError(
                "use_instance_mask=True needs shapely (detectron2 crops polygon masks with it): "
                "pip install -e .[masks] (or pip install shapely)"
            )
        self.is_train = is_train
        self.augmentation = T.AugmentationList(list(augmentation))
        self.augmentation_with_crop = (
            None
            if augmentation_with_crop is None
            else T.AugmentationList(list(augmentation_with_crop))
        )
        self.image_format = image_format
        self.use_instance_mask = bool(use_instance_mask)
        self.instance_mask_format = instance_mask_format
        self.copy_paste = copy_paste
        # Dataset dicts recently mapped by this process, the sources of copy-paste.
        self._copy_paste_sources: Optional[collections.deque] = (
            None if copy_paste is None else collections.deque(maxlen=copy_paste.source_pool_size)
        )
        # Created here, before DataLoader workers start, so that they all share it.
        self._skipped_images = _SharedCounter()

        mode = "training" if is_train else "inference"
        logger = logging.getLogger(__name__)
        logger.info(f"[DetrDatasetMapper] Augmentations used in {mode}: {self.augmentation}")
        if self.augmentation_with_crop is not None:
            logger.info(f"[DetrDatasetMapper] Alternative with crop: {self.augmentation_with_crop}")
        if is_train and self.use_instance_mask:
            logger.info(
                f"[DetrDatasetMapper] Instance masks as {instance_mask_format}s; "
                f"copy-paste: {copy_paste}"
            )

    @property
    def skipped_images(self) -> int:
        """Training images skipped as unreadable so far, by this process and its workers."""
        return self._skipped_images.value

    def _read_image(self, dataset_dict: Dict) -> Optional[np.ndarray]:
        """
        The image of ``dataset_dict``; None when it cannot be read in training (after a
        warning, counted in ``skipped_images``). Raises in inference.
        """
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
            return None
        return image

    def _augment(self, image: np.ndarray) -> tuple:
        """Returns the augmented image and the transforms applied (a ``TransformList``)."""
        augmentation = self.augmentation
        if self.augmentation_with_crop is not None and np.random.rand() < 0.5:
            augmentation = self.augmentation_with_crop
        aug_input = T.AugInput(image)
        transforms = augmentation(aug_input)
        return aug_input.image, transforms

    def _check_segmentations(self, annotations: List[Dict], file_name: str) -> None:
        for index, obj in enumerate(annotations):
            if obj.get("iscrowd", 0) == 0 and "segmentation" not in obj:
                raise ValueError(
                    f'Annotation {index} of {file_name} has no "segmentation", but the train '
                    "mapper was built with use_instance_mask=True (instance masks): give every "
                    "non-crowd object a mask, or train without masks. (detectron2's "
                    "load_coco_json leaves the key out when the json has no valid polygon.)"
                )

    def _annotations_to_instances(
        self, annotations: List[Dict], transforms: T.TransformList, image_shape: tuple
    ) -> Instances:
        """The training ``Instances`` of the augmented image (see the class docstring)."""
        dropped = ("keypoints",) if self.use_instance_mask else ("segmentation", "keypoints")
        annotations = [
            # a copy: transform_instance_annotations modifies the dict it is given
            utils.transform_instance_annotations(
                {k: v for k, v in obj.items() if k not in dropped}, transforms, image_shape
            )
            for obj in annotations
            if obj.get("iscrowd", 0) == 0
        ]
        if not self.use_instance_mask:
            instances = utils.annotations_to_instances(annotations, image_shape)
            return utils.filter_empty_instances(instances)

        instances = utils.annotations_to_instances(
            annotations, image_shape, mask_format=self.instance_mask_format
        )
        if not instances.has("gt_masks"):  # no objects: detectron2 adds no field
            if self.instance_mask_format == "polygon":
                instances.gt_masks = PolygonMasks([])
            else:
                instances.gt_masks = BitMasks(torch.zeros((0, *image_shape), dtype=torch.bool))
        if any(isinstance(t, T.CropTransform) for t in transforms.transforms):
            instances.gt_boxes = instances.gt_masks.get_bounding_boxes()
        return utils.filter_empty_instances(instances)

    def _map_training(self, dataset_dict: Dict, image: np.ndarray) -> tuple:
        """Augments a training image and its annotations: (image, instances)."""
        annotations = dataset_dict.get("annotations", [])
        if self.use_instance_mask:
            self._check_segmentations(annotations, dataset_dict["file_name"])
        image, transforms = self._augment(image)
        return image, self._annotations_to_instances(annotations, transforms, image.shape[:2])

    def _paste(self, image: np.ndarray, instances: Instances, source: Dict, file_name: str):
        """Applies ``copy_paste`` with the objects of dataset dict ``source``."""
        source_image = self._read_image(source)
        if source_image is None:
            return image, instances  # warned about and counted
        source_image, source_instances = self._map_training(source, source_image)
        if source_image.shape != image.shape:
            raise ValueError(
                f"copy-paste needs images of one size after augmentation, got {image.shape} "
                f"for {file_name} and {source_image.shape} for {source['file_name']}: use a "
                "fixed-size augmentation (e.g. LSJ)"
            )
        return self.copy_paste(image, instances, source_image, source_instances)

    def __call__(self, dataset_dict: Dict) -> Optional[Dict]:
        """
        Args:
            dataset_dict: one image in detectron2's dataset format; not modified.

        Returns:
            the model input described in the class docstring; None for an unreadable image in
            training.
        """
        dataset_dict = copy.deepcopy(dataset_dict)
        image = self._read_image(dataset_dict)
        if image is None:
            # detectron2's MapDataset maps a random other record instead (iterable: skips it).
            return None

        if not self.is_train:
            original_height, original_width = image.shape[:2]
            image, transforms = self._augment(image)
            image_shape = image.shape[:2]  # (H, W)
            dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
            dataset_dict.pop("annotations", None)
            if any(isinstance(t, T.PadTransform) for t in transforms.transforms):
                # The padded canvas is the model's whole image: ask for predictions on the
                # canvas mapped back to the original scale (same scale factor on both axes).
                original_box = np.array([[0, 0, original_width, original_height]], np.float64)
                content_width, content_height = transforms.apply_box(original_box)[0, 2:]
                dataset_dict["height"] = image_shape[0] * original_height / content_height
                dataset_dict["width"] = image_shape[1] * original_width / content_width
            return dataset_dict

        image, instances = self._map_training(dataset_dict, image)
        if self.copy_paste is not None:
            sources = self._copy_paste_sources
            source = sources[np.random.randint(len(sources))] if sources else None
            sources.append(copy.deepcopy(dataset_dict))  # a source for the next images
            if source is not None:
                image, instances = self._paste(image, instances, source, dataset_dict["file_name"])
        dataset_dict.pop("annotations", None)
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        dataset_dict["instances"] = instances
        return dataset_dict
