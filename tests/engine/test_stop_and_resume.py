"""
Stopping a run without losing its work, and resuming it with exact logs: signals, a finished
run, metrics.json after a crash, the limit on unreadable training images.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import unittest

import torch
from detectron2.config import LazyCall as L
from detectron2.engine.train_loop import HookBase

from codetr.engine import LazyConfigTrainer, drop_metrics_from

from .test_trainer import NoisyMapper, _CrashAt, tiny_config

_TIMINGS = {"time", "data_time", "rank_data_time", "eta_seconds"}


class _SignalAt(HookBase):
    """Sends ``signum`` to this process during the step of ``iteration``."""

    def __init__(self, iteration: int, signum: int):
        self.iteration, self.signum = iteration, signum

    def before_step(self):
        if self.trainer.iter == self.iteration:
            os.kill(os.getpid(), self.signum)


class UnreadableMapper(NoisyMapper):
    """Skips (returns None for) the records of ``bad_ids``, counting them as a mapper does."""

    def __init__(self, *, bad_ids):
        self.bad_ids = set(bad_ids)
        self.skipped_images = 0

    def __call__(self, record):
        if record["image_id"] in self.bad_ids:
            self.skipped_images += 1
            return None
        return super().__call__(record)


def _metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.json")) as f:
        rows = [json.loads(line) for line in f]
    return [{k: v for k, v in row.items() if k not in _TIMINGS} for row in rows]


def _checkpoints(output_dir):
    return sorted(f for f in os.listdir(output_dir) if f.endswith(".pth"))


class TestStopAndResume(unittest.TestCase):
    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory()
        self.tmp = self._tmp.name

    def tearDown(self):
        self._tmp.cleanup()

    def _trainer(self, output_dir, *extra_hooks, resume=False, **train_overrides):
        trainer = LazyConfigTrainer(tiny_config(output_dir, **train_overrides))
        trainer.register_hooks(list(extra_hooks))
        trainer.resume_or_load(resume=resume)
        return trainer

    def _straight(self, **train_overrides):
        output_dir = os.path.join(self.tmp, "straight")
        trainer = self._trainer(output_dir, **train_overrides)
        trainer.train()
        return trainer, output_dir

    def _check_signal(self, signum, **train_overrides):
        straight, _ = self._straight(**train_overrides)
        output_dir = os.path.join(self.tmp, "signalled")
        trainer = self._trainer(output_dir, _SignalAt(2, signum), **train_overrides)
        with self.assertRaises(SystemExit) as stop:
            trainer.train()
        self.assertEqual(stop.exception.code, 128 + signum)
        self.assertEqual(trainer.iter, 2)  # the iteration in progress was finished
        # the periodic checkpoint of iteration 1 and the one written on the signal
        self.assertEqual(_checkpoints(output_dir), ["model_0000001.pth", "model_0000002.pth"])
        # the handlers are back: this signal would kill a process again
        self.assertIs(signal.getsignal(signum), self._previous[signum])

        resumed = self._trainer(output_dir, resume=True, **train_overrides)
        self.assertEqual(resumed.start_iter, 3)
        resumed.train()
        for name, value in straight.model.state_dict().items():
            self.assertTrue(torch.equal(value, resumed.model.state_dict()[name]), name)
        return straight, resumed

    def setUpSignals(self):
        self._previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def test_sigint_saves_the_iteration_and_resumes_exactly(self):
        self.setUpSignals()
        self._check_signal(signal.SIGINT)

    def test_sigterm_saves_the_iteration_and_resumes_exactly(self):
        self.setUpSignals()
        self._check_signal(signal.SIGTERM)

    def test_sigterm_with_model_ema_resumes_the_average_exactly(self):
        self.setUpSignals()
        model_ema = dict(enabled=True, decay=0.6, warmup_iters=2)
        straight, resumed = self._check_signal(signal.SIGTERM, model_ema=model_ema)
        saved = torch.load(
            os.path.join(self.tmp, "signalled", "model_0000002.pth"), weights_only=True
        )
        self.assertIn("model_ema", saved)  # the checkpoint written on the signal
        averaged = straight.model_ema.state_dict()
        self.assertEqual(list(averaged), list(resumed.model_ema.state_dict()))
        for name, value in averaged.items():
            self.assertTrue(torch.equal(value, resumed.model_ema.state_dict()[name]), name)
            self.assertFalse(torch.equal(value, straight.model.state_dict()[name]), name)

    def test_stale_temporary_files_are_removed_at_start(self):
        finished = subprocess.run(
            [sys.executable, "-c", "import os; print(os.getpid())"],
            capture_output=True,
            text=True,
            check=True,
        )
        dead_pid = int(finished.stdout)
        stale = os.path.join(self.tmp, f".model_0000001.pth.{dead_pid}.tmp")
        live = os.path.join(self.tmp, f".model_0000001.pth.{os.getpid()}.tmp")
        for path in (stale, live):
            open(path, "wb").close()
        LazyConfigTrainer(tiny_config(self.tmp))
        self.assertFalse(os.path.exists(stale))
        self.assertTrue(os.path.exists(live))

    def test_resume_of_a_finished_run(self):
        _, output_dir = self._straight()
        with self.assertRaisesRegex(
            RuntimeError, r"is finished .*model_final.pth.*iteration 3 and train.max_iter=4"
        ):
            self._trainer(output_dir, resume=True)
        cfg = tiny_config(output_dir)
        cfg.train.max_iter = 6
        longer = LazyConfigTrainer(cfg)
        longer.resume_or_load(resume=True)
        longer.train()
        self.assertEqual((longer.start_iter, longer.iter), (4, 6))

    def test_metrics_hold_each_iteration_once_after_a_resume(self):
        _, straight_dir = self._straight()
        output_dir = os.path.join(self.tmp, "crashed")
        with self.assertRaisesRegex(RuntimeError, "simulated crash"):
            self._trainer(output_dir, _CrashAt(3)).train()
        # the last checkpoint is iteration 1; rows up to iteration 3 were written
        self.assertEqual([row["iteration"] for row in _metrics(output_dir)], [0, 1, 2, 3])
        self._trainer(output_dir, resume=True).train()
        # same rows, same (smoothed) values: the resumed run continued the loss window
        self.assertEqual(_metrics(output_dir), _metrics(straight_dir))

    def test_drop_metrics_from(self):
        path = os.path.join(self.tmp, "metrics.json")
        rows = [{"iteration": i, "loss": float(i)} for i in (0, 1, 2, 3)]
        with open(path, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
            f.write('{"iteration": 4, "lo')  # cut short by a kill
        with open(path, "a") as writer:  # a writer that holds the file open keeps appending
            drop_metrics_from(path, 2)
            writer.write(json.dumps({"iteration": 2, "loss": 9.0}) + "\n")
        with open(path) as f:
            self.assertEqual(
                [json.loads(line) for line in f], rows[:2] + [{"iteration": 2, "loss": 9.0}]
            )

    def _unreadable(self, output_dir, bad_ids):
        cfg = tiny_config(output_dir, max_skipped_image_fraction=0.1)
        cfg.dataloader.train.mapper = L(UnreadableMapper)(bad_ids=bad_ids)
        return LazyConfigTrainer(cfg)

    def test_unreadable_images_are_counted(self):
        # 11 training images: one unreadable is under 10% of an epoch
        output_dir = os.path.join(self.tmp, "tolerant")
        trainer = self._unreadable(output_dir, bad_ids=[4])
        trainer.train()
        self.assertEqual(trainer.iter, 4)
        self.assertGreaterEqual(trainer.train_mapper.skipped_images, 1)
        logged = [row["data/skipped_images"] for row in _metrics(output_dir) if "data/" in str(row)]
        self.assertEqual(logged[-1], trainer.train_mapper.skipped_images)

    def test_too_many_unreadable_images_stop_with_a_checkpoint(self):
        output_dir = os.path.join(self.tmp, "strict")
        trainer = self._unreadable(output_dir, bad_ids=range(6))
        with self.assertLogs("codetr.engine.hooks", "WARNING") as logs:
            with self.assertRaises(SystemExit) as stop:
                trainer.train()
        self.assertEqual(stop.exception.code, 1)
        self.assertRegex(
            logs.output[-1],
            rf"Training stopped after iteration {trainer.iter}: [2-6] of the 11 images of this "
            r"epoch could not be read, more than train.max_skipped_image_fraction=0.1 ",
        )
        self.assertIn(f"model_{trainer.iter:07d}.pth", _checkpoints(output_dir))


if __name__ == "__main__":
    unittest.main()
