"""
The EMA of the weights (codetr.engine.ema): the authors' update rule, exact checkpoints, the
evaluations during training and with --eval-only, and the export of the averaged weights.
"""

import contextlib
import importlib.util
import io
import math
import os
import tempfile
import unittest
from typing import Dict, List

import torch
from detectron2.config import LazyCall as L
from detectron2.engine.train_loop import HookBase
from detectron2.evaluation import DatasetEvaluator
from torch import Tensor, nn

import train_net
from codetr.engine import EMA_WEIGHTS_KEY, LazyConfigTrainer, ModelEMA

from .test_trainer import TinyDetector, _CrashAt, tiny_config, write_config_file

_REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
_DECAY, _WARMUP_ITERS = 0.6, 2


def _fingerprint(tensor: Tensor) -> float:
    """A number that tells apart the weight tensors of the tests (a position-weighted sum)."""
    weights = torch.arange(1, tensor.numel() + 1, dtype=torch.float64).view_as(tensor)
    return float((tensor.double() * weights).sum())


class WeightEchoDetector(TinyDetector):
    """A :class:`TinyDetector` whose predictions carry the classifier weights they came from."""

    def forward(self, batched_inputs):
        outputs = super().forward(batched_inputs)
        if not self.training:
            for output in outputs:
                output["head_weight"] = self.head.weight.detach().clone()
        return outputs


class WeightEchoEvaluator(DatasetEvaluator):
    """Reports the fingerprint of the classifier weights that made the predictions."""

    def reset(self):
        self.seen = set()

    def process(self, inputs, outputs):
        self.seen.update(_fingerprint(output["head_weight"]) for output in outputs)

    def evaluate(self):
        (seen,) = self.seen  # the same weights for every image
        return {"seen": {"head_weight": seen}}


def ema_config(output_dir: str, **train_overrides):
    """The tiny config with an EMA of the weights, a model and an evaluator that report the
    weights evaluated."""
    model_ema = dict(enabled=True, decay=_DECAY, warmup_iters=_WARMUP_ITERS)
    cfg = tiny_config(output_dir, **{"model_ema": model_ema, **train_overrides})
    cfg.model = L(WeightEchoDetector)(num_classes=3)
    cfg.dataloader.evaluator = L(WeightEchoEvaluator)()
    return cfg


def _clone(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    return {name: value.clone() for name, value in state.items()}


class _Recorder(HookBase):
    """Records the raw and averaged weights at the start and after every iteration."""

    def __init__(self):
        self.raw: List[Dict[str, Tensor]] = []
        self.ema: List[Dict[str, Tensor]] = []

    def _record(self):
        self.raw.append(_clone(self.trainer.model.state_dict()))
        self.ema.append(_clone(self.trainer.model_ema.state_dict()))

    def before_train(self):
        self._record()

    def after_step(self):
        self._record()


def _assert_equal_states(test: unittest.TestCase, a: Dict[str, Tensor], b: Dict[str, Tensor]):
    test.assertEqual(list(a), list(b))
    for name, value in a.items():
        test.assertTrue(torch.equal(value, b[name]), name)


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))


def _hand_made_step(model: nn.Module, step: int) -> None:
    """Sets every tensor of ``model`` (parameters and buffers) to values of ``step``."""
    with torch.no_grad():
        for i, value in enumerate(model.state_dict().values()):
            if value.is_floating_point():
                ramp = torch.linspace(-1.0, 1.0, value.numel()).view_as(value)
                value.copy_(ramp * (step + 2) + 0.5 * i)
            else:
                value.fill_(10 * step)


class TestModelEMA(unittest.TestCase):
    def test_decay_is_one_minus_the_momentum_of_mmdet_exp_momentum_ema_hook(self):
        # the authors' ViT-L Co-DINO: ExpMomentumEMAHook(momentum=0.0001, total_iter=2000)
        momentum, total_iter = 0.0001, 2000
        ema = ModelEMA(nn.Linear(1, 1), decay=1 - momentum, warmup_iters=total_iter)
        for iteration in (0, 1, 100, 1999, 2000, 20000, 10**6):
            mmdet = (1 - momentum) * math.exp(-(1 + iteration) / total_iter) + momentum
            self.assertAlmostEqual(1 - ema.decay_at(iteration), mmdet, places=15)
        self.assertAlmostEqual(ema.decay_at(0), 0.9999 * (1 - math.exp(-1 / 2000)), places=15)
        constant = ModelEMA(nn.Linear(1, 1), decay=0.9, warmup_iters=0)
        self.assertEqual([constant.decay_at(i) for i in (0, 7)], [0.9, 0.9])

    def test_average_after_hand_made_steps_is_the_closed_form(self):
        model = _bn_model()
        ema = ModelEMA(model, decay=_DECAY, warmup_iters=_WARMUP_ITERS)
        ema.reset()
        states = [_clone(model.state_dict())]
        num_steps = 4
        for step in range(num_steps):
            _hand_made_step(model, step)
            ema.update(step)
            states.append(_clone(model.state_dict()))
        decays = [_DECAY * (1 - math.exp(-(t + 1) / _WARMUP_ITERS)) for t in range(num_steps)]
        # ema_k = prod_t d_t * w_init + sum_t (1 - d_t) * prod_{j > t} d_j * w_t, in float64
        weights = [math.prod(decays)] + [
            (1 - decays[t]) * math.prod(decays[t + 1 :]) for t in range(num_steps)
        ]
        self.assertAlmostEqual(sum(weights), 1.0, places=15)
        averaged = ema.state_dict()
        self.assertEqual(list(averaged), list(model.state_dict()))
        for name, value in averaged.items():
            if name.endswith("num_batches_tracked"):  # an integer buffer: the latest value
                self.assertEqual(value.dtype, torch.int64)
                self.assertEqual(value.item(), 10 * (num_steps - 1))
                continue
            expected = sum(w * state[name].double() for w, state in zip(weights, states))
            self.assertEqual(value.dtype, torch.float32)
            torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=1e-6)
            self.assertFalse(torch.allclose(value, model.state_dict()[name]), name)

    def test_applied_puts_the_raw_weights_back_exactly(self):
        model = _bn_model()
        ema = ModelEMA(model, decay=_DECAY)
        ema.reset()
        _hand_made_step(model, 0)
        ema.update(0)
        raw = _clone(model.state_dict())
        parameters = list(model.parameters())
        with ema.applied():
            _assert_equal_states(self, model.state_dict(), ema.state_dict())
        _assert_equal_states(self, model.state_dict(), raw)
        for before, after in zip(parameters, model.parameters()):
            self.assertIs(before, after)  # the optimizer's parameters

    def test_average_of_a_low_precision_model_is_float32(self):
        model = _bn_model().to(torch.bfloat16)
        ema = ModelEMA(model, decay=_DECAY)
        ema.reset()
        initial = model[0].weight.detach().float()
        _hand_made_step(model, 0)
        ema.update(0)
        averaged = ema.state_dict()["0.weight"]
        self.assertEqual(averaged.dtype, torch.float32)
        expected = _DECAY * initial + (1 - _DECAY) * model[0].weight.detach().float()
        torch.testing.assert_close(averaged, expected, rtol=1e-6, atol=1e-7)
        self.assertFalse(torch.equal(averaged, averaged.bfloat16().float()))  # not rounded
        raw = _clone(model.state_dict())
        with ema.applied():
            self.assertEqual(model[0].weight.dtype, torch.bfloat16)
            self.assertTrue(torch.equal(model[0].weight, ema.state_dict()["0.weight"].bfloat16()))
        _assert_equal_states(self, model.state_dict(), raw)

    def test_state_dict_round_trip_is_exact(self):
        model = _bn_model()
        ema = ModelEMA(model, decay=_DECAY)
        with self.assertRaisesRegex(RuntimeError, "empty"):
            ema.state_dict()
        ema.reset()
        for step in range(3):
            _hand_made_step(model, step)
            ema.update(step)
        restored = ModelEMA(_bn_model(), decay=_DECAY)
        restored.load_state_dict(ema.state_dict())
        _assert_equal_states(self, restored.state_dict(), ema.state_dict())
        self.assertIsNot(restored.state_dict()["0.weight"], ema.state_dict()["0.weight"])

    def test_load_of_another_model_average(self):
        ema = ModelEMA(_bn_model(), decay=_DECAY)
        saved = {"0.weight": torch.ones(3, 2), "0.bias": torch.ones(5), "extra": torch.ones(1)}
        with self.assertLogs("codetr.engine.ema", "WARNING") as logs:
            ema.load_state_dict(saved)
        self.assertRegex(logs.output[0], r"restarts at the model's values for 6 tensors.*0.bias")
        self.assertRegex(logs.output[1], r"1 entries that the model lacks, dropped: extra")
        self.assertTrue(torch.equal(ema.state_dict()["0.weight"], torch.ones(3, 2)))
        self.assertTrue(torch.equal(ema.state_dict()["0.bias"], _bn_model()[0].bias))

    def test_wrapped_model_and_bad_arguments(self):
        model = _bn_model()
        ema = ModelEMA(nn.DataParallel(model), decay=_DECAY)
        ema.reset()
        self.assertEqual(list(ema.state_dict()), list(model.state_dict()))
        with self.assertRaisesRegex(ValueError, r"decay=\) must be in \[0, 1\), got 1.0"):
            ModelEMA(model, decay=1.0)
        with self.assertRaisesRegex(ValueError, "warmup_iters=\\) must be >= 0, got -1"):
            ModelEMA(model, decay=0.5, warmup_iters=-1)
        model.extra = nn.Linear(1, 1)
        with self.assertRaisesRegex(RuntimeError, "no longer has the names of the average"):
            ema.update(0)


def _load(path: str):
    return torch.load(path, map_location="cpu", weights_only=True)


def _load_export_tool():
    path = os.path.join(_REPO, "tools", "export_inference_checkpoint.py")
    spec = importlib.util.spec_from_file_location("export_inference_checkpoint", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class TestTrainingWithEMA(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls._tmp = tempfile.TemporaryDirectory()
        cls.output_dir = os.path.join(cls._tmp.name, "ema")
        cls.trainer = LazyConfigTrainer(ema_config(cls.output_dir))
        cls.recorder = _Recorder()
        cls.trainer.register_hooks([cls.recorder])
        cls.results = cls.trainer.train()
        cls.final = os.path.join(cls.output_dir, "model_final.pth")

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()

    def setUp(self):
        self.tmp = tempfile.mkdtemp(dir=self._tmp.name)

    def test_hooks(self):
        names = [type(h).__name__ for h in self.trainer._hooks]
        self.assertEqual(
            names[:4], ["IterationTimer", "LRScheduler", "ModelEMAHook", "PeriodicCheckpointer"]
        )
        self.assertIsNone(LazyConfigTrainer(tiny_config(self.tmp)).model_ema)

    def test_average_follows_the_raw_weights_after_every_step(self):
        raw, ema = self.recorder.raw, self.recorder.ema
        _assert_equal_states(self, ema[0], raw[0])  # starts at the weights
        expected = _clone(raw[0])
        for iteration in range(4):
            decay = _DECAY * (1 - math.exp(-(iteration + 1) / _WARMUP_ITERS))
            for name, value in expected.items():
                value.mul_(decay).add_(raw[iteration + 1][name], alpha=1 - decay)
            _assert_equal_states(self, ema[iteration + 1], expected)
        self.assertNotEqual(
            _fingerprint(ema[4]["head.weight"]), _fingerprint(raw[4]["head.weight"])
        )

    def test_raw_weights_are_those_of_a_run_without_ema(self):
        cfg = ema_config(self.tmp, model_ema=dict(enabled=False))
        plain = LazyConfigTrainer(cfg)
        plain.train()
        _assert_equal_states(self, plain.model.state_dict(), self.trainer.model.state_dict())
        self.assertNotIn(EMA_WEIGHTS_KEY, _load(os.path.join(self.tmp, "model_final.pth")))

    def test_evaluations_use_the_average(self):
        ema = self.recorder.ema
        self.assertEqual(
            self.results, {"seen": {"head_weight": _fingerprint(ema[4]["head.weight"])}}
        )
        # after iteration 1, and after the last one (logged at max_iter by EvalHook.after_train)
        evaluated = self.trainer.storage.history("seen/head_weight").values()
        expected = [
            (_fingerprint(ema[2]["head.weight"]), 1),
            (_fingerprint(ema[4]["head.weight"]), 4),
        ]
        self.assertEqual(evaluated, expected)

    def test_checkpoints_hold_raw_and_averaged_weights(self):
        for name, iteration in [("model_0000001.pth", 1), ("model_final.pth", 3)]:
            checkpoint = _load(os.path.join(self.output_dir, name))
            _assert_equal_states(self, checkpoint["model"], self.recorder.raw[iteration + 1])
            _assert_equal_states(
                self, checkpoint[EMA_WEIGHTS_KEY], self.recorder.ema[iteration + 1]
            )

    def _eval_only(self, *argv: str):
        config = write_config_file(
            os.path.join(self.tmp, "ema.py"), "tests.engine.test_ema.ema_config", self.output_dir
        )
        args = train_net.build_argument_parser().parse_args(
            ["--config-file", config, "--eval-only", *argv]
        )
        return train_net.main(args)["seen"]["head_weight"]

    def test_eval_only(self):
        raw, ema = (
            _fingerprint(states[4]["head.weight"])
            for states in (self.recorder.raw, self.recorder.ema)
        )
        self.assertEqual(self._eval_only("--resume"), ema)
        self.assertEqual(self._eval_only("--resume", "train.model_ema.enabled=False"), raw)
        elsewhere = f"train.output_dir={self.tmp}"
        self.assertEqual(self._eval_only(elsewhere, f"train.init_checkpoint={self.final}"), ema)

        without_ema = os.path.join(self.tmp, "raw.pth")
        torch.save({"model": _load(self.final)["model"]}, without_ema)
        with self.assertLogs("fvcore.common.checkpoint", "WARNING") as logs:
            evaluated = self._eval_only(elsewhere, f"train.init_checkpoint={without_ema}")
        self.assertEqual(evaluated, raw)
        self.assertIn("raw.pth holds no EMA weights ('model_ema'): loading its raw", logs.output[0])

    def test_export_of_the_averaged_weights(self):
        tool = _load_export_tool()
        final = _load(self.final)
        for flags, key in [(["--ema"], EMA_WEIGHTS_KEY), ([], "model")]:
            exported = os.path.join(self.tmp, f"{key}.pth")
            with contextlib.redirect_stdout(io.StringIO()) as stdout:
                self.assertEqual(tool.main([self.final, exported, *flags]), 0)
            self.assertEqual(_load(exported).keys(), {"model"})
            _assert_equal_states(self, _load(exported)["model"], final[key])
        self.assertIn("also holds an EMA of the weights; --ema exports it", stdout.getvalue())

        raw_only = os.path.join(self.tmp, "raw_only.pth")
        torch.save({"model": final["model"]}, raw_only)
        exported = os.path.join(self.tmp, "never.pth")
        with contextlib.redirect_stderr(io.StringIO()) as stderr:
            self.assertEqual(tool.main([raw_only, exported, "--ema"]), 1)
        self.assertIn("holds no EMA of the weights ('model_ema')", stderr.getvalue())
        self.assertFalse(os.path.exists(exported))


class TestResumeWithEMA(unittest.TestCase):
    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory()
        self.tmp = self._tmp.name

    def tearDown(self):
        self._tmp.cleanup()

    def _crash_then_resume(self, *, before: bool, after: bool):
        """A run with EMA ``before`` that crashes at iteration 2, resumed with EMA ``after``."""
        model_ema = dict(decay=_DECAY, warmup_iters=_WARMUP_ITERS)
        crashed = LazyConfigTrainer(
            ema_config(self.tmp, model_ema=dict(enabled=before, **model_ema))
        )
        crashed.register_hooks([_CrashAt(2)])
        with self.assertRaisesRegex(RuntimeError, "simulated crash"):
            crashed.train()
        return LazyConfigTrainer(ema_config(self.tmp, model_ema=dict(enabled=after, **model_ema)))

    def test_ema_enabled_on_resume_starts_at_the_resumed_weights(self):
        resumed = self._crash_then_resume(before=False, after=True)
        recorder = _Recorder()
        resumed.register_hooks([recorder])
        resumed.resume_or_load(resume=True)
        with self.assertLogs("codetr.engine.ema", "WARNING") as logs:
            resumed.train()
        self.assertIn("starts at iteration 2, from the resumed weights", logs.output[0])
        _assert_equal_states(self, recorder.ema[0], recorder.raw[0])

    def test_ema_disabled_on_resume(self):
        resumed = self._crash_then_resume(before=True, after=False)
        with self.assertLogs("codetr.engine.trainer", "WARNING") as logs:
            resumed.resume_or_load(resume=True)
        self.assertRegex(logs.output[0], r"model_0000001.pth holds an EMA of the weights, which")


if __name__ == "__main__":
    unittest.main()
