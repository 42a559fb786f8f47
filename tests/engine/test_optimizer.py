import os
import unittest

import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.solver import LRMultiplier
from fvcore.common.param_scheduler import MultiStepParamScheduler
from torch import nn

from codetr.engine import add_gradient_clipping, lr_factor

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
                **factor
            ),
            0.2,
        )
        # no layer of ours is the authors' one-stage "reference_points": not a key
        self.assertEqual(lr_factor("query_head.reference_points.weight", **factor), 1.0)
        self.assertEqual(
            lr_factor(
                "query_head.transformer.decoder.layers.3.attentions.1" ".attention_weights.weight",
                **factor
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
