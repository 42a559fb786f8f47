"""Swin backbones: builder settings, output shapes, and the Co-DINO Swin-L config's levels."""

from pathlib import Path
from unittest import mock

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.modeling.backbone.swin import SwinTransformer

from codetr.modeling.swin import SWIN_SIZES, build_swin, swin_output_shape

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "models" / "co_dino_swin_l.py"


def _blocks(model: SwinTransformer):
    return [block for layer in model.layers for block in layer.blocks]


def test_sizes_are_the_official_variants():
    # (embed_dim, depths, heads) of Swin-T/S/B/L in the Swin paper and the authors' configs
    expected = {
        "T": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
        "S": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
        "B": (128, (2, 2, 18, 2), (4, 8, 16, 32)),
        "L": (192, (2, 2, 18, 2), (6, 12, 24, 48)),
    }
    assert {
        k: (v.embed_dim, tuple(v.depths), tuple(v.num_heads)) for k, v in SWIN_SIZES.items()
    } == expected


@pytest.fixture(scope="module")
def swin_t():
    torch.manual_seed(0)
    return build_swin(
        size="T", window_size=7, out_features=["p1", "p2", "p3"], drop_path_rate=0.2
    ).eval()


def test_swin_t_structure(swin_t):
    assert isinstance(swin_t, SwinTransformer)
    assert [len(layer.blocks) for layer in swin_t.layers] == [2, 2, 6, 2]
    blocks = _blocks(swin_t)
    assert [b.attn.num_heads for b in blocks] == [3] * 2 + [6] * 2 + [12] * 6 + [24] * 2
    assert all(b.window_size == 7 for b in blocks)
    assert [b.shift_size for b in blocks[:4]] == [0, 3, 0, 3]
    assert blocks[0].attn.relative_position_bias_table.shape == (13 * 13, 3)
    # stochastic depth rises linearly from 0 to drop_path_rate over the 12 blocks
    assert isinstance(blocks[0].drop_path, torch.nn.Identity)
    assert blocks[-1].drop_path.drop_prob == pytest.approx(0.2)
    assert blocks[6].drop_path.drop_prob == pytest.approx(0.2 * 6 / 11)
    assert not swin_t.ape and not hasattr(swin_t, "absolute_pos_embed")
    assert swin_t.patch_embed.norm is not None
    assert not any(layer.use_checkpoint for layer in swin_t.layers)
    # an output norm per returned stage only, nothing frozen
    assert [n for n, _ in swin_t.named_children() if n.startswith("norm")] == [
        "norm1",
        "norm2",
        "norm3",
    ]
    assert all(p.requires_grad for p in swin_t.parameters())


def test_swin_t_output_shapes(swin_t):
    expected_shape = swin_output_shape(size="T", out_features=["p1", "p2", "p3"])
    assert swin_t.output_shape() == expected_shape
    assert {k: (v.channels, v.stride) for k, v in expected_shape.items()} == {
        "p1": (192, 8),
        "p2": (384, 16),
        "p3": (768, 32),
    }
    # a size that is neither a multiple of the patch nor of the window: padded inside
    images = torch.randn(2, 3, 38, 53, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = swin_t(images)
    assert {k: tuple(v.shape) for k, v in features.items()} == {
        "p1": (2, 192, 5, 7),
        "p2": (2, 384, 3, 4),
        "p3": (2, 768, 2, 2),
    }
    assert all(torch.isfinite(v).all() for v in features.values())


def test_batch_size_one_matches_batched(swin_t):
    images = torch.randn(2, 3, 32, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        batched = swin_t(images)
        single = swin_t(images[1:])
    for name in ["p1", "p2", "p3"]:
        torch.testing.assert_close(single[name][0], batched[name][1], rtol=1e-5, atol=1e-5)


def test_checkpointed_blocks_give_the_same_gradients(swin_t):
    """Activation checkpointing in training mode (drop path active, its random draws
    replayed) changes nothing."""
    images = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    grads = []
    swin_t.train()
    try:
        for use_checkpoint in (True, False):
            for layer in swin_t.layers:
                layer.use_checkpoint = use_checkpoint
            swin_t.zero_grad()
            torch.manual_seed(3)
            outputs = swin_t(images)
            sum(o.square().sum() for o in outputs.values()).backward()
            grads.append(swin_t.layers[0].blocks[1].attn.qkv.weight.grad.clone())
    finally:
        for layer in swin_t.layers:
            layer.use_checkpoint = False
        swin_t.zero_grad(set_to_none=True)
        swin_t.eval()
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size", ["T", "S", "B", "L"])
def test_builder_passes_the_settings(size):
    with mock.patch("codetr.modeling.swin.SwinTransformer") as swin:
        build_swin(
            size=size,
            window_size=12,
            out_features=["p1", "p2", "p3"],
            drop_path_rate=0.4,
            use_checkpoint=True,
        )
    kwargs = swin.call_args.kwargs
    spec = SWIN_SIZES[size]
    assert (kwargs["embed_dim"], kwargs["depths"], kwargs["num_heads"]) == (
        spec.embed_dim,
        tuple(spec.depths),
        tuple(spec.num_heads),
    )
    assert kwargs["window_size"] == 12 and kwargs["out_indices"] == (1, 2, 3)
    assert kwargs["drop_path_rate"] == 0.4 and kwargs["use_checkpoint"] is True
    assert kwargs["patch_size"] == 4 and kwargs["mlp_ratio"] == 4.0 and kwargs["qkv_bias"]
    assert not kwargs["ape"] and kwargs["patch_norm"] and kwargs["frozen_stages"] == -1
    assert kwargs["drop_rate"] == 0.0 and kwargs["attn_drop_rate"] == 0.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(size="XL"), "size"),
        (dict(out_features=["p4"]), "out_features"),
        (dict(out_features=["res5"]), "out_features"),
        (dict(out_features=[]), "out_features"),
        (dict(out_features=["p3", "p1"]), "finest first"),
        (dict(out_features=["p1", "p1"]), "distinct"),
        (dict(window_size=0), "window_size"),
        (dict(drop_path_rate=1.0), "drop_path_rate"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_swin(**kwargs)


def test_output_shape_helper_validates():
    with pytest.raises(ValueError, match="size"):
        swin_output_shape(size="H")
    with pytest.raises(ValueError, match="out_features"):
        swin_output_shape(size="L", out_features=["p5"])
    assert {k: v.channels for k, v in swin_output_shape(size="B").items()} == {
        "p0": 128,
        "p1": 256,
        "p2": 512,
        "p3": 1024,
    }


def test_co_dino_swin_l_config_feeds_five_levels():
    """The full-size Swin-L (384 pretraining: window 12) of the authors' Co-DINO Swin-L
    configs, all four stages into the neck plus one extra level."""
    cfg = LazyConfig.load(str(CONFIG))
    torch.manual_seed(0)
    backbone = instantiate(cfg.model.backbone).eval()
    neck = instantiate(cfg.model.neck).eval()

    blocks = _blocks(backbone)
    assert [len(layer.blocks) for layer in backbone.layers] == [2, 2, 18, 2]
    assert all(b.window_size == 12 and b.attn.window_size == (12, 12) for b in blocks)
    assert [b.attn.relative_position_bias_table.shape for b in blocks[::2][:3]] == [
        (23 * 23, 6),
        (23 * 23, 12),
        (23 * 23, 24),
    ]
    assert blocks[-1].drop_path.drop_prob == pytest.approx(0.3)
    assert not any(layer.use_checkpoint for layer in backbone.layers)
    assert {k: (v.channels, v.stride) for k, v in backbone.output_shape().items()} == {
        "p0": (192, 4),
        "p1": (384, 8),
        "p2": (768, 16),
        "p3": (1536, 32),
    }
    assert [conv.weight.shape[1] for conv in neck.convs] == [192, 384, 768, 1536]
    assert {k: v.stride for k, v in neck.output_shape().items()} == {
        "p2": 4,
        "p3": 8,
        "p4": 16,
        "p5": 32,
        "p6": 64,
    }
    assert cfg.model.query_head.encoder.num_levels == 5

    images = torch.randn(1, 3, 32, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        levels = neck(backbone(images))
    assert [tuple(level.shape) for level in levels.values()] == [
        (1, 256, 8, 16),
        (1, 256, 4, 8),
        (1, 256, 2, 4),
        (1, 256, 1, 2),
        (1, 256, 1, 1),
    ]


def test_config_neck_follows_backbone_overrides():
    cfg = LazyConfig.load(str(CONFIG))
    cfg.model.backbone.size = "B"
    cfg.model.backbone.out_features = ["p1", "p2", "p3"]
    neck = instantiate(cfg.model.neck)
    assert neck.in_features == ["p1", "p2", "p3"]
    assert [conv.weight.shape[1] for conv in neck.convs] == [256, 512, 1024]
