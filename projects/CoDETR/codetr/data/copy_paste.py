"""
Simple copy-paste (Ghiasi et al. 2021), as in the authors' LSJ instance recipes (mmdet 2.25's
``CopyPaste`` after the LSJ load pipeline, in a ``MultiImageMixDataset``).

:class:`CopyPaste` takes two training samples that the mapper has already augmented to the
same size (LSJ: the padded ``image_size`` square), a destination and a source, and:

1. picks a random subset of the source objects (``selected=True``: a count drawn from
   ``[0, min(n, max_num_pasted - 1)]``, then that many distinct objects; ``selected=False``:
   all of them);
2. pastes their pixels (the union of their masks) onto the destination image;
3. removes the pasted pixels from the destination masks and recomputes the destination boxes
   from the masks; a destination object is kept when its new box moved by at most
   ``bbox_occluded_thr`` pixels on every side, or its remaining mask has more than
   ``mask_occluded_thr`` pixels (mmdet's rule), and, unlike mmdet, only if its mask is not
   empty (mmdet keeps a fully hidden small object near the image origin, whose empty-mask box
   [0, 0, 0, 0] moved by less than the threshold);
4. appends the pasted objects, with their boxes recomputed from their masks.

When no source object is picked, the destination is returned unchanged (as mmdet). Masks must
be ``BitMasks`` (the mapper's ``instance_mask_format="bitmask"``).

Where the source comes from: ``DetrDatasetMapper(copy_paste=CopyPaste(...))`` keeps the last
``source_pool_size`` dataset dicts it mapped (in each DataLoader worker) and, for each image,
draws one of them (not the image itself) and maps it again with a fresh augmentation draw. With
detectron2's random training samplers these are random images of the dataset, as the authors'
uniformly drawn dataset index (and with ``RepeatFactorTrainingSampler`` they follow its
repeat factors, as the authors' class-balanced LVIS dataset does). The first image a worker
maps has no source and is not pasted onto. All draws use numpy's global generator, as
detectron2's augmentations do, which detectron2 seeds per DataLoader worker from the
trainer's seed.
"""

from typing import Tuple

import numpy as np
import torch

from detectron2.data import detection_utils as utils
from detectron2.structures import BitMasks, Instances

__all__ = ["CopyPaste"]


class CopyPaste:
    """
    Pastes objects of a source sample onto a destination sample (see the module docstring).

    Called as ``image, instances = copy_paste(image, instances, source_image,
    source_instances)`` on two augmented samples of the same size: images are uint8 arrays
    of shape (H, W, C), instances have "gt_boxes", "gt_classes" and "gt_masks" (``BitMasks``),
    and the same fields in both.
    """

    def __init__(
        self,
        *,
        max_num_pasted: int = 100,
        bbox_occluded_thr: float = 10,
        mask_occluded_thr: int = 300,
        selected: bool = True,
        source_pool_size: int = 20,
    ):
        """
        Args:
            max_num_pasted: with ``selected``, the number of pasted objects is drawn from
                ``[0, min(n, max_num_pasted - 1)]`` (mmdet's rule), n the source's objects.
            bbox_occluded_thr: a partly hidden destination object is kept when every side of
                its box (recomputed from its remaining mask) moved by at most this many pixels
                ...
            mask_occluded_thr: ... or when more than this many pixels of its mask remain.
            selected: paste a random subset of the source objects; all of them when False.
            source_pool_size: how many recently mapped dataset dicts the mapper keeps to draw
                sources from (see the module docstring).
        """
        if int(max_num_pasted) < 1:
            raise ValueError(f"max_num_pasted must be >= 1, got {max_num_pasted}")
        if int(source_pool_size) < 1:
            raise ValueError(f"source_pool_size must be >= 1, got {source_pool_size}")
        self.max_num_pasted = int(max_num_pasted)
        self.bbox_occluded_thr = float(bbox_occluded_thr)
        self.mask_occluded_thr = int(mask_occluded_thr)
        self.selected = bool(selected)
        self.source_pool_size = int(source_pool_size)

    def __repr__(self) -> str:
        return (
            f"CopyPaste(max_num_pasted={self.max_num_pasted}, "
            f"bbox_occluded_thr={self.bbox_occluded_thr:g}, "
            f"mask_occluded_thr={self.mask_occluded_thr}, selected={self.selected}, "
            f"source_pool_size={self.source_pool_size})"
        )

    def select(self, instances: Instances) -> Instances:
        """The source objects to paste: a random subset (``selected``) or all of them."""
        if not self.selected:
            return instances
        count = np.random.randint(0, min(len(instances) + 1, self.max_num_pasted))
        indices = np.random.choice(len(instances), size=count, replace=False)
        return instances[torch.as_tensor(indices, dtype=torch.long)]

    def __call__(
        self,
        image: np.ndarray,
        instances: Instances,
        source_image: np.ndarray,
        source_instances: Instances,
    ) -> Tuple[np.ndarray, Instances]:
        """
        Returns:
            the destination image with the pasted pixels, and its instances: the kept
            destination objects (in their order) then the pasted ones.
        """
        if image.shape != source_image.shape:
            raise ValueError(
                f"copy-paste needs two images of the same size, got {image.shape} and "
                f"{source_image.shape}: use a fixed-size augmentation (e.g. LSJ)"
            )
        for name, value in (("instances", instances), ("source_instances", source_instances)):
            masks = value.get("gt_masks") if value.has("gt_masks") else None
            if not isinstance(masks, BitMasks):
                raise TypeError(
                    f"copy-paste needs BitMasks in {name}.gt_masks, got "
                    f"{type(masks).__name__}: build the mapper with use_instance_mask=True, "
                    'instance_mask_format="bitmask"'
                )
        pasted = self.select(source_instances)
        if len(pasted) == 0:
            return image, instances

        pasted_pixels = pasted.gt_masks.tensor.any(dim=0)  # (H, W)
        old_boxes = instances.gt_masks.get_bounding_boxes().tensor
        masks = BitMasks(instances.gt_masks.tensor & ~pasted_pixels)
        boxes = masks.get_bounding_boxes()
        keep = ((boxes.tensor - old_boxes).abs() <= self.bbox_occluded_thr).all(dim=1)
        keep |= masks.tensor.sum(dim=(1, 2)) > self.mask_occluded_thr
        kept = Instances(instances.image_size, **instances.get_fields())
        kept.gt_masks, kept.gt_boxes = masks, boxes
        pasted = Instances(pasted.image_size, **pasted.get_fields())
        pasted.gt_boxes = pasted.gt_masks.get_bounding_boxes()

        pixels = pasted_pixels.numpy()[:, :, None]
        image = np.where(pixels, source_image, image)
        instances = Instances.cat([kept[keep], pasted])
        return image, utils.filter_empty_instances(instances, by_box=False)
