"""EVA-02 ViT: RoPE tables, blocks against a dense computation, checkpointing, layout, ViT-L."""

import math

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling import Backbone
from detectron2.modeling.backbone.utils import get_abs_pos
from detectron2.modeling.backbone.vit import get_vit_lr_decay_rate

from codetr.modeling import EVA02ViT, build_eva02_vit
from codetr.modeling.eva_vit import (
    EVA02Block,
    apply_rotary,
    eva02_vit_output_shape,
    rotary_angles,
)

DIM, HEADS = 32, 2  # head dim 16: 8 channels (4 pairs) rotate with the row, 8 with the column


def _randomized(module, seed=0):
    """Every parameter drawn at random (LayerNorm affine included), so that each one matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    return module


def _block(window_size, drop_path=0.0):
    block = EVA02Block(
        dim=DIM,
        num_heads=HEADS,
        mlp_ratio=4 * 2 / 3,
        qkv_bias=True,
        drop_path=drop_path,
        window_size=window_size,
        rope_pretrain_grid=16,
    )
    return _randomized(block)


# ------------------------------------------------------------- a dense reference, by hand
def _rotate_by_hand(x, height, width):
    """x (heads, N, D), tokens row-major on a height x width grid: pair p = (2p, 2p + 1) turns
    by position * 10000 ** (-2m / (D / 2)), m = p mod D / 4, position = row * 16 / height for
    the first D / 4 pairs and column * 16 / width for the others."""
    head_dim = x.shape[-1]
    out = torch.empty_like(x)
    for token in range(height * width):
        row, column = divmod(token, width)
        for pair in range(head_dim // 2):
            along_rows = pair < head_dim // 4
            m = pair % (head_dim // 4)
            position = row * 16 / height if along_rows else column * 16 / width
            angle = position * 10000 ** (-2 * m / (head_dim / 2))
            cos, sin = math.cos(angle), math.sin(angle)
            x0, x1 = x[:, token, 2 * pair], x[:, token, 2 * pair + 1]
            out[:, token, 2 * pair] = x0 * cos - x1 * sin
            out[:, token, 2 * pair + 1] = x0 * sin + x1 * cos
    return out


def _attention_by_hand(attn, grid):
    """One (h, w, C) grid attended densely: softmax(Q K^T / sqrt(d)) V per head."""
    height, width, dim = grid.shape
    tokens = grid.reshape(height * width, dim)
    q = tokens @ attn.q_proj.weight.T + attn.q_proj.bias
    k = tokens @ attn.k_proj.weight.T  # no key bias
    v = tokens @ attn.v_proj.weight.T + attn.v_proj.bias
    q, k, v = (t.reshape(height * width, HEADS, -1).transpose(0, 1) for t in (q, k, v))
    q, k = _rotate_by_hand(q, height, width), _rotate_by_hand(k, height, width)
    weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
    heads = (weights @ v).transpose(0, 1).reshape(height * width, dim)
    return (heads @ attn.proj.weight.T + attn.proj.bias).reshape(height, width, dim)


def _block_by_hand(block, x, window_size=0):
    """x (B, H, W, C); windows: the normalized map zero-padded to a multiple of the window."""
    normed = F.layer_norm(x, (DIM,), block.norm1.weight, block.norm1.bias, eps=1e-6)
    attended = []
    for grid in normed:
        if window_size:
            height, width = grid.shape[:2]
            padded = F.pad(grid, (0, 0, 0, -width % window_size, 0, -height % window_size))
            out = torch.zeros_like(padded)
            for top in range(0, padded.shape[0], window_size):
                for left in range(0, padded.shape[1], window_size):
                    window = (slice(top, top + window_size), slice(left, left + window_size))
                    out[window] = _attention_by_hand(block.attn, padded[window])
            attended.append(out[:height, :width])
        else:
            attended.append(_attention_by_hand(block.attn, grid))
    x = x + torch.stack(attended)
    mlp = block.mlp
    hidden = F.layer_norm(x, (DIM,), block.norm2.weight, block.norm2.bias, eps=1e-6)
    gate = hidden @ mlp.gate_proj.weight.T + mlp.gate_proj.bias
    up = hidden @ mlp.up_proj.weight.T + mlp.up_proj.bias
    swiglu = gate * torch.sigmoid(gate) * up
    hidden = F.layer_norm(swiglu, (swiglu.shape[-1],), mlp.norm.weight, mlp.norm.bias, eps=1e-6)
    return x + hidden @ mlp.down_proj.weight.T + mlp.down_proj.bias


# --------------------------------------------------------------------------------- RoPE
def test_rotary_angles_hand_case():
    # 2 x 2 grid, head dim 8: positions 0 and 1 * 16 / 2 = 8 per axis, frequencies
    # 10000 ** (-0 / 4) = 1 and 10000 ** (-2 / 4) = 0.01, each repeated for a channel pair
    r = [8.0, 8.0, 0.08, 0.08]
    zero = [0.0] * 4
    expected = torch.tensor([zero + zero, zero + r, r + zero, r + r])
    torch.testing.assert_close(rotary_angles(2, 2, 8), expected, rtol=1e-6, atol=0)


def test_rotary_angles_stretch_every_axis_to_the_pretraining_grid():
    # a 24-token window (the COCO config's) and a 3 x 5 map: token r of n sits at r * 16 / n
    window = rotary_angles(24, 24, 64)
    assert window.shape == (24 * 24, 64)
    assert window[5 * 24 + 7, 0].item() == pytest.approx(5 * 16 / 24)
    assert window[5 * 24 + 7, 32].item() == pytest.approx(7 * 16 / 24)
    assert window[5 * 24 + 7, 2].item() == pytest.approx(5 * 16 / 24 * 10000 ** (-2 / 32))
    grid = rotary_angles(3, 5, 8)
    assert grid[2 * 5 + 4, 0].item() == pytest.approx(2 * 16 / 3)
    assert grid[2 * 5 + 4, 4].item() == pytest.approx(4 * 16 / 5)
    with pytest.raises(ValueError, match="divisible by 4"):
        rotary_angles(2, 2, 6)


def test_apply_rotary_turns_each_pair():
    x = torch.tensor([[1.0, 0.0, 3.0, 4.0]])
    angles = torch.tensor([[math.pi / 2, math.pi / 2, math.pi, math.pi]])
    torch.testing.assert_close(apply_rotary(x, angles), torch.tensor([[0.0, 1.0, -3.0, -4.0]]))


# ------------------------------------------------------------------------------- blocks
def test_global_block_matches_dense_computation():
    block = _block(window_size=0)
    x = torch.randn(2, 3, 5, DIM, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(block(x), _block_by_hand(block, x), rtol=1e-5, atol=1e-5)


def test_window_block_matches_dense_computation_per_window():
    # 5 x 7 tokens in 3 x 3 windows: padded to 6 x 9, every window rotated as its own grid
    block = _block(window_size=3)
    x = torch.randn(2, 5, 7, DIM, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = block(x)
        torch.testing.assert_close(out, _block_by_hand(block, x, 3), rtol=1e-5, atol=1e-5)
        # and it is not the global computation
        assert not torch.allclose(out, _block_by_hand(block, x), atol=1e-3)


def _tiny_vit(**kwargs):
    torch.manual_seed(0)
    args = dict(
        embed_dim=DIM,
        depth=3,
        num_heads=HEADS,
        window_size=2,
        global_block_indexes=[1],
        pretrain_img_size=64,
    )
    return EVA02ViT(**{**args, **kwargs})


def test_block_layout_and_stochastic_depth():
    vit = _tiny_vit(depth=6, global_block_indexes=[2, 5], drop_path_rate=0.5)
    assert [block.window_size for block in vit.blocks] == [2, 2, 0, 2, 2, 0]
    assert isinstance(vit.blocks[0].drop_path, torch.nn.Identity)
    drop_probs = [block.drop_path.drop_prob for block in vit.blocks[1:]]
    assert drop_probs == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    with pytest.raises(ValueError, match=r"\[6\] are not blocks"):
        _tiny_vit(depth=6, global_block_indexes=[2, 6])


def test_activation_checkpointing_gives_identical_outputs_and_gradients():
    vit = _tiny_vit(drop_path_rate=0.3).train()
    images = torch.randn(2, 3, 48, 64, generator=torch.Generator().manual_seed(3))
    results = []
    for use_act_checkpoint in (False, True):
        vit.use_act_checkpoint = use_act_checkpoint
        vit.zero_grad()
        torch.manual_seed(4)  # the same drop-path draws, replayed in the recomputation
        out = vit(images)["last_feat"]
        out.square().sum().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in vit.named_parameters()}))
    (out_plain, grads_plain), (out_ckpt, grads_ckpt) = results
    assert torch.equal(out_plain, out_ckpt)
    assert grads_plain.keys() == grads_ckpt.keys()
    assert all(torch.equal(grads_plain[name], grads_ckpt[name]) for name in grads_plain)


# ----------------------------------------------------------------------------- backbone
def test_abs_pos_embed_interpolated_to_the_input_grid():
    vit = _tiny_vit()  # stored for 64 x 64 images: a 4 x 4 grid and a class-token row
    assert vit.pos_embed.shape == (1, 1 + 4 * 4, DIM)
    assert get_abs_pos(vit.pos_embed, True, (5, 7)).shape == (1, 5, 7, DIM)
    torch.testing.assert_close(
        get_abs_pos(vit.pos_embed, True, (4, 4)), vit.pos_embed[:, 1:].reshape(1, 4, 4, DIM)
    )
    images = torch.randn(2, 3, 80, 112, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        features = vit(images)
    assert isinstance(vit, Backbone)
    assert vit.output_shape() == {"last_feat": ShapeSpec(channels=DIM, stride=16)}
    assert {k: tuple(v.shape) for k, v in features.items()} == {"last_feat": (2, DIM, 5, 7)}


def test_vit_l_parameters_and_layer_decay_names():
    with torch.device("meta"):
        vit = build_eva02_vit(
            size="L", window_size=24, global_block_indexes=range(3, 24, 4), drop_path_rate=0.4
        )
    assert eva02_vit_output_shape(size="L") == vit.output_shape()
    assert vit.output_shape() == {"last_feat": ShapeSpec(channels=1024, stride=16)}
    assert [i for i, block in enumerate(vit.blocks) if block.window_size == 0] == [
        3,
        7,
        11,
        15,
        19,
        23,
    ]
    shapes = {name: tuple(p.shape) for name, p in vit.named_parameters()}
    assert shapes["pos_embed"] == (1, 1 + 32 * 32, 1024)
    assert shapes["patch_embed.proj.weight"] == (1024, 3, 16, 16)
    assert shapes["blocks.0.attn.q_proj.bias"] == (1024,)
    assert "blocks.0.attn.k_proj.bias" not in shapes
    assert shapes["blocks.0.mlp.gate_proj.weight"] == (2730, 1024)  # int(1024 * 8 / 3)
    assert shapes["blocks.0.mlp.norm.weight"] == (2730,)
    assert vit.out_norm.eps == 1e-5 and vit.blocks[0].norm1.eps == 1e-6
    assert sum(p.numel() for p in vit.parameters()) == 304_238_528
    # detectron2's layer-wise lr decay finds the layer of every parameter
    rates = {
        name: get_vit_lr_decay_rate(f"backbone.{name}", lr_decay_rate=0.5, num_layers=24)
        for name in shapes
    }
    assert rates["pos_embed"] == rates["patch_embed.proj.bias"] == 0.5**25
    assert rates["blocks.0.mlp.up_proj.weight"] == 0.5**24
    assert rates["blocks.23.attn.proj.weight"] == 0.5
    assert rates["out_norm.weight"] == 1.0
    with pytest.raises(ValueError, match="size must be one of"):
        eva02_vit_output_shape(size="H")
