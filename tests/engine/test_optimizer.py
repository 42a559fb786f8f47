import functools
import os
import unittest

import torch
from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig, instantiate
from detectron2.modeling.backbone.vit import get_vit_lr_decay_rate
from detectron2.solver import LRMultiplier, get_default_optimizer_params
from fvcore.common.param_scheduler import MultiStepParamScheduler
from torch import nn

from codetr.engine import add_gradient_clipping, lr_factor
from codetr.engine.optimizer import layer_decay_optimizer_params, vit_layer_id

_CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "common")


class _TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(2, 2)
        self.sampling_offsets = nn.Linear(2, 2)
        self.head = nn.Linear(2, 1)


class TestLrFactor(unittest.TestCase):
    def test_co_dino_recipe(self):
        # Co-DINO: only the "backbone" key.
        self.assertEqual(lr_factor("backbone.res2.0.conv1.weight"), 0.1)
        self.assertEqual(lr_factor("backbone.layers.0.blocks.1.attn.qkv.weight"), 0.1)
        self.assertEqual(lr_factor("neck.convs.0.conv.weight"), 1.0)
        self.assertEqual(lr_factor("query_head.cls_branches.0.bias"), 1.0)
        self.assertEqual(
            lr_factor(
                "query_head.transformer.encoder.layers.0.attentions.0.sampling_offsets.weight"
            ),
            1.0,
        )
        self.assertEqual(lr_factor("backbone.adapter.sampling_offsets.weight"), 0.1)
        self.assertEqual(lr_factor("backbone.res2.0.conv1.weight", backbone_multiplier=0.5), 0.5)

    def test_co_deformable_detr_recipe(self):
        factor = {"backbone_multiplier": 0.1, "linear_projection_multiplier": 0.2}
        self.assertEqual(lr_factor("backbone.res5.2.conv3.weight", **factor), 0.1)
        self.assertEqual(
            lr_factor(
                "query_head.transformer.decoder.layers.3.attentions.1.sampling_offsets.bias",
                **factor,
            ),
            0.2,
        )
        # no layer of ours is the authors' one-stage "reference_points": not a key
        self.assertEqual(lr_factor("query_head.reference_points.weight", **factor), 1.0)
        self.assertEqual(
            lr_factor(
                "query_head.transformer.decoder.layers.3.attentions.1" ".attention_weights.weight",
                **factor,
            ),
            1.0,
        )
        # The longest matching key wins; multipliers never compound.
        self.assertEqual(lr_factor("backbone.adapter.sampling_offsets.weight", **factor), 0.2)

    def test_common_optimizer_config(self):
        cfg = LazyConfig.load(os.path.join(_CONFIGS, "optimizer.py"))
        cfg.optimizer.params.model = _TinyNet()
        optimizer = instantiate(cfg.optimizer)
        self.assertIsInstance(optimizer, torch.optim.AdamW)
        lrs = sorted(round(g["lr"], 12) for g in optimizer.param_groups for _ in g["params"])
        # backbone weight + bias at 2e-5, four other tensors at 2e-4.
        self.assertEqual(lrs, [2e-5] * 2 + [2e-4] * 4)
        for group in optimizer.param_groups:
            self.assertEqual(group["weight_decay"], 1e-4)
            self.assertEqual(tuple(group["betas"]), (0.9, 0.999))


class _TinyViT(nn.Module):
    """A ViT with two blocks (detectron2's parameter names) inside a backbone, a neck, a head."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.net = nn.Module()
        self.backbone.net.pos_embed = nn.Parameter(torch.zeros(1, 4, 2))
        self.backbone.net.patch_embed = nn.Conv2d(3, 2, 1)
        self.backbone.net.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(2), nn.Linear(2, 2)) for _ in range(2)
        )
        self.backbone.net.blocks[1].rel_pos_h = nn.Parameter(torch.zeros(3, 2))
        self.backbone.simfp = nn.Linear(2, 2)
        self.neck = nn.Linear(2, 2)
        self.head = nn.Linear(2, 1)
        self.head.frozen = nn.Parameter(torch.zeros(2), requires_grad=False)


# layer id of each parameter of _TinyViT (num_layers=2): embeddings 0, blocks.i i + 1, else 3
_TINY_VIT_LAYERS = {
    "backbone.net.pos_embed": 0,
    "backbone.net.patch_embed.weight": 0,
    "backbone.net.patch_embed.bias": 0,
    "backbone.net.blocks.0.0.weight": 1,
    "backbone.net.blocks.0.0.bias": 1,
    "backbone.net.blocks.0.1.weight": 1,
    "backbone.net.blocks.0.1.bias": 1,
    "backbone.net.blocks.1.rel_pos_h": 2,
    "backbone.net.blocks.1.0.weight": 2,
    "backbone.net.blocks.1.0.bias": 2,
    "backbone.net.blocks.1.1.weight": 2,
    "backbone.net.blocks.1.1.bias": 2,
    "backbone.simfp.weight": 3,
    "backbone.simfp.bias": 3,
    "neck.weight": 3,
    "neck.bias": 3,
    "head.weight": 3,
    "head.bias": 3,
}


class TestLayerDecay(unittest.TestCase):
    # the authors' ViT-L recipe
    DECAY = {"backbone_multiplier": 1.0, "layer_decay": 0.8, "num_layers": 24}

    def test_layer_ids(self):
        for name, layer in (
            ("backbone.pos_embed", 0),
            ("backbone.cls_token", 0),
            ("backbone.mask_token", 0),
            ("backbone.patch_embed.proj.weight", 0),
            ("backbone.net.pos_embed", 0),
            ("backbone.net.patch_embed.proj.bias", 0),
            ("backbone.blocks.0.attn.qkv.weight", 1),
            ("backbone.net.blocks.0.norm1.weight", 1),
            ("backbone.net.blocks.7.attn.rel_pos_h", 8),
            ("backbone.net.blocks.23.mlp.fc2.bias", 24),
            ("backbone.net.blocks.23.residual.conv1.weight", 24),  # the authors' rule
            ("backbone.out_norm.weight", 25),
            ("backbone.simfp_2.0.weight", 25),
            ("neck.convs.0.conv.weight", 25),
            ("query_head.class_heads.0.bias", 25),
            ("query_head.pos_embed", 25),
            ("aux_heads.0.blocks.1.weight", 25),
        ):
            self.assertEqual(vit_layer_id(name, num_layers=24), layer, name)

    def test_hand_made_names(self):
        for name, exponent in (
            ("backbone.pos_embed", 25),
            ("backbone.net.cls_token", 25),
            ("backbone.net.patch_embed.proj.weight", 25),
            ("backbone.net.blocks.0.attn.qkv.weight", 24),
            ("backbone.net.blocks.11.norm2.bias", 13),
            ("backbone.net.blocks.23.mlp.fc1.weight", 1),
            ("backbone.net.out_norm.bias", 0),
            ("backbone.simfp_5.1.norm.weight", 0),
            ("neck.convs.0.conv.weight", 0),
            ("query_head.decoder.layers.5.cross_attn.sampling_offsets.weight", 0),
            ("query_head.class_heads.0.bias", 0),
            ("aux_heads.1.reg_convs.0.weight", 0),
        ):
            self.assertEqual(lr_factor(name, **self.DECAY), 0.8**exponent, name)

    def test_composes_with_the_other_multipliers(self):
        decay = {"layer_decay": 0.8, "num_layers": 24}
        self.assertEqual(
            lr_factor("backbone.net.blocks.3.attn.proj.weight", **decay), 0.1 * 0.8**21
        )
        self.assertEqual(lr_factor("backbone.net.pos_embed", **decay), 0.1 * 0.8**25)
        self.assertEqual(lr_factor("neck.convs.0.conv.weight", **decay), 1.0)
        self.assertEqual(
            lr_factor(
                "query_head.decoder.layers.0.cross_attn.sampling_offsets.bias",
                linear_projection_multiplier=0.1,
                **decay,
            ),
            0.1,
        )
        # off by default
        self.assertEqual(lr_factor("backbone.net.blocks.3.attn.proj.weight"), 0.1)

    def test_same_as_detectron2_without_residual_blocks(self):
        for name in _TINY_VIT_LAYERS:
            self.assertEqual(
                lr_factor(name, backbone_multiplier=1.0, layer_decay=0.7, num_layers=2),
                get_vit_lr_decay_rate(name, lr_decay_rate=0.7, num_layers=2),
                name,
            )

    def test_errors(self):
        with self.assertRaisesRegex(ValueError, "num_layers"):
            lr_factor("backbone.net.blocks.0.attn.qkv.weight", layer_decay=0.8)
        with self.assertRaisesRegex(ValueError, "block 24"):
            lr_factor("backbone.net.blocks.24.attn.qkv.weight", **self.DECAY)

    def _lr_and_weight_decay(self, model, param_groups):
        """Parameter name -> (lr, weight decay) of its group."""
        names = {id(p): n for n, p in model.named_parameters()}
        found = {}
        for group in param_groups:
            for param in group["params"]:
                found[names[id(param)]] = (group["lr"], group["weight_decay"])
        return found

    def test_detectron2_param_groups(self):
        model = _TinyViT()
        params = get_default_optimizer_params(
            model,
            base_lr=1e-3,
            weight_decay=0.05,
            lr_factor_func=functools.partial(
                lr_factor, backbone_multiplier=1.0, layer_decay=0.5, num_layers=2
            ),
        )
        optimizer = torch.optim.AdamW(params, lr=1e-3)
        found = self._lr_and_weight_decay(model, optimizer.param_groups)
        self.assertEqual(set(found), set(_TINY_VIT_LAYERS))
        for name, layer in _TINY_VIT_LAYERS.items():
            self.assertEqual(found[name], (1e-3 * 0.5 ** (3 - layer), 0.05), name)

    def test_layer_decay_optimizer_params(self):
        model = _TinyViT()
        params = layer_decay_optimizer_params(
            model,
            base_lr=1e-3,
            weight_decay=0.05,
            lr_factor_func=functools.partial(
                lr_factor, backbone_multiplier=1.0, layer_decay=0.5, num_layers=2
            ),
        )
        found = self._lr_and_weight_decay(model, params)
        self.assertEqual(set(found), set(_TINY_VIT_LAYERS))  # frozen parameters left out
        decayed = {
            "backbone.net.pos_embed",  # the authors' exemption compares short names: decayed
            "backbone.net.patch_embed.weight",
            "backbone.net.blocks.0.1.weight",
            "backbone.net.blocks.1.1.weight",
            "backbone.simfp.weight",
            "neck.weight",
            "head.weight",
        }
        for name, layer in _TINY_VIT_LAYERS.items():
            expected = (1e-3 * 0.5 ** (3 - layer), 0.05 if name in decayed else 0.0)
            self.assertEqual(found[name], expected, name)

    def test_vit_recipe_from_the_common_config(self):
        # the ViT recipe of the configs/common/optimizer.py docstring
        cfg = LazyConfig.load(os.path.join(_CONFIGS, "optimizer.py"))
        cfg.optimizer.params = L(layer_decay_optimizer_params)(
            base_lr="${..lr}",
            weight_decay="${..weight_decay}",
            lr_factor_func=functools.partial(
                lr_factor, backbone_multiplier=1.0, layer_decay=0.8, num_layers=2
            ),
        )
        cfg.optimizer.lr = 5e-5
        cfg.optimizer.weight_decay = 0.01
        model = _TinyViT()
        cfg.optimizer.params.model = model
        optimizer = instantiate(cfg.optimizer)
        found = self._lr_and_weight_decay(model, optimizer.param_groups)
        self.assertEqual(found["backbone.net.patch_embed.weight"], (5e-5 * 0.8**3, 0.01))
        self.assertEqual(found["backbone.net.blocks.1.0.bias"], (5e-5 * 0.8, 0.0))
        self.assertEqual(found["head.weight"], (5e-5, 0.01))


class TestGradientClipping(unittest.TestCase):
    def _sgd_with_big_grad(self):
        params = [nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(4))]
        params[0].grad = torch.tensor([3.0, 0.0, 0.0])
        params[1].grad = torch.tensor([0.0, 4.0, 0.0, 0.0])  # global norm 5
        optimizer = add_gradient_clipping(torch.optim.SGD(params, lr=1.0), max_norm=0.1)
        return params, optimizer

    def test_step_clips_global_norm(self):
        params, optimizer = self._sgd_with_big_grad()
        optimizer.step()
        # The update -lr * grad is the global gradient scaled to norm 0.1.
        torch.testing.assert_close(params[0].data, torch.tensor([-0.06, 0.0, 0.0]))
        torch.testing.assert_close(params[1].data, torch.tensor([0.0, -0.08, 0.0, 0.0]))

    def test_small_gradient_unchanged(self):
        param = nn.Parameter(torch.zeros(2))
        param.grad = torch.tensor([0.03, 0.04])
        optimizer = add_gradient_clipping(torch.optim.SGD([param], lr=1.0), max_norm=0.1)
        optimizer.step()
        torch.testing.assert_close(param.data, torch.tensor([-0.03, -0.04]))

    def test_clipping_sees_unscaled_gradients_under_amp(self):
        param = nn.Parameter(torch.zeros(2))
        optimizer = add_gradient_clipping(torch.optim.SGD([param], lr=1.0), max_norm=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        loss = (param * torch.tensor([3.0, 4.0])).sum()  # gradient (3, 4), norm 5
        scaler.scale(loss).backward()
        torch.testing.assert_close(param.grad, torch.tensor([3072.0, 4096.0]))
        scaler.step(optimizer)
        # Clipped after unscaling: norm 0.1, not 0.1 / 1024.
        torch.testing.assert_close(param.data, torch.tensor([-0.06, -0.08]))

    def test_state_dict_and_scheduler(self):
        params, optimizer = self._sgd_with_big_grad()
        scheduler = LRMultiplier(
            optimizer, MultiStepParamScheduler([1.0, 0.5], milestones=[1], num_updates=2), 2
        )
        optimizer.step()  # still clips when a scheduler wraps step
        scheduler.step()
        torch.testing.assert_close(params[0].data, torch.tensor([-0.06, 0.0, 0.0]))
        self.assertEqual(optimizer.param_groups[0]["lr"], 0.5)
        torch.optim.SGD(params, lr=1.0).load_state_dict(optimizer.state_dict())

    def test_errors(self):
        param = nn.Parameter(torch.zeros(2))
        with self.assertRaisesRegex(ValueError, "max_norm"):
            add_gradient_clipping(torch.optim.SGD([param], lr=1.0), max_norm=0.0)
        optimizer = add_gradient_clipping(torch.optim.SGD([param], lr=1.0), max_norm=0.1)
        with self.assertRaisesRegex(ValueError, "already clips"):
            add_gradient_clipping(optimizer, max_norm=0.1)
        optimizer = torch.optim.SGD([param], lr=1.0)
        torch.optim.lr_scheduler.StepLR(optimizer, 1)
        with self.assertRaisesRegex(ValueError, "before creating an LR scheduler"):
            add_gradient_clipping(optimizer, max_norm=0.1)
