"""
A short train_net.py run of the toy Co-DINO-Inst config (``configs/toy/co_dino_inst_toy.py``:
the mask branch on the query head's boxes, trained on the toy shapes' polygon masks): 2
iterations of batch 2, an evaluation on 4 validation images as bbox and segm, then demo.py on
two toy images with the final weights, whose Visualizer gets the detections' image masks.
"""

import json
import os
import shutil
import tempfile
import unittest
from unittest import mock

import torch
from detectron2.data import DatasetCatalog
from detectron2.utils.visualizer import Visualizer

import demo
import train_net

_REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
INST_TOY_CONFIG = os.path.join(_REPO, "configs", "toy", "co_dino_inst_toy.py")

_FAST = [
    "train.max_iter=2",
    "model.mask_branch.batch_size_per_image=32",
    "train.eval_period=0",  # evaluate after the last iteration only
    "train.checkpointer.period=100",
    "train.log_period=1",
    "dataloader.train.total_batch_size=2",
    "+dataloader.test.sampler={_target_: detectron2.data.samplers.InferenceSampler, size: 4}",
]


class TestInstToy(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls._tmp = tempfile.TemporaryDirectory()
        cls.output_dir = os.path.join(cls._tmp.name, "train")
        cls.results = train_net.main(
            train_net.build_argument_parser().parse_args(
                [
                    "--config-file",
                    INST_TOY_CONFIG,
                    *_FAST,
                    f"train.output_dir={cls.output_dir}",
                    f"dataloader.evaluator.output_dir={os.path.join(cls.output_dir, 'eval')}",
                ]
            )
        )

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()

    def test_evaluated_as_bbox_and_segm(self):
        self.assertEqual(sorted(self.results), ["bbox", "segm"])
        for task in ("bbox", "segm"):
            self.assertIn("AP", self.results[task])

    def test_demo_draws_masks(self):
        input_dir = os.path.join(self._tmp.name, "demo_in")
        os.makedirs(input_dir)
        sizes = {}
        for record in DatasetCatalog.get("codetr_toy_val")[:2]:
            shutil.copy(record["file_name"], input_dir)
            sizes[os.path.basename(record["file_name"])] = (record["height"], record["width"])
        drawn = []
        draw = Visualizer.draw_instance_predictions

        def recording_draw(visualizer, predictions):
            drawn.append(predictions)
            return draw(visualizer, predictions)

        with mock.patch.object(Visualizer, "draw_instance_predictions", recording_draw):
            demo.main(
                [
                    "--config-file",
                    INST_TOY_CONFIG,
                    "--input",
                    input_dir,
                    "--output",
                    os.path.join(self._tmp.name, "demo_out"),
                    "--confidence-threshold",
                    "0.0",
                    f"train.init_checkpoint={os.path.join(self.output_dir, 'model_final.pth')}",
                ]
            )
        self.assertEqual(len(drawn), 2)
        for instances in drawn:
            self.assertGreater(len(instances), 0)
            masks = instances.pred_masks
            self.assertEqual(masks.dtype, torch.bool)
            self.assertIn(tuple(masks.shape[1:]), sizes.values())
            self.assertEqual(len(masks), len(instances))

    def test_eval_only_gives_the_same_boxes_and_masks(self):
        """``--eval-only`` with the final weights evaluates both tasks again, on the same images
        with the same weights as the evaluation after training: the same predictions (boxes,
        scores, mask RLEs) and the same figures."""
        eval_dir = os.path.join(self._tmp.name, "eval_only")
        results = train_net.main(
            train_net.build_argument_parser().parse_args(
                [
                    "--config-file",
                    INST_TOY_CONFIG,
                    "--eval-only",
                    _FAST[-1],
                    f"train.init_checkpoint={os.path.join(self.output_dir, 'model_final.pth')}",
                    f"train.output_dir={eval_dir}",
                    f"dataloader.evaluator.output_dir={eval_dir}",
                ]
            )
        )
        self.assertEqual(sorted(results), ["bbox", "segm"])
        for task in ("bbox", "segm"):
            self.assertEqual(
                json.dumps(results[task], sort_keys=True),
                json.dumps(self.results[task], sort_keys=True),
                task,
            )
        name = "instances_predictions.pth"
        ours = torch.load(os.path.join(eval_dir, name), weights_only=False)
        after_training = torch.load(os.path.join(self.output_dir, "eval", name), weights_only=False)
        self.assertEqual(len(ours), 4)
        self.assertGreater(sum(len(p["instances"]) for p in ours), 0)
        self.assertTrue(all("segmentation" in d for p in ours for d in p["instances"]))
        self.assertEqual(ours, after_training)
