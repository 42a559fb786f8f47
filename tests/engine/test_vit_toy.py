"""
A short train_net.py run of the toy ViT Co-DINO config (``configs/toy/co_dino_vit_toy.py``: a
tiny EVA-02 ViT, layer-wise lr decay, EMA of the weights): 6 iterations of batch 2, then an
evaluation on 4 validation images. Checks that the optimizer has the layer-wise learning rates,
that the checkpoint holds the EMA of the weights and that the evaluation ran with it.
"""

import os
import tempfile
import unittest
from unittest import mock

import torch

import train_net
from codetr.engine import EMA_WEIGHTS_KEY, LazyConfigTrainer

_REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
VIT_TOY_CONFIG = os.path.join(_REPO, "configs", "toy", "co_dino_vit_toy.py")

_FAST = [
    "train.max_iter=6",
    "train.eval_period=0",  # evaluate after the last iteration only
    "train.checkpointer.period=100",
    "train.log_period=1",
    "dataloader.train.total_batch_size=2",
    "+dataloader.test.sampler={_target_: detectron2.data.samplers.InferenceSampler, size: 4}",
]


class TestViTToy(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls._tmp = tempfile.TemporaryDirectory()
        cls.output_dir = cls._tmp.name
        cls.built = {}  # what build_optimizer made: the config, model, lrs by parameter name
        cls.evaluated = []  # the model's weights at each evaluation
        build_optimizer, test = LazyConfigTrainer.build_optimizer, LazyConfigTrainer.test

        def recording_build_optimizer(cfg, model):
            optimizer = build_optimizer(cfg, model)
            names = {id(value): name for name, value in model.named_parameters()}
            cls.built.update(
                cfg=cfg,
                lrs={
                    names[id(value)]: group["lr"]
                    for group in optimizer.param_groups
                    for value in group["params"]
                },
            )
            return optimizer

        def recording_test(cfg, model):
            cls.evaluated.append({k: v.clone() for k, v in model.state_dict().items()})
            return test(cfg, model)

        with mock.patch.object(
            LazyConfigTrainer, "build_optimizer", staticmethod(recording_build_optimizer)
        ), mock.patch.object(LazyConfigTrainer, "test", staticmethod(recording_test)):
            cls.results = train_net.main(
                train_net.build_argument_parser().parse_args(
                    ["--config-file", VIT_TOY_CONFIG, *_FAST, f"train.output_dir={cls.output_dir}"]
                )
            )
        cls.final = torch.load(os.path.join(cls.output_dir, "model_final.pth"), map_location="cpu")

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()

    def test_evaluated(self):
        self.assertIn("AP", self.results["bbox"])
        self.assertEqual(len(self.evaluated), 1)

    def test_ema_saved_and_evaluated(self):
        self.assertTrue(self.built["cfg"].train.model_ema.enabled)
        ema, raw = self.final[EMA_WEIGHTS_KEY], self.final["model"]
        self.assertEqual(set(ema), set(raw))
        evaluated = self.evaluated[0]
        self.assertEqual(set(evaluated), set(ema))
        for name, value in ema.items():
            self.assertTrue(torch.equal(evaluated[name], value), name)
        # the EMA is not the raw weights (decay 0.95, 6 iterations)
        self.assertFalse(torch.equal(ema["backbone.pos_embed"], raw["backbone.pos_embed"]))

    def test_layer_wise_lr(self):
        cfg, lrs = self.built["cfg"], self.built["lrs"]
        base_lr, depth = cfg.optimizer.lr, cfg.model.backbone.depth
        decay = cfg.optimizer.params.lr_factor_func.keywords["layer_decay"]
        self.assertEqual((base_lr, depth, decay), (1e-3, 4, 0.8))
        self.assertEqual(cfg.optimizer.params.lr_factor_func.keywords["num_layers"], depth)

        def expected(layer_id):
            return base_lr * decay ** (depth + 1 - layer_id)

        checked = set()
        for name, lr in lrs.items():
            if name.startswith("backbone.blocks."):
                layer_id = int(name.split(".")[2]) + 1
            elif name.startswith(("backbone.pos_embed", "backbone.patch_embed.")):
                layer_id = 0
            else:  # the ViT's output norm, the neck and the heads
                layer_id = depth + 1
            self.assertAlmostEqual(lr, expected(layer_id), delta=1e-12 * base_lr, msg=name)
            checked.add(layer_id)
        self.assertEqual(checked, set(range(depth + 2)))
        # block 2 is layer 3 of 4 + 1: two decay steps below the rest of the model
        self.assertAlmostEqual(lrs["backbone.blocks.2.attn.q_proj.weight"], 1e-3 * 0.8**2)


if __name__ == "__main__":
    unittest.main()
