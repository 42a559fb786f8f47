"""
Swin-V1 parameter names: the official Swin Transformer checkpoints (Microsoft's ImageNet
classification releases, ``{"model": state_dict}``) and the ``backbone.`` part of the authors'
Co-DETR Swin checkpoints, to detectron2's ``SwinTransformer`` as built by
:func:`codetr.modeling.swin.build_swin`.

detectron2's Swin keeps the module layout of the official code, so every feature-extractor
name is unchanged (``s`` stage, ``b`` block, ``i`` output stage):

==================================================  ======================================
official / authors'                                 detectron2
==================================================  ======================================
``patch_embed.{proj,norm}.*``                       same
``layers.s.blocks.b.{norm1,norm2}.*``               same
``layers.s.blocks.b.attn.{qkv,proj}.*``             same
``layers.s.blocks.b.attn.relative_position_*``      same (bias table; index buffer)
``layers.s.blocks.b.mlp.{fc1,fc2}.*``               same
``layers.s.downsample.{reduction,norm}.*``          same (patch merging at the end of stage s)
``norm{i}.*`` (authors' detection checkpoints)      same (LayerNorm of output stage i)
``layers.s.blocks.b.attn_mask``                     dropped: recomputed for each input size
``norm.*``, ``head.*`` (classification)             dropped
==================================================  ======================================

The classifier's final ``norm`` is not used for ``norm3``: like the authors' loader, the
detection output norms start from their initialisation (weight 1, bias 0). A checkpoint's
window size must be the model's (7 for the 224 releases, 12 for the 384 ones): relative
position tables are not resized.
"""
import re
from typing import Dict, Optional

from torch import Tensor

from .renaming import rename_state_dict

__all__ = ["swin_key", "is_official_swin_state_dict", "convert_official_swin"]

_BLOCK = r"layers\.\d+\.blocks\.\d+\."
_FEATURE_NAMES = re.compile(
    r"patch_embed\.(proj|norm)\.(weight|bias)"
    rf"|{_BLOCK}(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)"
    rf"|{_BLOCK}attn\.(relative_position_bias_table|relative_position_index)"
    r"|layers\.\d+\.downsample\.(reduction\.weight|norm\.(weight|bias))"
    r"|norm[0-3]\.(weight|bias)"
)
# classification-only parts of the official checkpoints
_CLASSIFIER_NAMES = re.compile(rf"{_BLOCK}attn_mask|norm\.(weight|bias)|head\.(weight|bias)")


def swin_key(key: str) -> Optional[str]:
    """
    The detectron2 name of one Swin-V1 feature-extractor parameter or buffer (no prefix), or
    None for names that are not part of the feature extractor (classifier, attention-mask
    buffers) or not Swin names.
    """
    return key if _FEATURE_NAMES.fullmatch(key) else None


def is_official_swin_state_dict(state_dict: Dict[str, Tensor]) -> bool:
    """Whether an unprefixed state dict (e.g. the ``model`` entry of an official Swin file) is
    in Swin-V1 names."""
    return "patch_embed.proj.weight" in state_dict and any(
        _FEATURE_NAMES.fullmatch(key) and key.startswith("layers.") for key in state_dict
    )


def convert_official_swin(
    state_dict: Dict[str, Tensor], *, prefix: str = "backbone."
) -> Dict[str, Tensor]:
    """
    Renames an official Swin ImageNet checkpoint (the ``model`` entry of e.g.
    ``swin_large_patch4_window12_384_22k.pth``) for our backbone (``train.init_checkpoint``
    does it when loading).

    Args:
        state_dict: the official Swin parameters and buffers, unprefixed.
        prefix: prepended to every output name (the backbone's name in the detector).
    Returns:
        the renamed tensors; the classifier (``head.*``, ``norm.*``) and the ``attn_mask``
        buffers are dropped.
    Raises:
        ValueError: naming the keys that are not Swin-V1 names.
    """
    return rename_state_dict(
        state_dict,
        swin_key,
        prefix=prefix,
        skip=_CLASSIFIER_NAMES.fullmatch,
        naming="Swin-V1",
    )
