"""EVA-02 checkpoints as published: names, patch / position embedding resizing, loading."""

import os
import tempfile
import unittest

import torch
import torch.nn.functional as F
from torch import nn

from codetr.checkpoint import (
    convert_published_eva02,
    eva02_key,
    published_eva02_state_dict,
    resize_patch_embed,
    resize_pos_embed,
)
from codetr.engine.checkpointer import AtomicCheckpointer
from codetr.modeling.eva_vit import EVA02ViT

# our name -> the published one, written out independently of the converter's rules
_PUBLISHED_NAMES = [
    (".attn.q_proj.bias", ".attn.q_bias"),
    (".attn.v_proj.bias", ".attn.v_bias"),
    (".mlp.gate_proj.", ".mlp.w1."),
    (".mlp.up_proj.", ".mlp.w2."),
    (".mlp.norm.", ".mlp.ffn_ln."),
    (".mlp.down_proj.", ".mlp.w3."),
]


def tiny_vit(pretrain_img_size: int = 64) -> EVA02ViT:
    """2 blocks, 32 channels, 2 heads; position embedding 4 x 4 + class token at 64."""
    torch.manual_seed(0)
    model = EVA02ViT(
        embed_dim=32,
        depth=2,
        num_heads=2,
        window_size=2,
        global_block_indexes=[1],
        pretrain_img_size=pretrain_img_size,
    )
    with torch.no_grad():
        for value in model.state_dict().values():
            value.copy_(torch.randn_like(value))
    return model


def published_name(ours: str) -> str:
    for our_part, their_part in _PUBLISHED_NAMES:
        ours = ours.replace(our_part, their_part)
    return ours


def published_state_dict(model: nn.Module, prefix: str = "") -> dict:
    """``model``'s backbone in EVA-02's names, with the tensors a pretraining file also holds."""
    state = {
        published_name(k[len(prefix) :]): v
        for k, v in model.state_dict().items()
        if k.startswith(prefix) and not k.startswith(prefix + "out_norm.")
    }
    state.update(
        {
            "cls_token": torch.randn(1, 1, 32),
            "mask_token": torch.randn(1, 1, 32),
            "norm.weight": torch.randn(32),
            "norm.bias": torch.randn(32),
            "lm_head.weight": torch.randn(8, 32),
            "lm_head.bias": torch.randn(8),
            "rope.freqs_cos": torch.randn(16, 8),
            "rope.freqs_sin": torch.randn(16, 8),
            "blocks.0.attn.rope.freqs_cos": torch.randn(16, 8),
        }
    )
    return state


class TestEVA02Names(unittest.TestCase):
    def test_key_names(self):
        expected = {
            "patch_embed.proj.weight": "patch_embed.proj.weight",
            "pos_embed": "pos_embed",
            "blocks.11.attn.q_bias": "blocks.11.attn.q_proj.bias",
            "blocks.0.attn.v_bias": "blocks.0.attn.v_proj.bias",
            "blocks.3.attn.k_proj.weight": "blocks.3.attn.k_proj.weight",
            "blocks.2.mlp.w1.bias": "blocks.2.mlp.gate_proj.bias",
            "blocks.2.mlp.w2.weight": "blocks.2.mlp.up_proj.weight",
            "blocks.2.mlp.ffn_ln.weight": "blocks.2.mlp.norm.weight",
            "blocks.2.mlp.w3.weight": "blocks.2.mlp.down_proj.weight",
            "out_norm.bias": "out_norm.bias",
        }
        for source, target in expected.items():
            self.assertEqual(eva02_key(source), target, source)
        for other in (
            "cls_token",
            "norm.weight",
            "rope.freqs_cos",
            "layers.0.blocks.0.norm1.weight",
        ):
            self.assertIsNone(eva02_key(other), other)

    def test_round_trip_is_bitwise(self):
        model = tiny_vit()
        converted = convert_published_eva02(
            published_state_dict(model), model.state_dict(), prefix=""
        )
        ours = model.state_dict()
        self.assertEqual(set(converted), set(ours) - {"out_norm.weight", "out_norm.bias"})
        for key, value in converted.items():
            self.assertTrue(torch.equal(value, ours[key]), key)

    def test_unknown_keys_raise(self):
        state = published_state_dict(tiny_vit())
        state["blocks.0.attn.extra"] = torch.zeros(1)
        state["decoder.weight"] = torch.zeros(1)
        with self.assertRaisesRegex(ValueError, r"EVA-02.*blocks\.0\.attn\.extra.*decoder\.weight"):
            convert_published_eva02(state)

    def test_unwrapping(self):
        state = published_state_dict(tiny_vit())
        for checkpoint in (
            state,
            {"module": state},
            {"model": {"module": state}},
            {"model_ema": state, "model": {"x": torch.zeros(1)}},
            {"model": {f"module.{k}": v for k, v in state.items()}},
        ):
            self.assertEqual(published_eva02_state_dict(checkpoint).keys(), state.keys())
        ours = {"model": {"backbone." + k: v for k, v in tiny_vit().state_dict().items()}}
        self.assertIsNone(published_eva02_state_dict(ours))
        self.assertIsNone(published_eva02_state_dict({"model": {"conv1.weight": torch.zeros(1)}}))


class TestEVA02Resizing(unittest.TestCase):
    def test_patch_embed_14_to_16(self):
        weight = torch.randn(32, 3, 14, 14)
        expected = F.interpolate(weight, size=(16, 16), mode="bicubic", align_corners=False)
        self.assertTrue(torch.equal(resize_patch_embed(weight, 16), expected))
        same = torch.randn(32, 3, 16, 16)
        self.assertIs(resize_patch_embed(same, 16), same)

    def test_pos_embed_grid_and_class_token(self):
        pos_embed = torch.randn(1, 1 + 16 * 16, 8)
        grid = pos_embed[:, 1:].reshape(1, 16, 16, 8).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(32, 32), mode="bicubic", align_corners=False)
        expected = torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, 1024, 8)], 1)
        self.assertTrue(torch.equal(resize_pos_embed(pos_embed, 1 + 32 * 32), expected))
        # a model without the class-token row
        self.assertTrue(torch.equal(resize_pos_embed(pos_embed, 32 * 32), expected[:, 1:]))
        with self.assertRaisesRegex(ValueError, "class-token"):
            resize_pos_embed(pos_embed[:, 1:], 1 + 32 * 32)
        with self.assertRaisesRegex(ValueError, "square"):
            resize_pos_embed(torch.zeros(1, 7, 8), 17)

    def test_defaults_are_the_authors(self):
        model = tiny_vit(pretrain_img_size=14 * 4)  # patch 16 stored, grid 3 x 3 + cls
        state = published_state_dict(model)
        state["patch_embed.proj.weight"] = torch.randn(32, 3, 14, 14)
        converted = convert_published_eva02(state)
        self.assertEqual(converted["backbone.patch_embed.proj.weight"].shape, (32, 3, 16, 16))
        self.assertEqual(converted["backbone.pos_embed"].shape, (1, 1 + 32 * 32, 32))


class TestInitCheckpoint(unittest.TestCase):
    def test_published_file_loads_resized(self):
        """A patch-14, 2 x 2-grid file into a patch-16 model of a 4 x 4 grid."""

        class Detector(nn.Module):
            def __init__(self):
                super().__init__()
                self.backbone = tiny_vit()

        source = published_state_dict(tiny_vit(pretrain_img_size=32))
        source["patch_embed.proj.weight"] = torch.randn(32, 3, 14, 14)
        model = Detector()
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "eva02_L_pt_m38m_p14.pt")
            torch.save({"module": source}, path)
            AtomicCheckpointer(model).load(path)
        state = model.state_dict()
        expected_patch = F.interpolate(
            source["patch_embed.proj.weight"], size=(16, 16), mode="bicubic", align_corners=False
        )
        self.assertTrue(torch.equal(state["backbone.patch_embed.proj.weight"], expected_patch))
        self.assertTrue(
            torch.equal(state["backbone.pos_embed"], resize_pos_embed(source["pos_embed"], 17))
        )
        self.assertTrue(
            torch.equal(state["backbone.blocks.1.attn.q_proj.bias"], source["blocks.1.attn.q_bias"])
        )
        self.assertTrue(
            torch.equal(
                state["backbone.blocks.0.mlp.norm.weight"], source["blocks.0.mlp.ffn_ln.weight"]
            )
        )
