"""
Single-image inference for demos, configured by a LazyConfig (detectron2's
``DefaultPredictor`` reads yacs keys).
"""

import logging
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch
from detectron2.config import configurable, instantiate
from detectron2.data import transforms as T
from detectron2.data.detection_utils import read_image
from detectron2.structures import Instances
from omegaconf import DictConfig

from .checkpointer import AtomicCheckpointer, min_loaded_shares
from .device import autocast_to, inference_precision, train_device

__all__ = ["LazyPredictor", "prepare_image", "test_augmentations"]

logger = logging.getLogger(__name__)


def test_augmentations(cfg: DictConfig) -> List[T.Augmentation]:
    """The test augmentations of ``cfg.dataloader.test.mapper``: its ``augmentation`` or, for
    detectron2's ``DatasetMapper``, ``augmentations``."""
    mapper = cfg.dataloader.test.mapper
    key = "augmentation" if "augmentation" in mapper else "augmentations"
    if key not in mapper:
        raise KeyError("cfg.dataloader.test.mapper has no 'augmentation(s)' list")
    return list(instantiate(mapper[key]))


def prepare_image(
    image: Union[str, np.ndarray],
    *,
    input_format: str,
    augmentations: T.AugmentationList,
) -> Dict[str, Any]:
    """
    One image as a detector's input: read as BGR (a path) or taken as an (H, W, 3) uint8 BGR
    array, converted to ``input_format``, transformed by ``augmentations``.

    Returns:
        {"image": (3, H', W') uint8 tensor, "height", "width"}: the size to rescale the
        detections to, the original image's (for augmentations that pad, LSJ, the whole padded
        canvas at the original scale, as the test mapper ``codetr.data.DetrDatasetMapper``).
    """
    if isinstance(image, str):
        image = read_image(image, format="BGR")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
    height, width = image.shape[:2]
    if input_format == "RGB":
        image = image[:, :, ::-1]
    aug_input = T.AugInput(np.ascontiguousarray(image))
    transforms = augmentations(aug_input)
    image = aug_input.image
    if any(isinstance(t, T.PadTransform) for t in transforms.transforms):
        # Predictions cover the padded canvas: map it back at the original scale.
        content_box = transforms.apply_box(np.array([[0, 0, width, height]], np.float64))
        content_width, content_height = content_box[0, 2:]
        height = image.shape[0] * height / content_height
        width = image.shape[1] * width / content_width
    tensor = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
    return {"image": tensor, "height": height, "width": width}


class LazyPredictor:
    """
    Run a detector on one image: read it as BGR, convert it to the model's input format,
    transform it with the test augmentations, call the model in inference mode, and return
    the detections in the coordinates of the original image (the model rescales them to the
    "height" / "width" it is given, as detectron2 models do). As in the test mapper
    (``codetr.data.DetrDatasetMapper``), when the augmentations pad the image (LSJ), the
    requested size is that of the whole padded canvas at the original scale.

    Build it from a config, ``LazyPredictor(cfg)``: the model of ``cfg.model`` on
    ``cfg.train.device`` with the weights of ``cfg.train.init_checkpoint`` (read by an
    :class:`AtomicCheckpointer`, which checks that they fill the share of the model's tensors
    of ``cfg.train.init_checkpoint_min_loaded``), the augmentations of
    ``cfg.dataloader.test.mapper`` (its ``augmentation`` or, for detectron2's
    ``DatasetMapper``, ``augmentations``) and the autocast precision of
    ``cfg.train.inference_amp``; or from parts, ``LazyPredictor(model=..., augmentations=[...])``.
    """

    @configurable
    def __init__(
        self,
        *,
        model: torch.nn.Module,
        augmentations: List[T.Augmentation],
        input_format: str = "RGB",
        precision: Optional[torch.dtype] = None,
    ):
        """
        Args:
            model: a detectron2-style detector; it is put in eval mode.
            augmentations: the test-time augmentations, e.g. ``[ResizeShortestEdge(800, 1333)]``.
            input_format: channel order the model expects, "RGB" or "BGR" (from_config takes
                the model's ``input_format`` attribute, "RGB" when it has none).
            precision: run the model under autocast in this dtype (``torch.bfloat16`` or
                ``torch.float16``); None: no autocast.
        """
        if input_format not in ("RGB", "BGR"):
            raise ValueError(
                f"LazyPredictor(input_format=) must be RGB or BGR, got {input_format!r}"
            )
        self.model = model.eval()
        self.augmentations = T.AugmentationList(augmentations)
        self.input_format = input_format
        self.precision = precision

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Dict[str, Any]:
        model = instantiate(cfg.model).to(train_device(cfg))
        weights = cfg.train.init_checkpoint
        if weights:
            AtomicCheckpointer(model, **min_loaded_shares(cfg)).load(weights)
        else:
            logger.warning("cfg.train.init_checkpoint is empty: the model has random weights.")
        return {
            "model": model,
            "augmentations": test_augmentations(cfg),
            "input_format": getattr(model, "input_format", "RGB"),
            "precision": inference_precision(cfg),
        }

    def __call__(self, image: Union[str, np.ndarray]) -> Instances:
        """
        Args:
            image: an image file path, or an (H, W, 3) uint8 array in BGR order.

        Returns:
            the detections (``pred_boxes`` absolute XYXY in the original image, ``scores``,
            ``pred_classes``) on the model's device.
        """
        inputs = prepare_image(
            image, input_format=self.input_format, augmentations=self.augmentations
        )
        device_type = next(self.model.parameters()).device.type
        with torch.inference_mode(), autocast_to(device_type, self.precision):
            outputs = self.model([inputs])
        return outputs[0]["instances"]
