from .base import QueryHeadBase
from .deformable_detr import DeformableDETRHead
from .dino import DINOHead
from .postprocess import detr_detections

__all__ = [k for k in globals().keys() if not k.startswith("_")]
