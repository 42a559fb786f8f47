"""tools/benchmark.py on a tiny model, and the stand-ins for mmcv's compiled ops that
tools/benchmark_official.py gives the authors' code."""

import importlib.util
import io
import json
import os
import sys
import tempfile
import unittest
from unittest import mock

import torch
import torchvision

from codetr.layers import batched_soft_nms

from ..parity import REPO_ROOT, TINY_CO_DINO_CONFIG

TOOLS = os.path.join(REPO_ROOT, "tools")


def _load_tool(name: str):
    # benchmark_official imports its neighbour benchmark.py, as when run as a script
    with mock.patch.object(sys, "path", [TOOLS] + sys.path):
        spec = importlib.util.spec_from_file_location(name, os.path.join(TOOLS, name + ".py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


class TestBenchmark(unittest.TestCase):
    def test_tiny_model_inference_training_and_flops(self):
        benchmark = _load_tool("benchmark")
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "result.json")
            args = ["--config-file", TINY_CO_DINO_CONFIG, "--device", "cpu"]
            args += ["--height", "96", "--width", "128", "--batch-size", "2", "--boxes", "3"]
            args += ["--iters", "2", "--warmup", "0", "--flops", "--json", out]
            self.assertEqual(benchmark.main(args), 0)
            with open(out) as f:
                result = json.load(f)
        self.assertEqual(result["batch_size"], 2)
        self.assertEqual(result["precision"], "float32")
        self.assertEqual(result["image_size"], [96, 128])
        self.assertGreater(result["parameters_m"], result["inference_parameters_m"])
        for phase in ("inference", "train_step"):
            timing = result[phase]
            self.assertLessEqual(timing["min_s"], timing["median_s"])
            self.assertLessEqual(timing["median_s"], timing["max_s"])
            self.assertGreater(timing["min_s"], 0)
            self.assertGreater(timing["peak_memory_mib"], 0)
        self.assertAlmostEqual(
            result["inference"]["seconds_per_image"], result["inference"]["median_s"] / 2
        )
        self.assertGreater(result["inference_gflops_per_image"], 0)

    def test_amp_runs_the_forward_passes_in_bfloat16(self):
        benchmark = _load_tool("benchmark")
        linear_output_dtypes = set()
        instantiate = benchmark.instantiate

        def instantiate_and_watch(cfg):
            model = instantiate(cfg)
            for module in model.modules():
                if isinstance(module, torch.nn.Linear):
                    module.register_forward_hook(
                        lambda m, i, output: linear_output_dtypes.add(output.dtype)
                    )
            return model

        args = ["--config-file", TINY_CO_DINO_CONFIG, "--device", "cpu", "--amp", "auto"]
        args += ["--height", "64", "--width", "96", "--iters", "1", "--warmup", "0"]
        with mock.patch.object(benchmark, "instantiate", instantiate_and_watch):
            result = benchmark.benchmark(benchmark.parse_args(args))
        self.assertEqual(result["precision"], "bfloat16")
        self.assertEqual(linear_output_dtypes, {torch.bfloat16})
        self.assertGreater(result["train_step"]["min_s"], 0)

    def test_rejects_zero_iterations(self):
        benchmark = _load_tool("benchmark")
        with self.assertRaises(SystemExit):
            benchmark.parse_args(["--config-file", TINY_CO_DINO_CONFIG, "--iters", "0"])


class TestOfficialBenchmarkArguments(unittest.TestCase):
    """The folders of the authors' code are checked before anything is imported from them."""

    def setUp(self):
        self.parse_args = _load_tool("benchmark_official").parse_args
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.codetr = os.path.join(tmp.name, "Co-DETR")
        self.src = os.path.join(tmp.name, "src")
        packages = [("Co-DETR", p) for p in ("mmdet", "mmcv_custom", "projects")]
        for folder in packages + [("src", "mmcv")]:
            os.makedirs(os.path.join(tmp.name, *folder))
            open(os.path.join(tmp.name, *folder, "__init__.py"), "w").close()
        open(os.path.join(self.src, "mmcv", "version.py"), "w").close()
        open(os.path.join(self.codetr, "projects", "config.py"), "w").close()

    def _argv(self, codetr_root: str, mmcv_root: str) -> list:
        return [
            "--codetr-root",
            codetr_root,
            "--mmcv-root",
            mmcv_root,
            "--config",
            "projects/config.py",
        ]

    def _error(self, codetr_root: str, mmcv_root: str) -> str:
        with mock.patch("sys.stderr", new_callable=io.StringIO) as stderr:
            with self.assertRaises(SystemExit):
                self.parse_args(self._argv(codetr_root, mmcv_root))
        return stderr.getvalue()

    def test_accepts_the_expected_layout(self):
        args = self.parse_args(self._argv(self.codetr, self.src))
        self.assertEqual(args.config, os.path.join(self.codetr, "projects", "config.py"))

    def test_the_mmcv_package_itself_is_refused_with_a_hint(self):
        message = self._error(self.codetr, os.path.join(self.src, "mmcv"))
        self.assertIn("holds no package mmcv", message)
        self.assertIn("give its parent folder", message)

    def test_a_folder_without_the_authors_packages_is_refused(self):
        message = self._error(self.src, self.src)
        self.assertIn("--codetr-root", message)
        self.assertIn("holds no package mmdet, mmcv_custom, projects", message)


class TestCompiledOpStandIns(unittest.TestCase):
    def setUp(self):
        self.ops = _load_tool("benchmark_official")._CompiledOps()
        generator = torch.Generator().manual_seed(0)
        corners = torch.rand(40, 2, generator=generator) * 50
        sizes = 2 + torch.rand(40, 2, generator=generator) * 30
        self.boxes = torch.cat([corners, corners + sizes], 1)
        self.scores = torch.rand(40, generator=generator)

    def test_nms_is_torchvision(self):
        keep = self.ops.nms(self.boxes, self.scores, iou_threshold=0.5, offset=0)
        self.assertTrue(torch.equal(keep, torchvision.ops.nms(self.boxes, self.scores, 0.5)))
        with self.assertRaisesRegex(RuntimeError, "offset=1"):
            self.ops.nms(self.boxes, self.scores, iou_threshold=0.5, offset=1)

    def test_softnms_fills_dets_like_the_kernel(self):
        dets = self.boxes.new_zeros(40, 5)
        keep = self.ops.softnms(
            self.boxes,
            self.scores,
            dets,
            iou_threshold=0.3,
            sigma=0.5,
            min_score=0.05,
            method=1,
            offset=0,
        )
        expected_keep, expected_scores = batched_soft_nms(
            self.boxes,
            self.scores,
            torch.zeros(40, dtype=torch.long),
            iou_threshold=0.3,
            min_score=0.05,
            max_keep=40,
        )
        self.assertTrue(torch.equal(keep, expected_keep))
        self.assertTrue(torch.equal(dets[: len(keep), :4], self.boxes[keep]))
        self.assertTrue(torch.equal(dets[: len(keep), 4], expected_scores))
        with self.assertRaisesRegex(RuntimeError, "linear"):
            self.ops.softnms(self.boxes, self.scores, dets, 0.3, 0.5, 0.05, 2, 0)

    def test_roi_align_forward_and_backward_match_torchvision_autograd(self):
        features = torch.randn(2, 3, 16, 20, generator=torch.Generator().manual_seed(1))
        rois = torch.tensor([[0, 1.0, 2.0, 30.0, 25.0], [1, 0.0, 0.0, 12.0, 40.0]])
        kw = dict(
            aligned_height=7,
            aligned_width=7,
            spatial_scale=0.5,
            sampling_ratio=0,
            pool_mode=1,
            aligned=True,
        )
        output = features.new_zeros(2, 3, 7, 7)
        self.ops.roi_align_forward(features, rois, output, None, None, **kw)
        reference_input = features.clone().requires_grad_()
        expected = torchvision.ops.roi_align(reference_input, rois, (7, 7), 0.5, 0, True)
        self.assertTrue(torch.equal(output, expected))

        grad_output = torch.randn(2, 3, 7, 7, generator=torch.Generator().manual_seed(2))
        grad_input = torch.zeros_like(features)
        self.ops.roi_align_backward(grad_output, rois, None, None, grad_input, **kw)
        expected.backward(grad_output)
        self.assertTrue(torch.allclose(grad_input, reference_input.grad, atol=1e-6))

    def test_other_ops_raise_with_their_name(self):
        with self.assertRaisesRegex(RuntimeError, "'deform_conv_forward'"):
            self.ops.deform_conv_forward(torch.zeros(1))
