from .atss import ATSSHead, atss_assign
from .base import AssignedCoords
from .rcnn import RCNNAuxHead, build_rcnn_aux_head

__all__ = [k for k in globals().keys() if not k.startswith("_")]
