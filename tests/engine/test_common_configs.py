import os
import runpy
import tempfile
import unittest

import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.solver import LRMultiplier
from torch import nn

_CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "common")


class TestSchedule(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.schedule = runpy.run_path(os.path.join(_CONFIGS, "schedule.py"))

    def _multipliers(self, lazy_scheduler, max_iter, iterations):
        """The learning-rate multiplier the trainer uses at each of ``iterations``."""
        optimizer = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=1.0)
        scheduler = LRMultiplier(optimizer, instantiate(lazy_scheduler), max_iter)
        values = {}
        for iteration in range(max(iterations) + 1):
            if iteration in iterations:
                values[iteration] = optimizer.param_groups[0]["lr"]
            scheduler.step()
        return values

    def test_iters_per_epoch(self):
        self.assertEqual(self.schedule["COCO_ITERS_PER_EPOCH"], 7393)

    def test_1x_2x_3x(self):
        for lazy, max_iter, decay in (
            (self.schedule["lr_multiplier_1x"], 12 * 7393, 11 * 7393),
            (self.schedule["lr_multiplier_2x"], 24 * 7393, 20 * 7393),
            (self.schedule["lr_multiplier_3x"], 36 * 7393, 30 * 7393),
        ):
            scheduler = instantiate(lazy)
            # Read at iteration / max_iter, as LRMultiplier does; no warmup.
            self.assertEqual(scheduler(0.0), 1.0)
            self.assertEqual(scheduler((decay - 1) / max_iter), 1.0)
            self.assertEqual(scheduler(decay / max_iter), 0.1)
            self.assertEqual(scheduler((max_iter - 1) / max_iter), 0.1)
            self.assertEqual(scheduler(1.0), 0.1)

    def test_shorter_max_iter_compresses_schedule(self):
        values = self._multipliers(self.schedule["lr_multiplier_1x"], 12, [0, 10, 11])
        self.assertEqual(values, {0: 1.0, 10: 1.0, 11: 0.1})

    def test_warmup(self):
        lazy = self.schedule["default_coco_scheduler"](
            epochs=2, decay_epochs=1, warmup_iters=5, iters_per_epoch=10
        )
        values = self._multipliers(lazy, 20, [0, 5, 9, 10])
        self.assertAlmostEqual(values[0], 0.001)
        self.assertEqual(values[5], 1.0)
        self.assertEqual(values[9], 1.0)
        self.assertAlmostEqual(values[10], 0.1)

    def test_bad_decay_epochs(self):
        with self.assertRaisesRegex(ValueError, "decay_epochs"):
            self.schedule["default_coco_scheduler"](epochs=12, decay_epochs=12)


class TestTrainAndOptimizerConfigs(unittest.TestCase):
    def test_train_defaults(self):
        train = LazyConfig.load(os.path.join(_CONFIGS, "train.py")).train
        self.assertEqual(train.max_iter, 12 * 7393)
        self.assertEqual(train.checkpointer.period, 7393)
        self.assertEqual(train.eval_period, 7393)
        self.assertEqual(
            dict(train.clip_grad), {"enabled": True, "max_norm": 0.1, "norm_type": 2.0}
        )
        self.assertFalse(train.amp.enabled)
        self.assertEqual(instantiate(train.device), "cpu")  # the tests run without a GPU

    def test_save_round_trip(self):
        with tempfile.TemporaryDirectory() as tmp:
            for name in ("train.py", "optimizer.py", "schedule.py"):
                cfg = LazyConfig.load(os.path.join(_CONFIGS, name))
                path = os.path.join(tmp, name.replace(".py", ".yaml"))
                LazyConfig.save(cfg, path)
                self.assertFalse(os.path.exists(path + ".pkl"), name)  # saved as valid yaml
                reloaded = LazyConfig.load(path)
                self.assertEqual(set(reloaded), set(cfg), name)
            reloaded = LazyConfig.load(os.path.join(tmp, "optimizer.yaml"))
            factor = reloaded.optimizer.params.lr_factor_func
            self.assertEqual(factor("backbone.res2.conv1.weight"), 0.1)
            self.assertEqual(factor("neck.convs.0.conv.weight"), 1.0)
