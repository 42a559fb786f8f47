"""
Tiny DINO models and synthetic inputs for the query-head tests.

The model is built from the real config ``configs/models/dino_r50.py`` with LazyConfig
overrides only (ResNet-18 at width 16, 64-dim transformer with 2 encoder and 2 decoder layers,
30 queries, 5 classes), so the tests exercise the same wiring as the full-size model.
"""

import copy
import functools
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.structures import Boxes, Instances
from detectron2.utils.registry import locate

__all__ = [
    "CONFIG_PATH",
    "NUM_CLASSES",
    "NUM_QUERIES",
    "EMBED_DIM",
    "MAX_DETECTIONS",
    "full_dino_config",
    "tiny_dino_config",
    "build_tiny_dino",
    "make_instances",
    "normalized_target",
    "synthetic_batch",
]

CONFIG_PATH = Path(__file__).resolve().parents[2] / "configs" / "models" / "dino_r50.py"

NUM_CLASSES = 5
NUM_QUERIES = 30
EMBED_DIM = 64
MAX_DETECTIONS = 20
_RESNET_WIDTH = 16


@functools.lru_cache(maxsize=1)
def _load_config():
    return LazyConfig.load(str(CONFIG_PATH))


def full_dino_config():
    """A fresh copy of the unmodified ``dino_r50.py`` config."""
    return copy.deepcopy(_load_config())


def tiny_dino_config(
    *, num_classes: int = NUM_CLASSES, num_queries: int = NUM_QUERIES, num_dn_queries: int = 20
):
    """
    The ``dino_r50.py`` config scaled down by overrides: ResNet-18 with 16 stem / base
    channels, ChannelMapper and transformer at 64 dims, 2 + 2 layers, 4 heads, FFN 128.
    The returned config has ``model`` as its root entry, like the loaded file.
    """
    cfg = full_dino_config()
    model = cfg.model
    model.backbone.depth = 18
    model.backbone.stem_channels = _RESNET_WIDTH
    model.backbone.base_channels = _RESNET_WIDTH
    model.neck.out_channels = EMBED_DIM

    head = model.query_head
    head.num_classes = num_classes
    head.num_queries = num_queries
    head.num_candidates = num_queries
    head.max_detections = MAX_DETECTIONS
    head.position_embedding.num_pos_feats = EMBED_DIM // 2
    for part in (head.encoder, head.decoder):
        part.num_layers = 2
        part.num_heads = 4
        part.ffn_dim = 2 * EMBED_DIM
    head.denoising.num_dn_queries = num_dn_queries
    return cfg


def build_tiny_dino(seed: int = 0, cfg=None, **model_overrides):
    """
    Instantiates the tiny DINO model (a ``CoDETR``) with a fixed seed.

    Args:
        seed: torch seed used for the parameter initialisation.
        cfg: a config from :func:`tiny_dino_config` (default: a fresh one).
        model_overrides: constructor arguments of ``CoDETR`` replacing those of the config
            (e.g. ``aux_heads``, ``positive_queries``, ``eval_module``, ``lambda_2``);
            values may be objects, they are passed as they are.
    """
    cfg = tiny_dino_config() if cfg is None else cfg
    model_cfg = cfg.model
    # objects such as nn.Modules cannot be stored in the config: instantiate the other
    # arguments from it, then call the model class with all of them (an unknown override
    # fails in the constructor)
    torch.manual_seed(seed)
    kwargs = {key: instantiate(model_cfg[key]) for key in model_cfg.keys() if key != "_target_"}
    kwargs.update(model_overrides)
    target = model_cfg._target_
    return (locate(target) if isinstance(target, str) else target)(**kwargs)


def make_instances(
    image_size: Tuple[int, int], boxes: Sequence[Sequence[float]], classes: Sequence[int]
) -> Instances:
    """Ground truth of one image: absolute XYXY ``boxes`` and their ``classes``."""
    return Instances(
        image_size,
        gt_boxes=Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)),
        gt_classes=torch.tensor(classes, dtype=torch.int64).reshape(-1),
    )


def synthetic_batch(
    image_sizes: Sequence[Tuple[int, int]],
    boxes: Sequence[Sequence[Sequence[float]]],
    classes: Sequence[Sequence[int]],
    *,
    seed: int = 0,
    output_sizes: Optional[Sequence[Tuple[int, int]]] = None,
) -> List[Dict]:
    """
    detectron2 dataset-mapper style inputs: a random RGB image (C, H, W) in [0, 255] per
    ``image_sizes`` entry, its ``instances`` and the requested output ``height`` / ``width``
    (default: the image size).
    """
    generator = torch.Generator().manual_seed(seed)
    output_sizes = list(image_sizes) if output_sizes is None else output_sizes
    inputs = []
    for (height, width), image_boxes, image_classes, (out_h, out_w) in zip(
        image_sizes, boxes, classes, output_sizes
    ):
        image = torch.rand((3, height, width), generator=generator) * 255.0
        inputs.append(
            {
                "image": image,
                "instances": make_instances((height, width), image_boxes, image_classes),
                "height": out_h,
                "width": out_w,
            }
        )
    return inputs


def normalized_target(labels, boxes, size=(640.0, 480.0)) -> Dict[str, torch.Tensor]:
    """A target dict as made by ``CoDETR.normalized_targets``: ``boxes`` (normalised cxcywh)
    are both the loss targets and the boxes the queries are built from ("query_boxes"), of an
    image of ``size`` (w, h) pixels."""
    labels = torch.as_tensor(labels, dtype=torch.int64)
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    width, height = size
    return {
        "labels": labels,
        "boxes": boxes,
        "query_boxes": boxes.clone(),
        "box_normalizer": torch.tensor([width, height, width, height]),
    }


# --------------------------------------------------------------------------------------------
# Reference computations for the loss tests, written out in float64 apart from the model's code.


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) (cx, cy, w, h) -> (x1, y1, x2, y2)."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def expected_detection_losses(
    logits: torch.Tensor,
    boxes: torch.Tensor,
    labels: torch.Tensor,
    target_boxes: torch.Tensor,
    *,
    num_classes: int,
    num_positives: Optional[float] = None,
    weights: Tuple[float, float, float] = (1.0, 5.0, 2.0),
) -> Dict[str, torch.Tensor]:
    """
    The Co-DINO query losses of N queries against per-query targets, in float64:

    * "loss_class": quality focal loss (beta 2) summed over queries and classes: every class
      softplus(x) * sigmoid(x)^2 (BCE towards 0), the labelled class of a positive query
      BCE(x, IoU) * |IoU - sigmoid(x)|^2 with the IoU of its (detached) box and its target;
    * "loss_bbox": L1 of the normalised cxcywh boxes of the positive queries;
    * "loss_giou": 1 - GIoU of the positive queries (GIoU does not change when both boxes are
      scaled per axis: normalised boxes give the pixel boxes' value);

    each divided by ``num_positives`` (default: the positives, at least 1) and multiplied by
    its weight (class, L1, GIoU: those of ``configs/models/dino_r50.py``).

    Args:
        logits: (N, K); boxes: (N, 4) normalised cxcywh; labels: (N,) int64, K background;
        target_boxes: (N, 4) normalised cxcywh (ignored for background).
    """
    from torchvision.ops import box_iou, generalized_box_iou

    logits, boxes = logits.detach().double(), boxes.detach().double()
    target_boxes = target_boxes.detach().double()
    positive = labels < num_classes
    if num_positives is None:
        num_positives = max(int(positive.sum()), 1)
    prob = logits.sigmoid()
    per_class = torch.nn.functional.softplus(logits) * prob**2
    rows, columns = positive.nonzero().squeeze(1), labels[positive]
    predicted, targets = cxcywh_to_xyxy(boxes[positive]), cxcywh_to_xyxy(target_boxes[positive])
    iou = box_iou(predicted, targets).diagonal()
    x, p = logits[rows, columns], prob[rows, columns]
    bce = torch.nn.functional.binary_cross_entropy_with_logits(x, iou, reduction="none")
    per_class[rows, columns] = bce * (iou - p).abs() ** 2
    l1 = (boxes[positive] - target_boxes[positive]).abs().sum()
    giou = (1 - generalized_box_iou(predicted, targets).diagonal()).sum()
    class_weight, l1_weight, giou_weight = weights
    return {
        "loss_class": per_class.sum() / num_positives * class_weight,
        "loss_bbox": l1 / num_positives * l1_weight,
        "loss_giou": giou / num_positives * giou_weight,
    }


def hungarian_targets_by_hand(
    logits: torch.Tensor,
    boxes: torch.Tensor,
    gt_labels: torch.Tensor,
    gt_boxes: torch.Tensor,
    *,
    num_classes: int,
    weights: Tuple[float, float, float] = (2.0, 5.0, 2.0),
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    One image's one-to-one assignment, written out: cost = class x (focal cost, alpha .25,
    gamma 2) + L1 x (L1 of normalised cxcywh) + GIoU x (-GIoU), minimised by scipy's
    ``linear_sum_assignment``; weights those of the matcher of ``configs/models/dino_r50.py``.

    Args:
        logits: (Q, K); boxes: (Q, 4) normalised cxcywh; gt_labels: (G,); gt_boxes: (G, 4).
    Returns:
        per query its label (K where unmatched) and target box (zeros where unmatched).
    """
    from scipy.optimize import linear_sum_assignment
    from torchvision.ops import generalized_box_iou

    num_queries = logits.shape[0]
    labels = torch.full((num_queries,), num_classes, dtype=torch.int64)
    targets = torch.zeros(num_queries, 4, dtype=torch.float64)
    if len(gt_labels) == 0:
        return labels, targets
    logits, boxes, gt_boxes = logits.detach().double(), boxes.detach().double(), gt_boxes.double()
    prob = logits.sigmoid()[:, gt_labels]
    positive_cost = 0.25 * (1 - prob) ** 2 * -(prob + 1e-12).log()
    negative_cost = 0.75 * prob**2 * -(1 - prob + 1e-12).log()
    focal = positive_cost - negative_cost
    l1 = (boxes[:, None] - gt_boxes[None]).abs().sum(-1)
    giou = generalized_box_iou(cxcywh_to_xyxy(boxes), cxcywh_to_xyxy(gt_boxes))
    class_weight, l1_weight, giou_weight = weights
    cost = class_weight * focal + l1_weight * l1 - giou_weight * giou
    queries, gts = linear_sum_assignment(cost.numpy())
    labels[queries] = gt_labels[gts]
    targets[queries] = gt_boxes[gts]
    return labels, targets
