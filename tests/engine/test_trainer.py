import os
import tempfile
import unittest
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig, instantiate
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import SimpleTrainer
from detectron2.engine.train_loop import HookBase
from detectron2.evaluation import DatasetEvaluator
from detectron2.solver import get_default_optimizer_params
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from fvcore.common.param_scheduler import (
    CompositeParamScheduler,
    ConstantParamScheduler,
    MultiStepParamScheduler,
)
from omegaconf import OmegaConf
from torch import nn

from codetr.engine import (
    DeviceAMPTrainer,
    LazyConfigTrainer,
    inference_precision,
    load_lazy_config,
    lr_factor,
)

_REPO = os.path.join(os.path.dirname(__file__), "..", "..")
_TRAIN_CONFIG = os.path.join(_REPO, "configs", "common", "train.py")


class TinyDetector(nn.Module):
    """Classifies whole images; uses dropout, so its training draws random numbers."""

    def __init__(self, *, num_classes: int = 3, dropout: float = 0.5):
        super().__init__()
        self.backbone = nn.Conv2d(3, 8, 3)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(8, num_classes)

    def forward(self, batched_inputs):
        device = self.head.weight.device
        features = torch.stack(
            [
                self.backbone(x["image"].to(device).float()[None] / 255).mean(dim=(0, 2, 3))
                for x in batched_inputs
            ]
        )
        logits = self.head(self.dropout(features))
        if self.training:
            labels = torch.tensor([x["label"] for x in batched_inputs], device=device)
            return {"loss_cls": F.cross_entropy(logits, labels)}
        results = []
        for x, scores in zip(batched_inputs, logits.sigmoid()):
            instances = Instances((x["height"], x["width"]))
            instances.pred_boxes = Boxes(torch.tensor([[0.0, 0.0, x["width"], x["height"]]]))
            instances.scores, instances.pred_classes = scores.max(dim=0, keepdim=True)
            results.append({"instances": instances})
        return results


class NoisyMapper:
    """Makes a random-noise image: the data stream depends on the numpy generator."""

    def __call__(self, record):
        noise = np.random.randint(0, 256, (record["height"], record["width"], 3), np.uint8)
        return {**record, "image": torch.as_tensor(noise.transpose(2, 0, 1).copy())}


class CountingEvaluator(DatasetEvaluator):
    """Counts the images, and those whose scores came out of an autocast region (bfloat16)."""

    def reset(self):
        self.num_images = 0
        self.num_bfloat16 = 0

    def process(self, inputs, outputs):
        self.num_images += len(outputs)
        self.num_bfloat16 += sum(o["instances"].scores.dtype == torch.bfloat16 for o in outputs)

    def evaluate(self):
        return {
            "tiny": {"num_images": float(self.num_images), "num_bfloat16": float(self.num_bfloat16)}
        }


def _records(num: int):
    # Portrait and landscape images: aspect-ratio grouping keeps images across iterations.
    return [
        {"image_id": i, "height": 8 + 4 * (i % 2), "width": 12 - 4 * (i % 2), "label": i % 3}
        for i in range(num)
    ]


def tiny_config(output_dir: str, **train_overrides):
    train = LazyConfig.load(_TRAIN_CONFIG).train
    train.update(
        output_dir=output_dir,
        max_iter=4,
        eval_period=2,
        log_period=1,
        checkpointer=dict(period=2, max_to_keep=None),
        **train_overrides,
    )
    return OmegaConf.create(
        dict(
            model=L(TinyDetector)(num_classes=3),
            optimizer=L(torch.optim.AdamW)(
                params=L(get_default_optimizer_params)(
                    base_lr="${..lr}", lr_factor_func=partial(lr_factor, backbone_multiplier=0.1)
                ),
                lr=0.01,
                weight_decay=1e-4,
            ),
            # The rate drops after iteration 2: the resumed part must see it.
            lr_multiplier=L(MultiStepParamScheduler)(
                values=[1.0, 0.1], milestones=[3], num_updates=4
            ),
            dataloader=dict(
                train=L(build_detection_train_loader)(
                    dataset=_records(11), mapper=L(NoisyMapper)(), total_batch_size=3
                ),
                test=L(build_detection_test_loader)(dataset=_records(3), mapper=L(NoisyMapper)()),
                evaluator=L(CountingEvaluator)(),
            ),
            train=train,
        ),
        flags={"allow_objects": True},
    )


def write_config_file(path: str, builder: str, output_dir: str) -> str:
    """
    Writes a LazyConfig file at ``path`` whose config is ``builder(output_dir)``, ``builder``
    being "module.function" (e.g. "tests.engine.test_trainer.tiny_config"), for train_net.py.
    """
    module, _, function = builder.rpartition(".")
    with open(path, "w") as f:
        f.write(
            f"from {module} import {function}\n"
            f"_cfg = {function}({output_dir!r})\n"
            "model, optimizer, train = _cfg.model, _cfg.optimizer, _cfg.train\n"
            "lr_multiplier, dataloader = _cfg.lr_multiplier, _cfg.dataloader\n"
        )
    return path


class _CrashAt(HookBase):
    def __init__(self, iteration: int):
        self.iteration = iteration

    def before_step(self):
        if self.trainer.iter == self.iteration:
            raise RuntimeError("simulated crash")


def _training_state(trainer: LazyConfigTrainer):
    return {
        "model": trainer.model.state_dict(),
        "model_ema": None if trainer.model_ema is None else trainer.model_ema.state_dict(),
        "trainer": trainer.state_dict(),
    }


def _assert_same_state(test: unittest.TestCase, a, b, path="state"):
    if isinstance(a, torch.Tensor):
        test.assertTrue(torch.equal(a, b), path)
    elif isinstance(a, dict):
        test.assertEqual(set(a), set(b), path)
        for key in a:
            _assert_same_state(test, a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        test.assertEqual(len(a), len(b), path)
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_state(test, x, y, f"{path}[{i}]")
    else:
        test.assertEqual(a, b, path)


class TestLazyConfigTrainer(unittest.TestCase):
    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory()
        self.tmp = self._tmp.name

    def tearDown(self):
        self._tmp.cleanup()

    def _train(self, output_dir, *, crash_at=None, resume=False, **train_overrides):
        trainer = LazyConfigTrainer(tiny_config(output_dir, **train_overrides))
        if crash_at is not None:
            trainer.register_hooks([_CrashAt(crash_at)])
        trainer.resume_or_load(resume=resume)
        results = trainer.train()
        return trainer, results

    def _check_exact_resume(self, **train_overrides):
        straight, results = self._train(os.path.join(self.tmp, "straight"), **train_overrides)
        self.assertEqual(results, {"tiny": {"num_images": 3.0, "num_bfloat16": 0.0}})
        self.assertEqual(straight.iter, 4)

        output_dir = os.path.join(self.tmp, "interrupted")
        with self.assertRaisesRegex(RuntimeError, "simulated crash"):
            self._train(output_dir, crash_at=2, **train_overrides)
        self.assertEqual(
            sorted(f for f in os.listdir(output_dir) if f.endswith(".pth")), ["model_0000001.pth"]
        )
        resumed, _ = self._train(output_dir, resume=True, **train_overrides)
        self.assertEqual(resumed.start_iter, 2)

        state = _training_state(straight)
        _assert_same_state(self, state, _training_state(resumed))
        # The learning rate has dropped (backbone at x0.1).
        lrs = {round(g["lr"], 12) for g in resumed.optimizer.param_groups}
        self.assertEqual(lrs, {1e-4, 1e-3})
        self.assertEqual(state["trainer"]["iteration"], 4)
        return state

    def test_exact_resume(self):
        state = self._check_exact_resume()
        self.assertNotIn("grad_scaler", state["trainer"]["_trainer"])
        self.assertIsNone(state["model_ema"])  # train.model_ema is off by default

    def test_exact_resume_amp_float16(self):
        state = self._check_exact_resume(amp=dict(enabled=True, precision="float16"))
        self.assertGreater(state["trainer"]["_trainer"]["grad_scaler"]["scale"], 0)

    def test_exact_resume_with_model_ema(self):
        # the same EMA of the weights, and the same raw weights, as the straight run
        state = self._check_exact_resume(model_ema=dict(enabled=True, decay=0.6, warmup_iters=2))
        head = state["model"]["head.weight"]
        self.assertFalse(torch.allclose(state["model_ema"]["head.weight"], head))

    def test_resume_without_seed(self):
        with self.assertRaisesRegex(RuntimeError, "simulated crash"):
            self._train(self.tmp, crash_at=2, seed=-1)
        with self.assertLogs("codetr.engine.trainer", "WARNING") as logs:
            resumed, _ = self._train(self.tmp, resume=True, seed=-1)
        self.assertIn("set train.seed >= 0 for an exact resume", logs.output[0])
        self.assertEqual((resumed.start_iter, resumed.iter), (2, 4))

    def test_build(self):
        trainer = LazyConfigTrainer(tiny_config(self.tmp))
        self.assertIs(type(trainer._trainer), SimpleTrainer)
        self.assertEqual(type(trainer.optimizer).__name__, "AdamWWithGradientClip")
        self.assertEqual(trainer.model.head.weight.device.type, "cpu")
        hook_names = [type(h).__name__ for h in trainer._hooks]
        self.assertEqual(
            hook_names,
            [
                "IterationTimer",
                "LRScheduler",
                "PeriodicCheckpointer",
                "EvalHook",
                "MetricHistory",
                "PeriodicWriter",
                "StopWithCheckpoint",
            ],
        )
        lrs = sorted({g["lr"] for g in trainer.optimizer.param_groups})
        self.assertEqual(len(lrs), 2)
        self.assertAlmostEqual(lrs[0], 0.001, 12)  # backbone
        self.assertAlmostEqual(lrs[1], 0.01, 12)

        trainer = LazyConfigTrainer(tiny_config(self.tmp, clip_grad=dict(enabled=False)))
        self.assertIs(type(trainer.optimizer), torch.optim.AdamW)

    def test_schedule_defined_on_half_open_interval(self):
        # ConstantParamScheduler raises at where = 1, which the step after the last
        # iteration would ask for.
        cfg = tiny_config(self.tmp)
        cfg.lr_multiplier = L(CompositeParamScheduler)(
            schedulers=[L(ConstantParamScheduler)(value=1.0), L(ConstantParamScheduler)(value=0.1)],
            lengths=[0.75, 0.25],
            interval_scaling=["rescaled", "rescaled"],
        )
        trainer = LazyConfigTrainer(cfg)
        trainer.train()
        lrs = [lr for lr, _ in trainer.storage.history("lr").values()]
        self.assertEqual(lrs, [lrs[0]] * 3 + [lrs[0] * 0.1])

    def test_amp_on_cpu_uses_bfloat16_without_scaling(self):
        trainer, _ = self._train(self.tmp, amp=dict(enabled=True, precision="auto"))
        self.assertIsInstance(trainer._trainer, DeviceAMPTrainer)
        self.assertEqual(trainer._trainer.precision, torch.bfloat16)
        self.assertFalse(trainer._trainer.grad_scaler.is_enabled())
        self.assertTrue(torch.isfinite(trainer.model.head.weight).all())

        with self.assertRaisesRegex(ValueError, "cfg.train.amp.precision: .*got 'int8'"):
            LazyConfigTrainer(tiny_config(self.tmp, amp=dict(enabled=True, precision="int8")))

    def test_inference_amp_autocasts_evaluation(self):
        cfg = tiny_config(self.tmp)
        model = instantiate(cfg.model).eval()
        self.assertIsNone(inference_precision(cfg))
        self.assertEqual(
            LazyConfigTrainer.test(cfg, model), {"tiny": {"num_images": 3.0, "num_bfloat16": 0.0}}
        )
        cfg.train.inference_amp.enabled = True
        self.assertEqual(inference_precision(cfg), torch.bfloat16)
        self.assertEqual(
            LazyConfigTrainer.test(cfg, model), {"tiny": {"num_images": 3.0, "num_bfloat16": 3.0}}
        )
        cfg.train.inference_amp.precision = "int8"
        with self.assertRaisesRegex(ValueError, "cfg.train.inference_amp.precision: .*'int8'"):
            inference_precision(cfg)

    def test_load_from_init_checkpoint(self):
        first, _ = self._train(os.path.join(self.tmp, "first"))
        weights = os.path.join(self.tmp, "first", "model_final.pth")
        trainer = LazyConfigTrainer(
            tiny_config(os.path.join(self.tmp, "second"), init_checkpoint=weights)
        )
        trainer.resume_or_load(resume=True)  # no checkpoint in output_dir: loads the weights
        self.assertEqual(trainer.start_iter, 0)
        self.assertTrue(torch.equal(trainer.model.head.weight, first.model.head.weight))

    def test_test_without_evaluator(self):
        cfg = tiny_config(self.tmp)
        del cfg.dataloader.evaluator
        model = LazyConfigTrainer.build_model(cfg)
        self.assertEqual(LazyConfigTrainer.test(cfg, model), {})


class _SquaredOutput(nn.Module):
    """A model whose training output is one loss tensor: the mean squared linear output."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)

    def forward(self, batch):
        return self.linear(batch).pow(2).mean()


class TestDeviceAMPTrainer(unittest.TestCase):
    def test_amp_trainer_options(self):
        # a tensor loss, zero_grad_before_forward and log_grad_scaler, as AMPTrainer takes them
        torch.manual_seed(0)
        model = _SquaredOutput()
        expected = _SquaredOutput()
        expected.load_state_dict(model.state_dict())
        batch = torch.arange(6.0).view(2, 3) / 6
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        trainer = DeviceAMPTrainer(
            model=model,
            data_loader=[batch],
            optimizer=optimizer,
            precision=torch.bfloat16,
            zero_grad_before_forward=True,
            log_grad_scaler=True,
        )
        model.linear.weight.grad = torch.full_like(model.linear.weight, 100.0)  # cleared first
        with EventStorage(0) as storage:
            trainer.iter = 0
            trainer.run_step()
        # the same step by hand: bfloat16 autocast forward, stale gradients cleared first
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = expected(batch)
        loss.backward()
        with torch.no_grad():
            for parameter in expected.parameters():
                parameter -= 0.5 * parameter.grad
        for ours, theirs in zip(model.parameters(), expected.parameters()):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        self.assertEqual(storage.latest()["[metric]grad_scaler"][0], 1.0)  # bfloat16: unscaled
        self.assertAlmostEqual(storage.latest()["total_loss"][0], loss.item(), places=6)


class TestLoadLazyConfig(unittest.TestCase):
    def test_overrides(self):
        cfg = load_lazy_config(_TRAIN_CONFIG, ["train.max_iter=7", "+train.extra=1"])
        self.assertEqual(cfg.train.max_iter, 7)
        self.assertEqual(cfg.train.extra, 1)
        self.assertEqual(instantiate(cfg.train.device), "cpu")  # no GPU in the tests

    def test_bad_key(self):
        with self.assertRaisesRegex(KeyError, "train.max_iters.*Did you mean 'train.max_iter'"):
            load_lazy_config(_TRAIN_CONFIG, ["train.max_iters=7"])
        with self.assertRaisesRegex(KeyError, "no key 'trian.max_iter'"):
            load_lazy_config(_TRAIN_CONFIG, ["trian.max_iter=7"])
        with self.assertRaisesRegex(ValueError, "key=value"):
            load_lazy_config(_TRAIN_CONFIG, ["train.max_iter"])

    def test_value_of_the_wrong_type(self):
        cases = {
            "train.max_iter=abc": "train.max_iter expects an integer .*got str 'abc'",
            "train.max_iter=1e5": "train.max_iter expects an integer .*got float 100000.0",
            "train.amp.enabled=yes": "train.amp.enabled expects a boolean .*got str 'yes'",
            "train.clip_grad.max_norm=large": "max_norm expects a number .*got str 'large'",
            "train.seed=true": "train.seed expects an integer .*got bool True",
        }
        for override, message in cases.items():
            with self.subTest(override), self.assertRaisesRegex(TypeError, message):
                load_lazy_config(_TRAIN_CONFIG, [override])

    def test_values_of_compatible_types(self):
        cfg = load_lazy_config(
            _TRAIN_CONFIG,
            [
                "train.clip_grad.max_norm=1",  # an integer for a float
                "train.checkpointer.max_to_keep=3",  # a value for a field that is None
                "train.output_dir=2024",  # a number for a string
                "train.device=cpu",  # a value for a lazy call
                "train.eval_period=null",
            ],
        )
        self.assertEqual(cfg.train.clip_grad.max_norm, 1)
        self.assertEqual(cfg.train.checkpointer.max_to_keep, 3)
        self.assertEqual(cfg.train.device, "cpu")
        self.assertIsNone(cfg.train.eval_period)

    def test_bad_path(self):
        with self.assertRaisesRegex(FileNotFoundError, "no/such/config.py"):
            load_lazy_config("no/such/config.py")
