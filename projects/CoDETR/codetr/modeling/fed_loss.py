"""
Federated loss (Zhou et al., "Probabilistic two-stage detection", 2021): on a federated
dataset such as LVIS an image is exhaustively annotated for a few classes only, so the sigmoid
classification loss of an image is taken over a subset S of the classes: every class of its
ground truth, plus negative classes drawn without replacement with probability proportional
to a frequency weight ``w_c = image_count_c ** 0.5`` until ``|S| = 50`` (all of its ground-truth
classes if it has more). :class:`~codetr.modeling.losses.DetectionLoss` masks out the loss terms
of the other classes.

The weights come from the training set's metadata with detectron2's
``detectron2.data.detection_utils.get_fed_loss_cls_weights(dataset_names, freq_weight_power=0.5)``
(``MetadataCatalog.get(name).class_image_count``, sorted by category id).
"""

import math

import torch
from torch import Tensor

from .random_draws import random_draws

__all__ = ["FED_LOSS_DRAW_PURPOSE", "fed_loss_classes"]

# What the class sampling asks random_draws() for.
FED_LOSS_DRAW_PURPOSE = "fed_loss.classes"


def fed_loss_classes(labels: Tensor, class_weights: Tensor, num_fed_loss_classes: int) -> Tensor:
    """
    The classes whose loss terms count in each image.

    Per image, the classes of its positive queries are kept, and ``num_fed_loss_classes`` minus
    their number others are drawn without replacement, each draw with probability proportional
    to ``class_weights`` among the classes not drawn yet (``torch.multinomial(w, n,
    replacement=False)`` with ``w`` zero at the kept classes, as detectron2's
    ``get_fed_loss_classes``). The draw is the exponential race ``torch.multinomial`` itself
    runs: the classes of largest ``w_c / E_c``, ``E_c = -log(1 - u_c)`` exponential from one
    uniform ``u_c`` per image and class (``random_draws()``, purpose ``"fed_loss.classes"``).
    Unlike detectron2, which draws one set for all the images of a batch, each image draws its
    own, as the paper defines it.

    Args:
        labels: (B, Q) int64 query labels in [0, K]; K means background.
        class_weights: (K,) positive sampling weights of the classes.
        num_fed_loss_classes: the number of classes kept per image, at least 1.

    Returns:
        (B, K) bool, True where the class's loss terms count in the image.
    """
    if labels.dim() != 2 or class_weights.dim() != 1:
        raise ValueError(
            "expected labels (B, Q) and class_weights (K,), got "
            f"{tuple(labels.shape)} and {tuple(class_weights.shape)}"
        )
    batch_size, num_classes = labels.shape[0], class_weights.numel()
    present = labels.new_zeros(batch_size, num_classes + 1, dtype=torch.bool)
    present = present.scatter(1, labels, True)[:, :num_classes]
    uniform = random_draws().uniform(
        FED_LOSS_DRAW_PURPOSE, (batch_size, num_classes), labels.device
    )
    keys = class_weights / -torch.log1p(-uniform)
    keys = keys.masked_fill(present, math.inf)
    drawn = keys.topk(min(num_fed_loss_classes, num_classes), dim=1).indices
    return present.scatter(1, drawn, True)
