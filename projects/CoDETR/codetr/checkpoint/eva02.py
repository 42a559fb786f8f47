"""
EVA-02 parameter names: the published EVA-02 checkpoints (BAAI's MIM pretraining releases such
as ``eva02_L_pt_m38m_p14.pt`` / ``eva02_L_pt_in21k_p14.pt``, and their patch-16 conversions
``eva02_L_pt_m38m_p14to16.pt``) and the ``backbone.`` part of the authors' Co-DINO ViT-L
checkpoints, to :class:`codetr.modeling.eva_vit.EVA02ViT`.

Published files are a flat state dict, or one under ``model_ema``, ``state_dict``, ``model`` or
``module`` (looked up in that order, as the authors' ``ViT.init_weights``), optionally with a
``module.`` prefix. Names, published -> ours (``i`` a block)::

    patch_embed.proj.{weight,bias}          -> same (weight resized, see below)
    pos_embed                                -> same (resized, see below)
    blocks.i.{norm1,norm2}.{weight,bias}     -> same
    blocks.i.attn.{q_proj,k_proj,v_proj}.weight -> same
    blocks.i.attn.q_bias / v_bias            -> blocks.i.attn.q_proj.bias / v_proj.bias
    blocks.i.attn.proj.{weight,bias}         -> same
    blocks.i.mlp.{w1,w2,ffn_ln,w3}.*         -> blocks.i.mlp.{gate_proj,up_proj,norm,down_proj}.*
    out_norm.{weight,bias}                   -> same (authors' detection checkpoints only)
    *rope*.{freqs_cos,freqs_sin}             -> dropped: fixed tables, recomputed
    cls_token, mask_token, norm.*, fc_norm.*,
    lm_head.*, head.*                        -> dropped: pretraining / classification only

As the authors' loader, the patch-embedding kernel is resized bicubically (``F.interpolate``,
``align_corners=False``) to the model's patch size (14 -> 16), and the position embedding's
grid bicubically to the model's (e.g. 16 x 16 -> 32 x 32), its class-token row kept. The
pretraining final ``norm`` does not initialise ``out_norm``: like the authors' loader (which
loads non-strictly), it keeps its initialisation.
"""

import math
import re
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .renaming import rename_state_dict

__all__ = [
    "convert_published_eva02",
    "eva02_key",
    "is_eva02_fixed_buffer",
    "published_eva02_state_dict",
    "resize_patch_embed",
    "resize_pos_embed",
]

# (published name, our name template) of the feature extractor
_RULES = [
    (re.compile(pattern), template)
    for pattern, template in [
        (r"patch_embed\.proj\.(?P<p>weight|bias)", "patch_embed.proj.{p}"),
        (r"pos_embed", "pos_embed"),
        (r"out_norm\.(?P<p>weight|bias)", "out_norm.{p}"),
        (r"blocks\.(?P<i>\d+)\.(?P<n>norm1|norm2)\.(?P<p>weight|bias)", "blocks.{i}.{n}.{p}"),
        (
            r"blocks\.(?P<i>\d+)\.attn\.(?P<n>q_proj|k_proj|v_proj)\.weight",
            "blocks.{i}.attn.{n}.weight",
        ),
        (r"blocks\.(?P<i>\d+)\.attn\.(?P<n>q|v)_bias", "blocks.{i}.attn.{n}_proj.bias"),
        (r"blocks\.(?P<i>\d+)\.attn\.proj\.(?P<p>weight|bias)", "blocks.{i}.attn.proj.{p}"),
        (r"blocks\.(?P<i>\d+)\.mlp\.w1\.(?P<p>weight|bias)", "blocks.{i}.mlp.gate_proj.{p}"),
        (r"blocks\.(?P<i>\d+)\.mlp\.w2\.(?P<p>weight|bias)", "blocks.{i}.mlp.up_proj.{p}"),
        (r"blocks\.(?P<i>\d+)\.mlp\.ffn_ln\.(?P<p>weight|bias)", "blocks.{i}.mlp.norm.{p}"),
        (r"blocks\.(?P<i>\d+)\.mlp\.w3\.(?P<p>weight|bias)", "blocks.{i}.mlp.down_proj.{p}"),
    ]
]
# RoPE tables: ``rope.*`` (pretraining), ``rope_win.*`` / ``rope_glb.*`` and every block's
# ``attn.rope.*`` (the authors' ViT)
_ROPE = re.compile(r"(blocks\.\d+\.attn\.)?rope(_win|_glb)?\.freqs_(cos|sin)")
_PRETRAINING_ONLY = re.compile(r"cls_token|mask_token|(norm|fc_norm|lm_head|head)\.(weight|bias)")
# where the authors' ViT.init_weights looks for the state dict, in order
_CONTAINERS = ("model_ema", "state_dict", "model", "module")
# the authors' pretraining image and patch: 32 x 32 positions + the class token, patch 16
_DEFAULT_PATCH_SIZE = 16
_DEFAULT_NUM_POSITIONS = 32 * 32 + 1


def eva02_key(key: str) -> Optional[str]:
    """Our name of one published EVA-02 / authors' ViT feature-extractor parameter (no
    prefix), or None for other names (also for the dropped ones)."""
    for pattern, template in _RULES:
        match = pattern.fullmatch(key)
        if match is not None:
            return template.format(**match.groupdict())
    return None


def is_eva02_fixed_buffer(key: str) -> bool:
    """Whether an unprefixed name is one of EVA-02's RoPE tables (not stored by our model)."""
    return _ROPE.fullmatch(key) is not None


def _is_dropped(key: str) -> bool:
    return is_eva02_fixed_buffer(key) or _PRETRAINING_ONLY.fullmatch(key) is not None


def published_eva02_state_dict(checkpoint: Dict[str, Any]) -> Optional[Dict[str, Tensor]]:
    """
    The EVA-02 state dict of a loaded file, unwrapped from ``model_ema`` / ``state_dict`` /
    ``model`` / ``module`` and without a ``module.`` prefix; None when the file is not one
    (it needs ``patch_embed.proj.weight`` and EVA-02 block names, unprefixed).
    """
    while True:
        inner = next(
            (checkpoint[k] for k in _CONTAINERS if isinstance(checkpoint.get(k), dict)), None
        )
        if inner is None:
            break
        checkpoint = inner
    if all(isinstance(key, str) and key.startswith("module.") for key in checkpoint):
        checkpoint = {key[len("module.") :]: value for key, value in checkpoint.items()}
    if "patch_embed.proj.weight" not in checkpoint or not any(
        key.startswith("blocks.") and eva02_key(key) for key in checkpoint
    ):
        return None
    return checkpoint


def resize_patch_embed(weight: Tensor, patch_size: int) -> Tensor:
    """A (C, in, k, k) patch-embedding kernel resized bicubically to ``patch_size``, as the
    authors' loader (float32)."""
    if tuple(weight.shape[-2:]) == (patch_size, patch_size):
        return weight
    return F.interpolate(
        weight.float(), size=(patch_size, patch_size), mode="bicubic", align_corners=False
    )


def _grid(num_positions: int) -> Tuple[int, int]:
    """(grid side, leading extra tokens) of a square position embedding of that length."""
    for extra in (0, 1):
        side = math.isqrt(num_positions - extra)
        if side * side == num_positions - extra:
            return side, extra
    raise ValueError(f"{num_positions} positions are not a square grid (+ a class token)")


def resize_pos_embed(pos_embed: Tensor, num_positions: int) -> Tensor:
    """
    A (1, [1 +] n * n, C) position embedding resized to ``num_positions`` rows: the grid
    bicubically (``align_corners=False``), the class-token row kept (dropped when the target
    has none).
    """
    side, extra = _grid(pos_embed.shape[1])
    new_side, new_extra = _grid(num_positions)
    if new_extra > extra:
        raise ValueError("the model's position embedding has a class-token row, the file's not")
    if (side, extra) == (new_side, new_extra):
        return pos_embed
    tokens = pos_embed[:, extra:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    if side != new_side:
        tokens = F.interpolate(
            tokens.float(), size=(new_side, new_side), mode="bicubic", align_corners=False
        )
    tokens = tokens.permute(0, 2, 3, 1).flatten(1, 2)
    return torch.cat([pos_embed[:, extra - new_extra : extra].to(tokens.dtype), tokens], dim=1)


def convert_published_eva02(
    state_dict: Dict[str, Tensor],
    model_state_dict: Optional[Dict[str, Tensor]] = None,
    *,
    prefix: str = "backbone.",
) -> Dict[str, Tensor]:
    """
    Renames a published EVA-02 state dict (see :func:`published_eva02_state_dict`) for our
    backbone and resizes its patch embedding and position embedding (``train.init_checkpoint``
    does it when loading).

    Args:
        state_dict: the published tensors, unprefixed.
        model_state_dict: the detector's state dict: its ``{prefix}patch_embed.proj.weight``
            and ``{prefix}pos_embed`` give the patch size and the number of positions to resize
            to; without them, the authors' (patch 16, 32 x 32 positions + the class token).
        prefix: prepended to every output name (the backbone's name in the detector).
    Returns:
        the renamed tensors; RoPE tables, class and mask tokens, the pretraining ``norm`` and
        heads are dropped.
    Raises:
        ValueError: naming the keys that are not EVA-02 names.
    """
    target = model_state_dict or {}
    patch_weight = target.get(prefix + "patch_embed.proj.weight")
    patch_size = _DEFAULT_PATCH_SIZE if patch_weight is None else patch_weight.shape[-1]
    pos_embed = target.get(prefix + "pos_embed")
    num_positions = _DEFAULT_NUM_POSITIONS if pos_embed is None else pos_embed.shape[1]
    converted = rename_state_dict(
        state_dict, eva02_key, prefix=prefix, skip=_is_dropped, naming="EVA-02"
    )
    patch_key, pos_key = prefix + "patch_embed.proj.weight", prefix + "pos_embed"
    if patch_key in converted:
        converted[patch_key] = resize_patch_embed(converted[patch_key], patch_size)
    if pos_key in converted:
        converted[pos_key] = resize_pos_embed(converted[pos_key], num_positions)
    return converted
