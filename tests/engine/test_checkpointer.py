import os
import tempfile
import unittest
from unittest import mock

import torch
from torch import nn

from codetr.engine import AtomicCheckpointer, ModelEMA, atomic_write


class _Counter:
    """A checkpointable with a state."""

    def __init__(self, value: int):
        self.value = value

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


def _partial_then_fail(obj, f, *args, **kwargs):
    f.write(b"PARTIAL CHECKPOINT BYTES")
    raise OSError("No space left on device")


class TestAtomicCheckpointer(unittest.TestCase):
    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory()
        self.save_dir = self._tmp.name
        torch.manual_seed(0)
        self.model = nn.Linear(3, 2)
        self.counter = _Counter(7)
        self.checkpointer = AtomicCheckpointer(self.model, self.save_dir, counter=self.counter)

    def tearDown(self):
        self._tmp.cleanup()

    def test_save_and_resume(self):
        self.checkpointer.save("model_0000009", iteration=9)
        self.assertEqual(
            sorted(os.listdir(self.save_dir)), ["last_checkpoint", "model_0000009.pth"]
        )
        with open(os.path.join(self.save_dir, "last_checkpoint")) as f:
            self.assertEqual(f.read(), "model_0000009.pth")

        model, counter = nn.Linear(3, 2), _Counter(0)
        extra = AtomicCheckpointer(model, self.save_dir, counter=counter).resume_or_load("")
        self.assertEqual(extra["iteration"], 9)
        self.assertEqual(counter.value, 7)
        for a, b in zip(model.state_dict().values(), self.model.state_dict().values()):
            self.assertTrue(torch.equal(a, b))

    def test_failed_save_keeps_previous_checkpoint(self):
        self.checkpointer.save("model_final")
        path = os.path.join(self.save_dir, "model_final.pth")
        with open(path, "rb") as f:
            before = f.read()
        mtime = os.stat(os.path.join(self.save_dir, "last_checkpoint")).st_mtime_ns

        self.model.weight.data.zero_()
        with mock.patch.object(torch, "save", _partial_then_fail):
            with self.assertRaisesRegex(OSError, "No space left"):
                self.checkpointer.save("model_final")
            with self.assertRaisesRegex(OSError, "No space left"):
                self.checkpointer.save("model_0000001")

        # Same files as before: no partial file, no temporary file, no new tag.
        self.assertEqual(sorted(os.listdir(self.save_dir)), ["last_checkpoint", "model_final.pth"])
        with open(path, "rb") as f:
            self.assertEqual(f.read(), before)
        self.assertEqual(os.stat(os.path.join(self.save_dir, "last_checkpoint")).st_mtime_ns, mtime)
        weights = torch.load(path)["model"]["weight"]
        self.assertGreater(weights.abs().sum().item(), 0)  # the weights before zeroing

    def test_interrupted_tag_keeps_previous_tag(self):
        self.checkpointer.save("model_0000001")
        with mock.patch.object(os, "replace", side_effect=KeyboardInterrupt):
            with self.assertRaises(KeyboardInterrupt):
                self.checkpointer.tag_last_checkpoint("model_0000002.pth")
        self.assertEqual(
            sorted(os.listdir(self.save_dir)), ["last_checkpoint", "model_0000001.pth"]
        )
        self.assertEqual(
            self.checkpointer.get_checkpoint_file(),
            os.path.join(self.save_dir, "model_0000001.pth"),
        )

    def test_atomic_write(self):
        path = os.path.join(self.save_dir, "notes.txt")
        atomic_write(path, lambda f: f.write(b"old"))

        def write_then_fail(f):
            f.write(b"new, but incomplete")
            raise RuntimeError("interrupted")

        with self.assertRaisesRegex(RuntimeError, "interrupted"):
            atomic_write(path, write_then_fail)
        self.assertEqual(os.listdir(self.save_dir), ["notes.txt"])
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"old")
        atomic_write(path, lambda f: f.write(b"new"))
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"new")

    def test_ema_weights(self):
        ema = ModelEMA(self.model, decay=0.5)
        ema.reset()
        with torch.no_grad():
            for parameter in self.model.parameters():
                parameter.add_(1.0)
        ema.update(0)
        raw = {k: v.clone() for k, v in self.model.state_dict().items()}
        AtomicCheckpointer(self.model, self.save_dir, model_ema=ema).save("model_final")
        path = os.path.join(self.save_dir, "model_final.pth")
        self.assertEqual(set(torch.load(path, weights_only=True)), {"model", "model_ema"})

        def load(load_ema_weights):
            model = nn.Linear(3, 2)
            AtomicCheckpointer(model, load_ema_weights=load_ema_weights).load(path)
            return model.state_dict()

        for name, value in load(load_ema_weights=True).items():
            self.assertTrue(torch.equal(value, ema.state_dict()[name]), name)
            self.assertFalse(torch.equal(value, raw[name]), name)
        for name, value in load(load_ema_weights=False).items():
            self.assertTrue(torch.equal(value, raw[name]), name)

        self.checkpointer.save("raw_only")  # no EMA: the raw weights, with a warning
        path = os.path.join(self.save_dir, "raw_only.pth")
        with self.assertLogs("fvcore.common.checkpoint", "WARNING") as logs:
            loaded = load(load_ema_weights=True)
        self.assertIn("raw_only.pth holds no EMA weights", logs.output[0])
        self.assertTrue(torch.equal(loaded["weight"], raw["weight"]))

    def test_not_main_process_writes_nothing(self):
        AtomicCheckpointer(self.model, self.save_dir, save_to_disk=False).save("model_final")
        self.assertEqual(os.listdir(self.save_dir), [])


def test_loads_imagenet_backbone_weights_as_published(tmp_path):
    """train.init_checkpoint may be a plain torchvision ResNet state dict."""
    import torchvision

    from codetr.modeling.backbone import build_resnet

    class Detector(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = build_resnet(depth=18, out_features=["res5"], freeze_at=0, norm="BN")

    torch.manual_seed(0)
    published = torchvision.models.resnet18().state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save(published, path)
    model = Detector()
    AtomicCheckpointer(model).load(str(path))
    assert torch.equal(model.backbone.stem.conv1.weight, published["conv1.weight"])
    assert torch.equal(
        model.backbone.res5[1].conv2.norm.running_var, published["layer4.1.bn2.running_var"]
    )
