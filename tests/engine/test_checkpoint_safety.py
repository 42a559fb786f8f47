"""
Loading weight files without running their code, the loaded-share check of
``AtomicCheckpointer`` and the removal of stale temporary files.
"""

import builtins
import os
import pickle
import subprocess
import sys
import tempfile
import unittest
from collections import OrderedDict
from unittest import mock

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

from codetr.checkpoint import UnsafePickleError, load_pickle_weights
from codetr.engine.checkpointer import (
    AtomicCheckpointer,
    CheckpointMismatchError,
    atomic_write,
    min_loaded_shares,
)

_FVCORE_LOGGER = "fvcore.common.checkpoint"


class _Detector(nn.Module):
    """A tiny detector: 4 backbone.* tensors, 4 head tensors."""

    def __init__(self, *, width: int = 8, num_classes: int = 3):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, width, 3), nn.Conv2d(width, width, 1))
        self.class_head = nn.Linear(width, num_classes)
        self.box_head = nn.Linear(width, 4)


class _RunsSystem:
    """Unpickling it runs ``os.system``."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _RunsExec:
    """Unpickling it runs ``builtins.exec``."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({self.marker!r}, 'w').close()",))


class _TempDirTestCase(unittest.TestCase):
    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory()
        self.tmp = self._tmp.name
        self.marker = os.path.join(self.tmp, "marker")

    def tearDown(self):
        self._tmp.cleanup()

    def dump(self, name, obj, protocol=pickle.HIGHEST_PROTOCOL):
        path = os.path.join(self.tmp, name)
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=protocol)
        return path

    def save(self, name, obj):
        path = os.path.join(self.tmp, name)
        torch.save(obj, path)
        return path


class TestSafePickle(_TempDirTestCase):
    def test_detectron2_pkl(self):
        weights = {
            "backbone.0.weight": np.arange(8 * 3 * 3 * 3, dtype=np.float32).reshape(8, 3, 3, 3),
            "backbone.0.bias": np.ones(8, np.float64),
        }
        data = {
            "model": OrderedDict(weights),
            "__author__": "Detectron2 Model Zoo",
            "matching_heuristics": np.bool_(False),
            "extra": {"set": {1, 2}, "frozen": frozenset("ab"), "bytes": b"\x00\xff", "n": 1.5},
        }
        for protocol in (2, 4, 5):
            with self.subTest(protocol=protocol):
                path = self.dump(f"model_p{protocol}.pkl", data, protocol)
                loaded = load_pickle_weights(path)
                self.assertEqual(loaded["__author__"], "Detectron2 Model Zoo")
                self.assertEqual(loaded["extra"], data["extra"])
                self.assertIsInstance(loaded["model"], OrderedDict)
                for key, value in weights.items():
                    self.assertEqual(loaded["model"][key].dtype, value.dtype)
                    np.testing.assert_array_equal(loaded["model"][key], value)

                model = _Detector()
                AtomicCheckpointer(model).load(path)
                np.testing.assert_array_equal(
                    model.backbone[0].weight.detach().numpy(), weights["backbone.0.weight"]
                )

    def test_detectron1_pkl(self):
        conv = np.zeros((8, 3, 3, 3), np.float32)
        path = self.dump("R-50.pkl", {"blobs": {"conv1_w": conv, "conv1_w_momentum": conv}}, 2)
        loaded = AtomicCheckpointer(_Detector())._load_file(path)
        self.assertEqual(sorted(loaded), ["__author__", "matching_heuristics", "model"])
        self.assertEqual(list(loaded["model"]), ["conv1_w"])
        self.assertEqual(loaded["__author__"], "Caffe2")
        self.assertTrue(loaded["matching_heuristics"])

    def test_code_in_pkl_is_refused(self):
        cases = [
            ("system.pkl", _RunsSystem(self.marker), f"{os.system.__module__}.system"),
            ("exec.pkl", _RunsExec(self.marker), "builtins.exec"),
        ]
        for name, payload, qualified in cases:
            for protocol in (0, 2, 5):
                with self.subTest(name=name, protocol=protocol):
                    path = self.dump(name, {"model": {"w": payload}}, protocol)
                    with self.assertRaises(UnsafePickleError) as raised:
                        load_pickle_weights(path)
                    self.assertIn(path, str(raised.exception))
                    self.assertIn(f"'{qualified}'", str(raised.exception))
                    with self.assertRaisesRegex(pickle.UnpicklingError, qualified):
                        AtomicCheckpointer(_Detector()).load(path)
                    self.assertFalse(os.path.exists(self.marker))

    def test_torch_tensor_in_pkl_is_refused(self):
        path = self.dump("tensor.pkl", {"model": {"w": torch.zeros(2)}})
        with self.assertRaisesRegex(UnsafePickleError, f"{path}: .*'torch\\."):
            load_pickle_weights(path)

    def test_truncated_pkl(self):
        path = self.dump("cut.pkl", {"model": {"w": np.zeros(100)}})
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
        with self.assertRaisesRegex(pickle.UnpicklingError, f"{path}: not a readable pickle"):
            load_pickle_weights(path)

    def test_pth_loads_weights_only(self):
        path = self.save("evil.pth", {"model": {"w": _RunsSystem(self.marker)}})
        # The variable makes a torch.load without weights_only unpickle anything.
        with mock.patch.dict(os.environ, {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}):
            with self.assertRaisesRegex(pickle.UnpicklingError, f"^{path}: Weights only load"):
                AtomicCheckpointer(_Detector()).load(path)
        self.assertFalse(os.path.exists(self.marker))

    def test_pyth_loads_weights_only(self):
        path = self.save("pycls.pyth", {"model_state": {"w": _RunsSystem(self.marker)}})
        with mock.patch.dict(os.environ, {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}):
            with self.assertRaisesRegex(pickle.UnpicklingError, path):
                AtomicCheckpointer(_Detector())._load_file(path)
        self.assertFalse(os.path.exists(self.marker))

        path = self.save(
            "ok.pyth", {"model_state": {"w": torch.ones(1), "bn.num_batches_tracked": 0}}
        )
        loaded = AtomicCheckpointer(_Detector())._load_file(path)
        self.assertEqual(list(loaded["model"]), ["w"])
        self.assertEqual(loaded["__author__"], "pycls")


class TestLoadedShare(_TempDirTestCase):
    def test_resnet18_like_file_fails_with_message(self):
        narrow = _Detector(width=4).backbone.state_dict()
        weights = {f"backbone.{k}": v for k, v in narrow.items()}
        weights["backbone.fc.weight"] = torch.zeros(10, 4)
        path = self.save("resnet18.pth", weights)
        model = _Detector()
        with self.assertNoLogs(_FVCORE_LOGGER, level="WARNING"):
            with self.assertRaises(CheckpointMismatchError) as raised:
                AtomicCheckpointer(model).load(path)
        self.assertEqual(
            str(raised.exception),
            f"{path} is not a checkpoint of this model: it filled 0 of the model's 8 tensors "
            "(at least one) and 0 of its 4 backbone.* tensors (at least 50% of them, as the file "
            "holds backbone.* tensors only).\n"
            "  tensors of another shape in the file: 4, e.g. "
            "backbone.0.weight: (4, 3, 3, 3) in the file, (8, 3, 3, 3) in the model; "
            "backbone.0.bias: (4,) in the file, (8,) in the model; "
            "backbone.1.weight: (4, 4, 1, 1) in the file, (8, 8, 1, 1) in the model\n"
            "  keys of the file not in the model: 1, e.g. backbone.fc.weight\n"
            "  tensors of the model not in the file: 4, e.g. "
            "class_head.weight; class_head.bias; box_head.weight",
        )
        self.assertIsInstance(raised.exception, ValueError)

    def test_one_tensor_passes_at_default_fraction(self):
        bias = torch.tensor([1.0, 2.0, 3.0, 4.0])
        path = self.save("one.pth", {"model": {"box_head.bias": bias}})
        model = _Detector()
        with self.assertLogs(_FVCORE_LOGGER, level="WARNING") as logs:
            AtomicCheckpointer(model).load(path)
        self.assertTrue(torch.equal(model.box_head.bias.detach(), bias))
        self.assertIn("class_head.{bias, weight}", "\n".join(logs.output))  # detectron2's log

        with self.assertRaisesRegex(
            CheckpointMismatchError, r"filled 1 of the model's 8 tensors \(at least 50% of them\)"
        ):
            AtomicCheckpointer(_Detector(), min_loaded_fraction=0.5).load(path)

    def test_class_count_change_passes(self):
        path = self.save("coco.pth", {"model": _Detector(num_classes=80).state_dict()})
        model = _Detector(num_classes=3)
        checkpointer = AtomicCheckpointer(model, min_loaded_fraction=0.5)
        with self.assertLogs(_FVCORE_LOGGER, level="WARNING") as logs:
            checkpointer.load(path)
        self.assertIn("Skip loading parameter 'class_head.weight'", "\n".join(logs.output))

    def test_backbone_only_file(self):
        backbone = {f"backbone.{k}": v for k, v in _Detector().backbone.state_dict().items()}
        quarter = {"backbone.0.weight": backbone["backbone.0.weight"]}
        path = self.save("quarter.pth", quarter)
        with self.assertRaisesRegex(
            CheckpointMismatchError,
            rf"^{path} is not a checkpoint of this model: it filled 1 of the model's 8 tensors "
            r"\(at least one\) and 1 of its 4 backbone.\* tensors \(at least 50% of them",
        ):
            AtomicCheckpointer(_Detector()).load(path)
        AtomicCheckpointer(_Detector(), min_backbone_fraction=0.25).load(path)

        half = dict(quarter, **{"backbone.0.bias": backbone["backbone.0.bias"]})
        AtomicCheckpointer(_Detector()).load(self.save("half.pth", half))

        # The file's "module." prefix is removed before the check.
        ddp = {f"module.{k}": v for k, v in half.items()}
        AtomicCheckpointer(_Detector()).load(self.save("ddp.pth", ddp))

    def test_resume_is_not_checked(self):
        save_dir = os.path.join(self.tmp, "run")
        os.makedirs(save_dir)
        # A checkpoint of another model, that fills none of _Detector's tensors.
        AtomicCheckpointer(nn.Linear(2, 2), save_dir).save("model_0000009")
        narrow = _Detector(width=4).backbone.state_dict()
        path = self.save("other.pth", {f"backbone.{k}": v for k, v in narrow.items()})

        AtomicCheckpointer(_Detector(), save_dir).resume_or_load(path, resume=True)
        with self.assertRaisesRegex(CheckpointMismatchError, "other.pth"):
            AtomicCheckpointer(_Detector(), save_dir).resume_or_load(path, resume=False)
        with self.assertRaisesRegex(CheckpointMismatchError, "other.pth"):
            AtomicCheckpointer(_Detector(), self.tmp).resume_or_load(path, resume=True)

    def test_arguments(self):
        for kwargs in [{"min_loaded_fraction": 1.5}, {"min_backbone_fraction": -0.1}]:
            with self.assertRaisesRegex(ValueError, f"{next(iter(kwargs))}=\\) must be in"):
                AtomicCheckpointer(_Detector(), **kwargs)

        def shares(train):
            return min_loaded_shares(OmegaConf.create({"train": train}))

        self.assertEqual(
            shares({"init_checkpoint_min_loaded": {"model": 0.3, "backbone": 0.9}}),
            {"min_loaded_fraction": 0.3, "min_backbone_fraction": 0.9},
        )
        self.assertEqual(shares({}), {"min_loaded_fraction": 0.0, "min_backbone_fraction": 0.5})
        with self.assertRaisesRegex(KeyError, "backbon"):
            shares({"init_checkpoint_min_loaded": {"backbon": 0.9}})


class TestStaleTemporaryFiles(_TempDirTestCase):
    def test_dead_process_files_are_removed(self):
        process = subprocess.Popen([sys.executable, "-c", "pass"])
        process.wait()
        stale = os.path.join(self.tmp, f".model_0000001.pth.{process.pid}.tmp")
        live = os.path.join(self.tmp, f".last_checkpoint.{os.getpid()}.tmp")
        others = ["model_0000001.pth", ".notes.tmp", ".model.pth.abc.tmp", "last_checkpoint"]
        for name in [stale, live, *others]:
            open(os.path.join(self.tmp, name), "wb").close()

        checkpointer = AtomicCheckpointer(_Detector(), self.tmp)
        with self.assertLogs(_FVCORE_LOGGER, level="WARNING") as logs:
            self.assertEqual(checkpointer.remove_stale_temporary_files(), [stale])
        self.assertIn(stale, logs.output[0])
        self.assertEqual(sorted(os.listdir(self.tmp)), sorted([os.path.basename(live), *others]))

        # The names of atomic_write's temporary files are those above.
        names = []
        atomic_write(os.path.join(self.tmp, "x.pth"), lambda f: names.append(f.name))
        self.assertEqual(names, [os.path.join(self.tmp, f".x.pth.{os.getpid()}.tmp")])

    def test_no_save_dir(self):
        self.assertEqual(AtomicCheckpointer(_Detector()).remove_stale_temporary_files(), [])
        missing = os.path.join(self.tmp, "missing")
        self.assertEqual(
            AtomicCheckpointer(_Detector(), missing).remove_stale_temporary_files(), []
        )


if __name__ == "__main__":
    unittest.main()
