"""
The EVA-02 plain ViT of the authors' Co-DINO ViT-L configs, as a detectron2 ``Backbone``.

It is detectron2's ViTDet backbone (``detectron2.modeling.backbone.vit.ViT``: patch embedding,
interpolated absolute position embedding, window attention in most blocks and global attention
in a few) with EVA-02's block: separate q / k / v projections with q and v biases only, 2-D
rotary position embedding (RoPE) on queries and keys, a SwiGLU MLP with a LayerNorm on its
hidden units ("sub-LN"), and a LayerNorm on the output. No relative position bias, no
residual conv blocks, no class token at detection time.

RoPE positions. EVA-02 was pretrained on a 16 x 16 token grid (224 / 14); token ``r`` of an
axis of ``n`` tokens is placed at ``r * 16 / n``, so every grid spans the pretraining grid. A
window block rotates by its window's grid (``window_size`` tokens a side, padded windows
included); a global block by the whole feature map. The authors precompute the global table for
``img_size / patch_size`` when ``use_lsj`` (their LSJ inputs are always padded to that size,
where it equals the table for the input) and compute it for the input otherwise: both are this
one rule.

Parameter names: authors' key (``backbone.`` prefix in both) -> ours::

    patch_embed.proj.{weight,bias}          -> patch_embed.proj.{weight,bias}
    pos_embed                  (1, 1 + N, C) -> pos_embed                      (same)
    blocks.{i}.norm1.{weight,bias}           -> blocks.{i}.norm1.{weight,bias}
    blocks.{i}.attn.q_proj.weight            -> blocks.{i}.attn.q_proj.weight
    blocks.{i}.attn.q_bias                   -> blocks.{i}.attn.q_proj.bias
    blocks.{i}.attn.k_proj.weight            -> blocks.{i}.attn.k_proj.weight
    blocks.{i}.attn.v_proj.weight            -> blocks.{i}.attn.v_proj.weight
    blocks.{i}.attn.v_bias                   -> blocks.{i}.attn.v_proj.bias
    blocks.{i}.attn.proj.{weight,bias}       -> blocks.{i}.attn.proj.{weight,bias}
    blocks.{i}.norm2.{weight,bias}           -> blocks.{i}.norm2.{weight,bias}
    blocks.{i}.mlp.w1.{weight,bias}          -> blocks.{i}.mlp.gate_proj.{weight,bias}
    blocks.{i}.mlp.w2.{weight,bias}          -> blocks.{i}.mlp.up_proj.{weight,bias}
    blocks.{i}.mlp.ffn_ln.{weight,bias}      -> blocks.{i}.mlp.norm.{weight,bias}
    blocks.{i}.mlp.w3.{weight,bias}          -> blocks.{i}.mlp.down_proj.{weight,bias}
    out_norm.{weight,bias}                   -> out_norm.{weight,bias}
    rope_win.*, rope_glb.*, blocks.{i}.attn.rope.*  (fixed tables)  -> dropped, not stored

``pos_embed``, ``patch_embed`` and ``blocks.{i}`` keep the names that detectron2's
``get_vit_lr_decay_rate`` reads for layer-wise learning-rate decay.
"""

from typing import Dict, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling import Backbone
from detectron2.modeling.backbone.utils import (
    PatchEmbed,
    get_abs_pos,
    window_partition,
    window_unpartition,
)
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "EVA02_SIZES",
    "EVA02Size",
    "EVA02Block",
    "EVA02ViT",
    "RoPEAttention",
    "SwiGLU",
    "apply_rotary",
    "build_eva02_vit",
    "eva02_vit_output_shape",
    "rotary_angles",
]


class EVA02Size(NamedTuple):
    """Width and depth of one EVA-02 variant."""

    embed_dim: int
    depth: int
    num_heads: int


EVA02_SIZES: Dict[str, EVA02Size] = {"L": EVA02Size(embed_dim=1024, depth=24, num_heads=16)}
_PATCH_SIZE = 16


def _size(size: str) -> EVA02Size:
    if size not in EVA02_SIZES:
        raise ValueError(f"EVA-02 size must be one of {sorted(EVA02_SIZES)}, got {size!r}")
    return EVA02_SIZES[size]


def rotary_angles(
    height: int,
    width: int,
    head_dim: int,
    *,
    pretrain_grid: int = 16,
    theta: float = 10000,
    device: Optional[torch.device] = None,
) -> Tensor:
    """
    EVA-02's 2-D rotary angles for a ``height`` x ``width`` token grid.

    Channels ``(2j, 2j + 1)`` of a head rotate together as one pair. The first ``head_dim / 2``
    channels rotate with the token's row, the last ``head_dim / 2`` with its column; pair ``j``
    of each half turns at the frequency ``theta ** (-4 j / head_dim)``. Token ``r`` of an axis
    of ``n`` tokens is at position ``r * pretrain_grid / n``.

    Returns:
        (height * width, head_dim) float32 angles in radians, tokens in row-major order, each
        angle repeated for both channels of its pair.
    """
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head dim divisible by 4, got {head_dim}")
    axis_dim = head_dim // 2
    exponents = torch.arange(0, axis_dim, 2, dtype=torch.float32, device=device) / axis_dim
    frequencies = 1.0 / theta**exponents

    def axis_angles(num_tokens: int) -> Tensor:
        positions = torch.arange(num_tokens, dtype=torch.float32, device=device)
        angles = (positions / num_tokens * pretrain_grid)[:, None] * frequencies
        return angles.repeat_interleave(2, dim=1)  # (num_tokens, axis_dim)

    rows = axis_angles(height)[:, None, :].expand(height, width, axis_dim)
    columns = axis_angles(width)[None, :, :].expand(height, width, axis_dim)
    return torch.cat([rows, columns], dim=-1).reshape(height * width, head_dim)


def apply_rotary(x: Tensor, angles: Tensor) -> Tensor:
    """
    Rotates each channel pair ``(x0, x1)`` of ``x`` (..., N, D) by its angle (N, D):
    ``(x0 cos - x1 sin, x1 cos + x0 sin)``. Half-precision ``x`` is promoted to the angles'
    float32.
    """
    pairs = x.unflatten(-1, (-1, 2))
    rotated_by_90 = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return x * angles.cos() + rotated_by_90 * angles.sin()


class RoPEAttention(nn.Module):
    """Multi-head self-attention over a token grid with 2-D RoPE on queries and keys."""

    def __init__(self, dim: int, *, num_heads: int, qkv_bias: bool, rope_pretrain_grid: int):
        """
        Args:
            dim: token channels.
            num_heads: attention heads; ``dim / num_heads`` must be divisible by 4.
            qkv_bias: learnable biases on queries and values (keys never have one).
            rope_pretrain_grid: token grid side of the RoPE pretraining (see ``rotary_angles``).
        """
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.rope_pretrain_grid = rope_pretrain_grid
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """
        Args:
            x: (B, H, W, C) tokens of grids (whole maps or windows) attended independently.
        Returns:
            (B, H, W, C).
        """
        batch, height, width, dim = x.shape

        def split_heads(t: Tensor) -> Tensor:  # (B, H, W, C) -> (B, heads, H * W, C / heads)
            return t.reshape(batch, height * width, self.num_heads, -1).transpose(1, 2)

        q, k, v = (split_heads(proj(x)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        angles = rotary_angles(
            height, width, q.shape[-1], pretrain_grid=self.rope_pretrain_grid, device=x.device
        )
        q = apply_rotary(q, angles).type_as(v)
        k = apply_rotary(k, angles).type_as(v)
        x = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head_dim)) v
        return self.proj(x.transpose(1, 2).reshape(batch, height, width, dim))


class SwiGLU(nn.Module):
    """``down_proj(norm(silu(gate_proj(x)) * up_proj(x)))``: EVA-02's MLP with sub-LN."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim)
        self.up_proj = nn.Linear(dim, hidden_dim)
        self.norm = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.down_proj = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """(..., dim) -> (..., dim)"""
        return self.down_proj(self.norm(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class EVA02Block(nn.Module):
    """Pre-norm transformer block: RoPE attention (in windows or global), then SwiGLU."""

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        drop_path: float,
        window_size: int,
        rope_pretrain_grid: int,
    ):
        """
        Args:
            dim, num_heads, qkv_bias, rope_pretrain_grid: see :class:`RoPEAttention`.
            mlp_ratio: SwiGLU hidden units per channel (``int(dim * mlp_ratio)`` units).
            drop_path: stochastic depth rate of both residual branches (needs ``timm`` if > 0).
            window_size: attention within non-overlapping windows of this many tokens a side
                (the map zero-padded to a multiple after ``norm1``); 0 for global attention.
        """
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = RoPEAttention(
            dim, num_heads=num_heads, qkv_bias=qkv_bias, rope_pretrain_grid=rope_pretrain_grid
        )
        if drop_path > 0.0:
            from timm.layers import DropPath

            self.drop_path = DropPath(drop_path)
        else:
            self.drop_path = nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = SwiGLU(dim, int(dim * mlp_ratio))
        self.window_size = window_size

    def forward(self, x: Tensor) -> Tensor:
        """(B, H, W, C) -> (B, H, W, C)"""
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            height, width = x.shape[1:3]
            x, padded_hw = window_partition(x, self.window_size)
        x = self.attn(x)
        if self.window_size > 0:
            x = window_unpartition(x, self.window_size, padded_hw, (height, width))
        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class EVA02ViT(Backbone):
    """
    EVA-02 plain ViT: one feature map at stride ``patch_size``, ``embed_dim`` channels, named
    ``out_feature``. Global blocks take any input size; the absolute position embedding is
    interpolated (bicubic) from the pretraining grid to the input's.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        global_block_indexes: Sequence[int],
        drop_path_rate: float = 0.0,
        mlp_ratio: float = 4 * 2 / 3,
        qkv_bias: bool = True,
        patch_size: int = _PATCH_SIZE,
        in_chans: int = 3,
        pretrain_img_size: int = 512,
        pretrain_use_cls_token: bool = True,
        rope_pretrain_grid: int = 16,
        use_act_checkpoint: bool = False,
        out_feature: str = "last_feat",
    ):
        """
        Args:
            embed_dim: token channels.
            depth: number of blocks.
            num_heads: attention heads per block (head dim divisible by 4).
            window_size: window side, in tokens, of the window-attention blocks.
            global_block_indexes: blocks with global attention; all others use windows.
            drop_path_rate: stochastic depth of the last block, rising linearly from 0 over
                the blocks (needs ``timm`` if > 0).
            mlp_ratio: SwiGLU hidden units per channel (EVA-02: 4 * 2 / 3).
            qkv_bias: learnable query and value biases.
            patch_size: side of the patches, i.e. the output stride.
            in_chans: input image channels.
            pretrain_img_size: image side the position embedding is stored for; it holds
                ``(pretrain_img_size / patch_size) ** 2`` positions (+ 1 with the class token).
            pretrain_use_cls_token: the position embedding has a leading class-token row
                (ignored at detection time).
            rope_pretrain_grid: token grid side of the RoPE pretraining (see ``rotary_angles``).
            use_act_checkpoint: recompute each block in the backward pass to save memory.
            out_feature: name of the output.
        """
        super().__init__()
        global_blocks = set(global_block_indexes)
        unknown = sorted(global_blocks - set(range(depth)))
        if unknown:
            raise ValueError(f"global_block_indexes {unknown} are not blocks of 0..{depth - 1}")
        if window_size < 1:
            raise ValueError(f"window_size must be positive, got {window_size}")
        self.patch_embed = PatchEmbed(
            kernel_size=(patch_size, patch_size),
            stride=(patch_size, patch_size),
            in_chans=in_chans,
            embed_dim=embed_dim,
        )
        num_positions = (pretrain_img_size // patch_size) ** 2 + int(pretrain_use_cls_token)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_positions, embed_dim))
        self.pretrain_use_cls_token = pretrain_use_cls_token

        # float32 rates as the authors', on the host also under another default device
        drop_path_rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            EVA02Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                drop_path=drop_path_rates[index],
                window_size=0 if index in global_blocks else window_size,
                rope_pretrain_grid=rope_pretrain_grid,
            )
            for index in range(depth)
        )
        # the authors' output norm keeps PyTorch's default eps, unlike the blocks' 1e-6
        self.out_norm = nn.LayerNorm(embed_dim)
        self.use_act_checkpoint = use_act_checkpoint

        self._out_features = [out_feature]
        self._out_feature_channels = {out_feature: embed_dim}
        self._out_feature_strides = {out_feature: patch_size}

        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, images: Tensor) -> Dict[str, Tensor]:
        """
        Args:
            images: (B, in_chans, H, W).
        Returns:
            ``{out_feature: (B, embed_dim, H // patch_size, W // patch_size)}``.
        """
        x = self.patch_embed(images)  # (B, h, w, C)
        x = x + get_abs_pos(self.pos_embed, self.pretrain_use_cls_token, x.shape[1:3])
        for block in self.blocks:
            if self.use_act_checkpoint and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return {self._out_features[0]: self.out_norm(x).permute(0, 3, 1, 2)}


def build_eva02_vit(
    *,
    size: str = "L",
    window_size: int,
    global_block_indexes: Sequence[int],
    drop_path_rate: float,
    use_act_checkpoint: bool = False,
    out_feature: str = "last_feat",
) -> EVA02ViT:
    """
    An EVA-02 ViT as in the authors' Co-DINO ViT configs: patch 16, SwiGLU ratio 4 * 2 / 3,
    q / v biases, position embedding stored for 512 x 512 images (32 x 32 + class token),
    RoPE pretrained on a 16 x 16 grid. Smaller models: :class:`EVA02ViT` directly.

    Args:
        size: a key of :data:`EVA02_SIZES` ("L": 1024 channels, 24 blocks, 16 heads).
        window_size: window side in tokens; the authors' COCO config uses 24, LVIS 16.
        global_block_indexes: blocks with global attention; COCO (3, 7, ..., 23),
            LVIS (2, 5, ..., 23).
        drop_path_rate: stochastic depth of the last block; COCO 0.4, LVIS 0.3.
        use_act_checkpoint: recompute each block in the backward pass (the authors do).
        out_feature: name of the output.
    Returns:
        the backbone; ``forward`` maps (B, 3, H, W) to
        ``{out_feature: (B, embed_dim, H // 16, W // 16)}``.
    """
    return EVA02ViT(
        **_size(size)._asdict(),
        window_size=window_size,
        global_block_indexes=global_block_indexes,
        drop_path_rate=drop_path_rate,
        use_act_checkpoint=use_act_checkpoint,
        out_feature=out_feature,
    )


def eva02_vit_output_shape(
    *, size: str = "L", out_feature: str = "last_feat"
) -> Dict[str, ShapeSpec]:
    """
    The output shape of ``build_eva02_vit(size=size, out_feature=out_feature)`` without
    building it, e.g. as the neck's ``input_shape`` in a config.
    """
    return {out_feature: ShapeSpec(channels=_size(size).embed_dim, stride=_PATCH_SIZE)}
