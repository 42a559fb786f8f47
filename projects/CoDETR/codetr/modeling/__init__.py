from .eva_vit import EVA02ViT, build_eva02_vit
from .meta_arch import CoDETR
from .neck import ChannelMapper
from .positive_queries import (
    DeformablePositiveQueryBuilder,
    DINOPositiveQueryBuilder,
    PositiveQueryBuilder,
)
from .query_group import QueryGroup
from .query_heads import DeformableDETRHead, DINOHead, QueryHeadBase
from .sfp import SimpleFeaturePyramid

__all__ = [k for k in globals().keys() if not k.startswith("_")]
