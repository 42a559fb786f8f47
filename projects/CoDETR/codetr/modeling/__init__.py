from .meta_arch import CoDETR
from .neck import ChannelMapper
from .positive_queries import PositiveQueryBuilder
from .query_heads import DINOHead, ExtraQueries, QueryHeadBase

__all__ = [k for k in globals().keys() if not k.startswith("_")]
