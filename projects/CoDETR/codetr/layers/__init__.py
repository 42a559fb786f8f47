"""Detector-independent building blocks: the inverse sigmoid, position embeddings, deformable
attention, soft-NMS and MLPs."""

from .box_ops import inverse_sigmoid
from .mlp import MLP
from .ms_deform_attn import (
    MultiScaleDeformableAttention,
    check_level_shapes,
    multi_scale_deformable_attention,
)
from .ms_deform_attn_fast import as_level_shapes, multi_scale_deformable_attention_fast
from .position_encoding import SinePositionEmbedding, box_sine_embedding
from .soft_nms import batched_soft_nms

__all__ = [
    "inverse_sigmoid",
    "MLP",
    "MultiScaleDeformableAttention",
    "as_level_shapes",
    "check_level_shapes",
    "multi_scale_deformable_attention",
    "multi_scale_deformable_attention_fast",
    "SinePositionEmbedding",
    "box_sine_embedding",
    "batched_soft_nms",
]
