"""Conversion of external checkpoints (the authors' Co-DETR models, torchvision ResNets, Swin,
EVA-02) to our parameter names, and reading of pickled weight files without running code."""

from .eva02 import (
    convert_published_eva02,
    eva02_key,
    is_eva02_fixed_buffer,
    published_eva02_state_dict,
    resize_patch_embed,
    resize_pos_embed,
)
from .inference import TRAINING_ONLY_PREFIXES, inference_state_dict, is_training_only
from .official import (
    ConversionReport,
    convert_official_state_dict,
    is_auxiliary_key,
    load_official_checkpoint,
    official_key_to_ours,
)
from .resnet import (
    convert_torchvision_resnet,
    is_torchvision_resnet_state_dict,
    torchvision_resnet_key,
)
from .safe_pickle import ALLOWED_PICKLE_GLOBALS, UnsafePickleError, load_pickle_weights
from .swin import convert_official_swin, is_official_swin_state_dict, swin_key

__all__ = [k for k in globals().keys() if not k.startswith("_")]
