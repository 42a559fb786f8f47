from .meta_arch import CoDETR
from .neck import ChannelMapper
from .positive_queries import (
    DeformablePositiveQueryBuilder,
    DINOPositiveQueryBuilder,
    PositiveQueryBuilder,
)
from .query_heads import DeformableDETRHead, DINOHead, ExtraQueries, QueryHeadBase

__all__ = [k for k in globals().keys() if not k.startswith("_")]
