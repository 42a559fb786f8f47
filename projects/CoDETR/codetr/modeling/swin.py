"""
Swin Transformer (V1) backbones for LazyConfig, on detectron2's own ``SwinTransformer``.

detectron2's implementation is the detection variant of Swin that the authors use
(``SwinTransformerV1``): feature maps are padded to a multiple of the window size, every
second block of a stage uses shifted windows whatever the feature size, and each returned
stage has its own LayerNorm ``norm{i}``. Its parameter names are those of the official Swin
checkpoints (see ``codetr.checkpoint.swin``).

Outputs are named ``p{i}`` for stage ``i`` (0..3), strides 4, 8, 16, 32, channels
``embed_dim * 2**i``. Co-DINO feeds all four stages to the neck, Co-Deformable-DETR
``p1``..``p3``.

Nothing is frozen, as in all the authors' Swin configs. detectron2's ``frozen_stages`` is not
offered: it stops gradients but does not keep the frozen stages in eval mode across
``model.train()`` (their drop path would stay active), unlike the authors' backbone.
"""

from typing import Dict, List, NamedTuple, Sequence

from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone.swin import SwinTransformer

__all__ = ["SWIN_SIZES", "SwinSize", "build_swin", "swin_output_shape"]


class SwinSize(NamedTuple):
    """Width and depth of one Swin variant."""

    embed_dim: int
    depths: Sequence[int]
    num_heads: Sequence[int]


SWIN_SIZES: Dict[str, SwinSize] = {
    "T": SwinSize(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "S": SwinSize(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "B": SwinSize(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    "L": SwinSize(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)),
}
_NUM_STAGES = 4


def _size(size: str) -> SwinSize:
    if size not in SWIN_SIZES:
        raise ValueError(f"Swin size must be one of {sorted(SWIN_SIZES)}, got {size!r}")
    return SWIN_SIZES[size]


def _stage_indices(out_features: Sequence[str]) -> List[int]:
    """``["p1", "p3"]`` -> ``[1, 3]``; raises on names that are not Swin outputs."""
    names = [f"p{i}" for i in range(_NUM_STAGES)]
    unknown = [f for f in out_features if f not in names]
    if unknown or not out_features:
        raise ValueError(
            f"Swin out_features must be a non-empty subset of {names}, got " f"{list(out_features)}"
        )
    indices = [names.index(f) for f in out_features]
    if indices != sorted(set(indices)):
        raise ValueError(
            f"Swin out_features must be distinct and finest first, got " f"{list(out_features)}"
        )
    return indices


def build_swin(
    *,
    size: str = "T",
    window_size: int = 7,
    out_features: Sequence[str] = ("p0", "p1", "p2", "p3"),
    drop_path_rate: float = 0.2,
    use_checkpoint: bool = False,
) -> SwinTransformer:
    """
    A Swin-V1 backbone as in the authors' configs: patch size 4, MLP ratio 4, qkv bias,
    no absolute position embedding, patch norm, no dropout, nothing frozen.

    Args:
        size: "T", "S", "B" or "L" (widths and depths in :data:`SWIN_SIZES`).
        window_size: attention window; 7 for the 224-pretrained T / S, 12 for the
            384-pretrained B / L.
        out_features: stages returned, finest first, among "p0" (stride 4) .. "p3" (stride 32).
            Each gets a LayerNorm ``norm{i}``.
        drop_path_rate: stochastic depth of the last block; it rises linearly from 0 over the
            blocks (the authors use 0.2 - 0.6 depending on size and schedule). Above 0 it needs
            ``timm``, where detectron2's Swin takes its ``DropPath`` from.
        use_checkpoint: recompute each block in the backward pass (activation checkpointing)
            to save memory.
    Returns:
        detectron2's ``SwinTransformer``; ``forward`` takes (B, 3, H, W) and returns
        ``{"p{i}": (B, embed_dim * 2**i, ceil(H / 2**(i + 2)), ceil(W / 2**(i + 2)))}``.
    """
    spec = _size(size)
    if window_size < 1:
        raise ValueError(f"Swin window_size must be positive, got {window_size}")
    if not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"Swin drop_path_rate must be in [0, 1), got {drop_path_rate}")
    return SwinTransformer(
        patch_size=4,
        embed_dim=spec.embed_dim,
        depths=tuple(spec.depths),
        num_heads=tuple(spec.num_heads),
        window_size=window_size,
        mlp_ratio=4.0,
        qkv_bias=True,
        drop_rate=0.0,
        attn_drop_rate=0.0,
        drop_path_rate=drop_path_rate,
        ape=False,
        patch_norm=True,
        out_indices=tuple(_stage_indices(out_features)),
        frozen_stages=-1,
        use_checkpoint=use_checkpoint,
    )


def swin_output_shape(
    *, size: str = "T", out_features: Sequence[str] = ("p0", "p1", "p2", "p3")
) -> Dict[str, ShapeSpec]:
    """
    The output shapes of ``build_swin(size=size, out_features=out_features)`` without
    building it, e.g. as the neck's ``input_shape`` in a config.
    """
    embed_dim = _size(size).embed_dim
    return {
        f"p{i}": ShapeSpec(channels=embed_dim * 2**i, stride=2 ** (i + 2))
        for i in _stage_indices(out_features)
    }
