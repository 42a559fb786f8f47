from .decoder import DeformableDecoder, DeformableDecoderLayer
from .denoising import ContrastiveDenoising
from .encoder import DeformableEncoder, DeformableEncoderLayer
from .multi_level import MultiLevelSequence, encoder_reference_points, flatten_levels, level_masks
from .two_stage import encoder_proposals

__all__ = [k for k in globals().keys() if not k.startswith("_")]
