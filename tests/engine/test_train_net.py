"""
End-to-end runs of train_net.py and demo.py on the toy DINO config (a few iterations of
batch 2, evaluation on 4 validation images), and a 2-process CPU (gloo) run.
"""

import os
import shutil
import tempfile
import unittest
from unittest import mock

import cv2
import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine.train_loop import HookBase

import demo
import train_net
from codetr.engine import LazyConfigTrainer

from .test_trainer import write_config_file

_REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TOY_CONFIG = os.path.join(_REPO, "configs", "toy", "dino_toy.py")

_FAST = [
    "train.max_iter=4",
    "train.eval_period=0",  # evaluate after the last iteration only
    "train.checkpointer.period=2",
    "train.log_period=1",
    "dataloader.train.total_batch_size=2",
    "+dataloader.test.sampler={_target_: detectron2.data.samplers.InferenceSampler, size: 4}",
]


class _CrashAt(HookBase):
    def __init__(self, iteration: int):
        self.iteration = iteration

    def before_step(self):
        if self.trainer.iter == self.iteration:
            raise RuntimeError("simulated crash")


def _run(*argv):
    return train_net.main(train_net.build_argument_parser().parse_args(list(argv)))


def _load(path):
    return torch.load(path, map_location="cpu")


class TestTrainNet(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls._tmp = tempfile.TemporaryDirectory()
        cls.tmp = cls._tmp.name
        cls.straight_dir = os.path.join(cls.tmp, "straight")
        cls.straight_results = _run(
            "--config-file", TOY_CONFIG, *_FAST, f"train.output_dir={cls.straight_dir}"
        )

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()

    def test_train_evaluate_checkpoint(self):
        self.assertIn("AP", self.straight_results["bbox"])
        files = set(os.listdir(self.straight_dir))
        self.assertTrue(
            {
                "config.yaml",
                "metrics.json",
                "last_checkpoint",
                "model_0000001.pth",
                "model_0000003.pth",
                "model_final.pth",
            }
            <= files,
            files,
        )
        final = _load(os.path.join(self.straight_dir, "model_final.pth"))
        self.assertEqual(final["trainer"]["iteration"], 3)
        self.assertIn("optimizer", final["trainer"]["_trainer"])
        self.assertIn("LRScheduler", final["trainer"]["hooks"])

    def test_exact_resume(self):
        output_dir = os.path.join(self.tmp, "interrupted")
        args = ["--config-file", TOY_CONFIG, *_FAST, f"train.output_dir={output_dir}"]
        build_hooks = LazyConfigTrainer.build_hooks

        def build_hooks_then_crash(trainer):
            return build_hooks(trainer) + [_CrashAt(2)]

        with mock.patch.object(LazyConfigTrainer, "build_hooks", build_hooks_then_crash):
            with self.assertRaisesRegex(RuntimeError, "simulated crash"):
                _run(*args)
        self.assertNotIn("model_final.pth", os.listdir(output_dir))

        resumed_results = _run("--resume", *args)
        np.testing.assert_equal(resumed_results, self.straight_results)
        straight = _load(os.path.join(self.straight_dir, "model_final.pth"))
        resumed = _load(os.path.join(output_dir, "model_final.pth"))
        self.assertEqual(set(straight["model"]), set(resumed["model"]))
        for name, value in straight["model"].items():
            self.assertTrue(torch.equal(value, resumed["model"][name]), name)
        for key in ("iteration", "hooks"):
            self.assertEqual(straight["trainer"][key], resumed["trainer"][key])
        optimizer, resumed_optimizer = (
            s["trainer"]["_trainer"]["optimizer"] for s in (straight, resumed)
        )
        self.assertEqual(optimizer["param_groups"], resumed_optimizer["param_groups"])
        for index, state in optimizer["state"].items():
            for key, value in state.items():
                self.assertTrue(torch.equal(value, resumed_optimizer["state"][index][key]))

    def test_eval_only(self):
        results = _run(
            "--config-file",
            TOY_CONFIG,
            "--eval-only",
            "--resume",
            *_FAST,
            f"train.output_dir={self.straight_dir}",
        )
        np.testing.assert_equal(results, self.straight_results)

    def test_demo(self):
        input_dir = os.path.join(self.tmp, "demo_in")
        output_dir = os.path.join(self.tmp, "demo_out")
        os.makedirs(input_dir)
        shapes = {}
        for record in DatasetCatalog.get("codetr_toy_val")[:2]:
            shutil.copy(record["file_name"], input_dir)
            shapes[os.path.basename(record["file_name"])] = (record["height"], record["width"], 3)
        weights = os.path.join(self.straight_dir, "model_final.pth")
        demo.main(
            [
                "--config-file",
                TOY_CONFIG,
                "--input",
                input_dir,
                "--output",
                output_dir,
                "--confidence-threshold",
                "0.0",
                f"train.init_checkpoint={weights}",
            ]
        )
        self.assertEqual(sorted(os.listdir(output_dir)), sorted(shapes))
        for name, shape in shapes.items():
            self.assertEqual(cv2.imread(os.path.join(output_dir, name)).shape, shape)

    def test_wrong_test_dataset_fails_before_training(self):
        output_dir = os.path.join(self.tmp, "wrong_test_set")
        with self.assertRaisesRegex(KeyError, "'no_such_val'.*--register-coco"):
            _run(
                "--config-file",
                TOY_CONFIG,
                *_FAST,
                f"train.output_dir={output_dir}",
                "dataloader.test.dataset.names=no_such_val",
            )
        self.assertFalse([f for f in os.listdir(output_dir) if f.endswith(".pth")])

    def test_own_dataset_with_the_toy_config(self):
        # README's recipe, without overriding the evaluator's dataset: it follows the test set
        val = MetadataCatalog.get("codetr_toy_val")
        output_dir = os.path.join(self.tmp, "own_dataset")
        self.addCleanup(DatasetCatalog.remove, "own_toy_val")
        self.addCleanup(MetadataCatalog.remove, "own_toy_val")
        results = _run(
            "--config-file",
            TOY_CONFIG,
            "--register-coco",
            "own_toy_val",
            val.json_file,
            val.image_root,
            *_FAST,
            f"train.output_dir={output_dir}",
            "dataloader.train.dataset.names=own_toy_val",
            "dataloader.test.dataset.names=own_toy_val",
        )
        self.assertIn("AP", results["bbox"])

    def test_bad_command_lines(self):
        with self.assertRaisesRegex(FileNotFoundError, "no_such_config.py"):
            train_net.invoke_main(["--config-file", "no_such_config.py"])
        with self.assertRaisesRegex(ValueError, "cfg.lr_multiplier .* train.max_iter=1: Total"):
            _run("--config-file", TOY_CONFIG, "train.max_iter=1", f"train.output_dir={self.tmp}")
        with self.assertRaisesRegex(KeyError, "train.max_iterations"):
            train_net.invoke_main(["--config-file", TOY_CONFIG, "train.max_iterations=3"])
        with self.assertRaisesRegex(ValueError, "train.init_checkpoint=PATH"):
            demo.main(["--config-file", TOY_CONFIG, "--input", self.tmp, "--output", self.tmp])
        # a model that trains on masks, data without: stopped before any worker starts
        co_dino_toy = os.path.join(os.path.dirname(TOY_CONFIG), "co_dino_toy.py")
        with mock.patch.object(train_net, "launch") as launch:
            with self.assertRaisesRegex(
                ValueError,
                r"model.aux_heads.0.mask_on train\(s\) on instance masks.*"
                r"dataloader.train.mapper.use_instance_mask=True",
            ):
                train_net.invoke_main(
                    ["--config-file", co_dino_toy, "model.aux_heads.0.mask_on=True"]
                )
            launch.assert_not_called()
            # evaluation needs no training masks; with them, training starts
            train_net.invoke_main(
                ["--config-file", co_dino_toy, "--eval-only", "model.aux_heads.0.mask_on=True"]
            )
            train_net.invoke_main(
                [
                    "--config-file",
                    co_dino_toy,
                    "model.aux_heads.0.mask_on=True",
                    "dataloader.train.mapper.use_instance_mask=True",
                ]
            )
            self.assertEqual(launch.call_count, 2)


class TestMultiProcessCPU(unittest.TestCase):
    def test_two_gloo_processes(self):
        with tempfile.TemporaryDirectory() as tmp:
            config = write_config_file(
                os.path.join(tmp, "tiny.py"), "tests.engine.test_trainer.tiny_config", tmp
            )
            train_net.invoke_main(
                [
                    "--config-file",
                    config,
                    "--num-gpus",
                    "2",
                    "--dist-url",
                    "auto",
                    "dataloader.train.total_batch_size=2",
                ]
            )
            with open(os.path.join(tmp, "log.txt")) as f:
                self.assertIn("World size: 2", f.read())
            final = _load(os.path.join(tmp, "model_final.pth"))
            self.assertEqual(final["trainer"]["iteration"], 3)
