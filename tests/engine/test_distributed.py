"""
Training in several CPU processes (gloo): the processes train one model together, and with
the same global batches they train what one process trains.

With N processes each process draws its own share of every global batch (detectron2's
TrainingSampler: process r takes the samples r, r + N, ...) and its own random numbers
(dropout, augmentation: the trainer seeds them with (seed, rank, iteration)). So 1 and N
processes give close, not equal, losses in general. Here the data order is made identical
(no shuffling, no aspect-ratio grouping, images fixed by their id) and the model draws no
random numbers: then the losses and weights of 1 and 2 processes agree to float rounding
(the gradients are averaged in another order).
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import unittest

import numpy as np
import torch
from detectron2.config import LazyCall as L
from detectron2.data import build_detection_train_loader
from detectron2.data.samplers import TrainingSampler
from detectron2.engine import launch
from detectron2.utils import comm

from codetr.engine import LazyConfigTrainer

from .test_trainer import TinyDetector, _records, tiny_config, write_config_file

_REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
_NUM_RECORDS = 16
_GLOBAL_BATCH = 4


class FixedMapper:
    """An image that depends only on the record's id: the same on every process."""

    def __call__(self, record):
        rng = np.random.default_rng(record["image_id"])
        image = rng.integers(0, 256, (3, record["height"], record["width"]), dtype=np.uint8)
        return {**record, "image": torch.as_tensor(image)}


def same_batches_config(output_dir: str):
    """The tiny trainer config with a fixed data order and a model without dropout."""
    cfg = tiny_config(output_dir)
    cfg.model = L(TinyDetector)(num_classes=3, dropout=0.0)
    cfg.dataloader.train = L(build_detection_train_loader)(
        dataset=[{**r, "height": 8, "width": 8} for r in _records(_NUM_RECORDS)],
        mapper=L(FixedMapper)(),
        sampler=L(TrainingSampler)(size=_NUM_RECORDS, shuffle=False),
        total_batch_size=_GLOBAL_BATCH,
        aspect_ratio_grouping=False,
    )
    cfg.train.update(eval_period=0, max_iter=3)
    del cfg.dataloader.evaluator
    return cfg


def _train_and_save_weights(output_dir: str) -> None:
    """Trains ``same_batches_config``; every process saves its weights as rank{r}.pth."""
    trainer = LazyConfigTrainer(same_batches_config(output_dir))
    trainer.train()
    model = trainer.model.module if comm.get_world_size() > 1 else trainer.model
    torch.save(model.state_dict(), os.path.join(output_dir, f"rank{comm.get_rank()}.pth"))


def _losses(output_dir: str):
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line)["total_loss"] for line in f]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TestDistributedCPU(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls._tmp = tempfile.TemporaryDirectory()
        cls.single = os.path.join(cls._tmp.name, "single")
        cls.initial = LazyConfigTrainer(same_batches_config(cls.single)).model.state_dict()
        _train_and_save_weights(cls.single)

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()

    def _weights(self, output_dir, rank=0):
        return torch.load(os.path.join(output_dir, f"rank{rank}.pth"), weights_only=True)

    def test_two_processes_train_what_one_process_trains(self):
        output_dir = os.path.join(self._tmp.name, "two")
        launch(_train_and_save_weights, 2, dist_url="auto", args=(output_dir,))
        rank0, rank1 = self._weights(output_dir, 0), self._weights(output_dir, 1)
        single = self._weights(self.single)
        for name, value in single.items():
            # gradients all-reduced: the processes hold the same weights
            self.assertTrue(torch.equal(rank0[name], rank1[name]), name)
            torch.testing.assert_close(rank0[name], value, rtol=1e-5, atol=1e-7, msg=name)
            self.assertFalse(torch.equal(value, self.initial[name]), name)
        np.testing.assert_allclose(_losses(output_dir), _losses(self.single), rtol=1e-5)
        self.assertEqual(len(_losses(output_dir)), 3)

    def test_two_machines_of_one_process(self):
        output_dir = os.path.join(self._tmp.name, "machines")
        os.makedirs(output_dir)
        config = write_config_file(
            os.path.join(output_dir, "config.py"),
            "tests.engine.test_distributed.same_batches_config",
            output_dir,
        )
        url = f"tcp://127.0.0.1:{_free_port()}"
        machines = [
            subprocess.Popen(
                [sys.executable, "train_net.py", "--config-file", config, "--num-machines", "2"]
                + ["--machine-rank", str(rank), "--dist-url", url],
                cwd=_REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for rank in (0, 1)
        ]
        for machine in machines:
            output, _ = machine.communicate(timeout=300)
            self.assertEqual(machine.returncode, 0, output[-3000:])
        with open(os.path.join(output_dir, "log.txt")) as f:
            self.assertIn("World size: 2", f.read())
        final = torch.load(os.path.join(output_dir, "model_final.pth"), weights_only=True)
        single = self._weights(self.single)
        for name, value in single.items():
            torch.testing.assert_close(final["model"][name], value, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(_losses(output_dir), _losses(self.single), rtol=1e-5)
