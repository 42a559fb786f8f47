"""
CoDETR-d2: Co-DETR (DETRs with Collaborative Hybrid Assignments Training) for detectron2.
"""
from ._prerequisites import check_prerequisites

check_prerequisites()

from . import data  # noqa: E402  registers the built-in datasets
from .modeling import CoDETR  # noqa: E402

__all__ = ["CoDETR"]
