"""
Official Swin weights through the name mapping give our (detectron2) Swin the same features as
an independent implementation (timm's), and the authors' Co-DETR Swin checkpoints convert.

timm stores Swin under slightly different names than the official checkpoints;
:func:`_official_state_dict` undoes its renaming (the inverse of timm's own
``checkpoint_filter_fn``):

- timm puts patch merging at the start of stage s+1 (``layers.{s+1}.downsample``), the
  official code at the end of stage s (``layers.{s}.downsample``);
- timm's classifier is ``head.fc``, the official one ``head``;
- timm does not save the ``relative_position_index`` and ``attn_mask`` buffers, the official
  checkpoints do: they are added from timm's modules.
"""
import re

import pytest
import timm.models.swin_transformer as timm_swin
import torch
import torch.nn.functional as F
from detectron2.modeling.backbone.swin import SwinTransformer
from torch import nn

from codetr.checkpoint.official import convert_official_state_dict, official_key_to_ours
from codetr.checkpoint.swin import convert_official_swin, is_official_swin_state_dict, swin_key
from codetr.modeling import ChannelMapper
from codetr.modeling.swin import build_swin

from ..modeling.tiny_models import EMBED_DIM, build_tiny_dino

# a tiny Swin: 4 stages of 2 blocks, 24..192 channels, head dim 12
TINY = dict(embed_dim=24, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16))
STAGES = ["p0", "p1", "p2", "p3"]


def _official_state_dict(model: timm_swin.SwinTransformer):
    """timm's Swin state dict under the names and with the buffers of the official files."""
    state_dict = {}
    for key, value in model.state_dict().items():
        key = re.sub(r"^layers\.(\d+)\.downsample\.",
                     lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", key)
        state_dict[re.sub(r"^head\.fc\.", "head.", key)] = value
    for s, stage in enumerate(model.layers):
        for b, block in enumerate(stage.blocks):
            prefix = f"layers.{s}.blocks.{b}."
            state_dict[prefix + "attn.relative_position_index"] = block.attn.relative_position_index
            if block.attn_mask is not None:
                state_dict[prefix + "attn_mask"] = block.attn_mask
    return state_dict


def _randomize(model: nn.Module, seed: int) -> None:
    """Random values for every parameter (timm starts biases at 0 and LayerNorms at 1 / 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.1
            is_norm_weight = name.endswith("weight") and param.dim() == 1
            param.copy_(noise + 1.0 if is_norm_weight else noise)


def _timm_swin(*, window_size: int, image_size, **kwargs) -> timm_swin.SwinTransformer:
    # the detection variant (detectron2's, the authors') shifts every second block even when a
    # stage's feature map is no larger than the window: timm's always_partition=True
    return timm_swin.SwinTransformer(
        img_size=image_size, window_size=window_size, always_partition=True, num_classes=10,
        drop_path_rate=0.0, **kwargs
    ).eval()


def _expected_features(reference, ours: SwinTransformer, images):
    """timm's stage outputs, then our output norms (timm has none per stage)."""
    with torch.no_grad():
        stages = reference.forward_intermediates(images, norm=False, intermediates_only=True)
    expected = {}
    for index, feature in enumerate(stages):
        norm = getattr(ours, f"norm{index}")
        expected[f"p{index}"] = F.layer_norm(
            feature.permute(0, 2, 3, 1), norm.normalized_shape, norm.weight, norm.bias, norm.eps
        ).permute(0, 3, 1, 2)
    return expected


def _load_official(ours: SwinTransformer, official):
    converted = convert_official_swin(official, prefix="")
    incompatible = ours.load_state_dict(converted, strict=False)
    # the output norms are not in classification checkpoints (they keep their initialisation)
    assert sorted(incompatible.missing_keys) == sorted(
        f"norm{i}.{p}" for i in range(4) for p in ("weight", "bias")
    )
    assert incompatible.unexpected_keys == []
    return converted


# ------------------------------------------------------------------------------ names
def test_key_names():
    same = [
        "patch_embed.proj.weight",
        "patch_embed.norm.bias",
        "layers.2.blocks.17.norm1.weight",
        "layers.2.blocks.17.attn.qkv.bias",
        "layers.0.blocks.1.attn.proj.weight",
        "layers.3.blocks.0.attn.relative_position_bias_table",
        "layers.3.blocks.0.attn.relative_position_index",
        "layers.1.blocks.0.mlp.fc1.weight",
        "layers.1.blocks.0.mlp.fc2.bias",
        "layers.0.downsample.reduction.weight",
        "layers.2.downsample.norm.weight",
        "norm3.bias",
    ]
    for key in same:
        assert swin_key(key) == key
    for key in ["head.weight", "norm.weight", "layers.0.blocks.1.attn_mask",
                "layers.0.blocks.1.attn.qkv.scale", "layers.1.0.conv1.weight", "conv1.weight",
                "layers.0.downsample.reduction.bias", "absolute_pos_embed"]:
        assert swin_key(key) is None, key


def test_convert_drops_the_classifier_and_adds_the_prefix():
    torch.manual_seed(0)
    official = _official_state_dict(_timm_swin(window_size=4, image_size=(32, 32), **TINY))
    assert "head.weight" in official and "norm.weight" in official
    assert "layers.0.blocks.1.attn_mask" in official
    assert "layers.0.downsample.reduction.weight" in official
    assert not any(k.startswith("layers.3.downsample") for k in official)
    converted = convert_official_swin(official)
    assert all(k.startswith("backbone.") for k in converted)
    assert not any(k.startswith(("backbone.head.", "backbone.norm.")) for k in converted)
    assert not any(k.endswith("attn_mask") for k in converted)
    assert converted["backbone.layers.0.blocks.1.mlp.fc2.weight"] is \
        official["layers.0.blocks.1.mlp.fc2.weight"]
    dropped = {k for k in official if k.startswith(("head.", "norm.")) or k.endswith("attn_mask")}
    assert len(converted) == len(official) - len(dropped)


def test_unknown_keys_raise():
    with pytest.raises(ValueError, match="layer1.0.conv1.weight"):
        convert_official_swin({"patch_embed.proj.weight": torch.zeros(1),
                               "layer1.0.conv1.weight": torch.zeros(1)})


def test_is_official_swin_state_dict():
    official = {"patch_embed.proj.weight": torch.zeros(1),
                "layers.0.blocks.0.attn.qkv.weight": torch.zeros(1), "head.weight": torch.zeros(1)}
    assert is_official_swin_state_dict(official)
    assert not is_official_swin_state_dict({"backbone." + k: v for k, v in official.items()})
    assert not is_official_swin_state_dict({"conv1.weight": torch.zeros(1),
                                            "layer1.0.conv1.weight": torch.zeros(1)})


# ------------------------------------------------------------------------------ features
@pytest.mark.parametrize("window_size, image_size", [(4, (128, 256)), (3, (96, 96))])
def test_same_features_as_timm_tiny(window_size, image_size):
    reference = _timm_swin(window_size=window_size, image_size=image_size, **TINY)
    _randomize(reference, seed=0)
    ours = SwinTransformer(window_size=window_size, drop_path_rate=0.0, **TINY).eval()
    converted = _load_official(ours, _official_state_dict(reference))
    _randomize(nn.ModuleList(getattr(ours, f"norm{i}") for i in range(4)), seed=1)
    # the index buffers of the checkpoint are the ones the model computes itself
    for key, value in converted.items():
        if key.endswith("relative_position_index"):
            assert torch.equal(value, ours.state_dict()[key])

    images = torch.randn(2, *(3, *image_size), generator=torch.Generator().manual_seed(2))
    expected = _expected_features(reference, ours, images)
    with torch.no_grad():
        actual = ours(images)
    assert list(actual) == STAGES
    for name in STAGES:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-5)


def test_same_features_as_timm_swin_tiny_224():
    """The official Swin-T architecture (random weights) against ``build_swin(size="T")``."""
    torch.manual_seed(0)
    reference = timm_swin.swin_tiny_patch4_window7_224(
        pretrained=False, always_partition=True, drop_path_rate=0.0
    ).eval()
    ours = build_swin(size="T", window_size=7, out_features=STAGES, drop_path_rate=0.0).eval()
    _load_official(ours, _official_state_dict(reference))
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    expected = _expected_features(reference, ours, images)
    with torch.no_grad():
        actual = ours(images)
    for name in STAGES:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ Co-DETR
def test_authors_swin_checkpoint_backbone_keys():
    assert official_key_to_ours("backbone.layers.2.blocks.5.attn.qkv.weight") == \
        "backbone.layers.2.blocks.5.attn.qkv.weight"
    assert official_key_to_ours("backbone.layers.0.blocks.0.mlp.fc1.bias") == \
        "backbone.layers.0.blocks.0.mlp.fc1.bias"
    assert official_key_to_ours("backbone.norm1.weight") == "backbone.norm1.weight"
    assert official_key_to_ours("backbone.head.weight") is None
    # ResNet backbones are unaffected
    assert official_key_to_ours("backbone.layer1.0.conv1.weight") == "backbone.res2.0.conv1.weight"
    assert official_key_to_ours("backbone.bn1.running_mean") == \
        "backbone.stem.conv1.norm.running_mean"


def test_authors_swin_checkpoint_converts():
    """The ``backbone.`` part of an authors' Co-DETR Swin checkpoint (official names plus the
    detection output norms ``norm{i}`` of the returned stages, here 1..3 as in the
    Co-Deformable-DETR configs) fills the whole Swin backbone of a Co-DINO model."""
    reference = _timm_swin(window_size=4, image_size=(32, 32), **TINY)
    _randomize(reference, seed=4)
    backbone_names = {
        k: v for k, v in _official_state_dict(reference).items()
        if not (k.startswith(("head.", "norm.")) or k.endswith("attn_mask"))
    }
    generator = torch.Generator().manual_seed(5)
    for i, channels in zip((1, 2, 3), (48, 96, 192)):
        backbone_names[f"norm{i}.weight"] = torch.rand(channels, generator=generator)
        backbone_names[f"norm{i}.bias"] = torch.rand(channels, generator=generator)
    authors = {"backbone." + k: v for k, v in backbone_names.items()}

    backbone = SwinTransformer(window_size=4, out_indices=(1, 2, 3), drop_path_rate=0.0, **TINY)
    neck = ChannelMapper(input_shape=backbone.output_shape(), in_features=["p1", "p2", "p3"],
                         out_channels=EMBED_DIM, num_extra_levels=2)
    model = build_tiny_dino(backbone=backbone, neck=neck)
    converted, report = convert_official_state_dict(authors, model)
    assert report.unused == [] and report.shape_mismatches == [], report.summary()
    assert not any(k.startswith("backbone.") for k in report.missing)
    assert converted.keys() == authors.keys()
    for key, value in authors.items():
        assert torch.equal(converted[key], value)
    backbone_state = {k[len("backbone."):]: v for k, v in converted.items()}
    model.backbone.load_state_dict(backbone_state, strict=True)
