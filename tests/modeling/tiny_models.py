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
    for index, name in enumerate(["res2", "res3", "res4", "res5"]):
        model.neck.input_shape[name].channels = _RESNET_WIDTH * 2**index
    model.neck.out_channels = EMBED_DIM

    head = model.query_head
    head.num_classes = num_classes
    head.num_queries = num_queries
    head.num_candidates = num_queries
    head.max_detections = MAX_DETECTIONS
    head.position_embedding.num_pos_feats = EMBED_DIM // 2
    for part in (head.encoder, head.decoder):
        part.num_layers = 2
        part.embed_dim = EMBED_DIM
        part.num_heads = 4
        part.ffn_dim = 2 * EMBED_DIM
    head.denoising.embed_dim = EMBED_DIM
    head.denoising.num_dn_queries = num_dn_queries
    return cfg


def build_tiny_dino(seed: int = 0, cfg=None, **model_overrides):
    """
    Instantiates the tiny DINO model (a ``CoDETR``) with a fixed seed.

    Args:
        seed: torch seed used for the parameter initialisation.
        cfg: a config from :func:`tiny_dino_config` (default: a fresh one).
        model_overrides: constructor arguments of ``CoDETR`` replacing those of the config
            (e.g. ``aux_heads``, ``positive_queries``, ``eval_module``,
            ``aux_loss_weight``); values may be objects, they are passed as they are.
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
