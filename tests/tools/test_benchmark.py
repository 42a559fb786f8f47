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
from detectron2.config import instantiate
from detectron2.utils.analysis import FlopCountAnalysis

from codetr.engine import load_lazy_config
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


class _FakeTime:
    """Stands in for the ``time`` module of a tool: ``perf_counter`` starts at 100 and each
    call returns the previous value plus the next of ``steps`` (a run's duration is the step
    of its second reading)."""

    def __init__(self, steps):
        self._steps = iter(steps)
        self._now = 100.0
        self.calls = 0

    def perf_counter(self) -> float:
        self.calls += 1
        self._now += next(self._steps)
        return self._now


def _timed_steps(durations):
    """perf_counter steps for runs of these durations: 0 at each start, the duration at its
    end."""
    return [step for duration in durations for step in (0.0, duration)]


class TestBenchmark(unittest.TestCase):
    def setUp(self):
        self.benchmark = _load_tool("benchmark")
        # the tool flushes denormals process-wide: not in the test process
        patcher = mock.patch.object(self.benchmark, "flush_denormals")
        self.flush_denormals = patcher.start()
        self.addCleanup(patcher.stop)

    def test_time_runs_median_min_max(self):
        calls = []
        clock = _FakeTime(_timed_steps([0.5, 0.25, 0.125, 2.0]))
        with mock.patch.object(self.benchmark, "time", clock):
            timing = self.benchmark.time_runs(
                lambda: calls.append(1), torch.device("cpu"), warmup=2, iters=4
            )
        # two untimed runs, then four timed ones (two readings each)
        self.assertEqual((len(calls), clock.calls), (6, 8))
        self.assertEqual(timing, {"median_s": (0.25 + 0.5) / 2, "min_s": 0.125, "max_s": 2.0})

    def test_tiny_model_inference_training_and_flops(self):
        benchmark = self.benchmark
        args = ["--config-file", TINY_CO_DINO_CONFIG, "--device", "cpu"]
        args += ["--height", "64", "--width", "96", "--batch-size", "2", "--boxes", "3"]
        args += ["--iters", "2", "--warmup", "0", "--flops"]
        # inference runs take 0.5 and 0.25 s, training steps 1 and 3 s
        clock = _FakeTime(_timed_steps([0.5, 0.25] + [1.0, 3.0]))
        with tempfile.TemporaryDirectory() as tmp, mock.patch.object(benchmark, "time", clock):
            out = os.path.join(tmp, "result.json")
            with mock.patch("sys.stdout", new_callable=io.StringIO) as stdout:
                self.assertEqual(benchmark.main(args + ["--json", out]), 0)
            with open(out) as f:
                result = json.load(f)
        # what it prints is what it writes
        self.assertEqual(json.loads(stdout.getvalue()), result)
        self.flush_denormals.assert_called_once_with()

        self.assertEqual(result["config"], TINY_CO_DINO_CONFIG)
        self.assertEqual(result["device"], "cpu")
        self.assertEqual(result["batch_size"], 2)
        self.assertEqual(result["precision"], "float32")
        self.assertEqual(result["image_size"], [64, 96])
        self.assertEqual(result["torch_threads"], torch.get_num_threads())
        inference, train_step = result["inference"], result["train_step"]
        self.assertEqual(
            {k: inference[k] for k in ("median_s", "min_s", "max_s", "seconds_per_image")},
            {"median_s": 0.375, "min_s": 0.25, "max_s": 0.5, "seconds_per_image": 0.1875},
        )
        self.assertEqual(
            {k: train_step[k] for k in ("median_s", "min_s", "max_s")},
            {"median_s": 2.0, "min_s": 1.0, "max_s": 3.0},  # the median of two: their mean
        )
        # inference reuses freed memory (glibc), training runs with the default allocator
        self.assertIs(inference["reuse_freed_memory"], True)
        self.assertNotIn("reuse_freed_memory", train_step)

        # the counts of the model of the config, made here
        torch.manual_seed(0)
        model = instantiate(load_lazy_config(TINY_CO_DINO_CONFIG, []).model)
        parameters = dict(model.named_parameters())
        inference_only = [
            n
            for n in parameters
            if not n.startswith(("aux_heads.", "aux_extra_level.", "positive_queries."))
        ]
        self.assertLess(len(inference_only), len(parameters))
        self.assertEqual(result["parameters_m"], sum(p.numel() for p in parameters.values()) / 1e6)
        self.assertEqual(
            result["inference_parameters_m"],
            sum(parameters[n].numel() for n in inference_only) / 1e6,
        )
        # FLOPs of the inference of one image of the benchmark's inputs
        namespace = benchmark.parse_args(args)
        inputs = benchmark.random_inputs(namespace, torch.Generator().manual_seed(0))
        flops = FlopCountAnalysis(model.eval(), [{"image": inputs[0]["image"]}])
        flops.unsupported_ops_warnings(False)
        flops.uncalled_modules_warnings(False)
        self.assertEqual(result["inference_gflops_per_image"], flops.total() / 1e9)

    def test_random_inputs(self):
        args = self.benchmark.parse_args(
            ["--config-file", "x.py", "--height", "60", "--width", "100"]
            + ["--batch-size", "3", "--boxes", "50", "--seed", "4"]
        )
        inputs = self.benchmark.random_inputs(args, torch.Generator().manual_seed(4))
        again = self.benchmark.random_inputs(args, torch.Generator().manual_seed(4))
        self.assertEqual(len(inputs), 3)
        for item, same in zip(inputs, again):
            self.assertEqual((item["height"], item["width"]), (60, 100))
            self.assertEqual(item["image"].dtype, torch.uint8)
            self.assertEqual(item["image"].shape, (3, 60, 100))
            instances = item["instances"]
            self.assertEqual(instances.image_size, (60, 100))
            boxes = instances.gt_boxes.tensor
            self.assertEqual(boxes.shape, (50, 4))
            # corners in [0, 0.8 size), extents in [8, 8 + 0.2 size), clipped to the image
            size = torch.tensor([100.0, 60.0])
            self.assertTrue((boxes[:, :2] >= 0).all() and (boxes[:, :2] < 0.8 * size).all())
            self.assertTrue((boxes[:, 2:] <= size).all())
            extent = boxes[:, 2:] - boxes[:, :2]
            self.assertTrue((extent < 8 + 0.2 * size).all())
            unclipped = boxes[:, 2:] < size
            self.assertTrue((extent[unclipped] >= 8).all())
            self.assertEqual(set(instances.gt_classes.tolist()), {0, 1})
            # the same seed, the same inputs
            self.assertTrue(torch.equal(item["image"], same["image"]))
            self.assertTrue(torch.equal(boxes, same["instances"].gt_boxes.tensor))
            self.assertTrue(torch.equal(instances.gt_classes, same["instances"].gt_classes))

    def test_amp_runs_the_forward_passes_in_bfloat16(self):
        benchmark = self.benchmark
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
        # one timed run: its time is the median, the min and the max
        for phase in ("inference", "train_step"):
            timing = result[phase]
            self.assertEqual(timing["min_s"], timing["median_s"])
            self.assertEqual(timing["max_s"], timing["median_s"])

    def test_rejects_zero_iterations(self):
        for option in ("--iters", "--batch-size", "--height", "--width"):
            with mock.patch("sys.stderr", new_callable=io.StringIO) as stderr:
                with self.assertRaises(SystemExit):
                    self.benchmark.parse_args(["--config-file", TINY_CO_DINO_CONFIG, option, "0"])
            self.assertIn(f"{option} must be >= 1", stderr.getvalue())


class TestDeformableAttentionBenchmark(unittest.TestCase):
    def setUp(self):
        self.tool = _load_tool("benchmark_ms_deform_attn")

    def test_level_shapes(self):
        # stride 4 (ceil), then halved with ceil: 800 x 1333 -> 200 x 334 -> 100 x 167 -> ...
        self.assertEqual(
            self.tool.level_shapes(800, 1333, 5),
            [(200, 334), (100, 167), (50, 84), (25, 42), (13, 21)],
        )
        self.assertEqual(self.tool.level_shapes(30, 17, 3), [(8, 5), (4, 3), (2, 2)])

    def test_inputs(self):
        shapes = [(4, 6), (2, 3)]
        kw = dict(batch_size=2, num_heads=3, head_dim=4, num_points=2, offset_pixels=0.0, seed=0)
        value, spatial_shapes, locations, weights = self.tool.make_inputs(
            shapes, num_queries=0, **kw
        )
        self.assertEqual(value.shape, (2, 30, 3, 4))
        self.assertEqual(spatial_shapes.tolist(), [[4, 6], [2, 3]])
        # encoder: one query per token, at its own (x, y) centre on every level and point
        self.assertEqual(locations.shape, (2, 30, 3, 2, 2, 2))
        first_level = locations[0, :24, 0, 0, 0]
        torch.testing.assert_close(first_level[0], torch.tensor([1 / 12, 1 / 8]))
        torch.testing.assert_close(first_level[7], torch.tensor([3 / 12, 3 / 8]))  # row 1, col 1
        second_level = locations[1, 24:, 2, 1, 1]
        torch.testing.assert_close(second_level[5], torch.tensor([5 / 6, 3 / 4]))  # row 1, col 2
        # softmax weights: each query and head sums to 1 over levels and points
        self.assertEqual(weights.shape, (2, 30, 3, 2, 2))
        torch.testing.assert_close(weights.sum((-1, -2)), torch.ones(2, 30, 3))

        _, _, decoder_locations, _ = self.tool.make_inputs(shapes, num_queries=7, **kw)
        self.assertEqual(decoder_locations.shape, (2, 7, 3, 2, 2, 2))

    def test_reference_and_fast_agree_on_the_benchmark_inputs(self):
        for num_queries in (0, 50):
            inputs = self.tool.make_inputs(
                self.tool.level_shapes(64, 96, 4),
                num_queries=num_queries,
                batch_size=1,
                num_heads=2,
                head_dim=8,
                num_points=4,
                offset_pixels=4.0,
                seed=0,
            )
            with torch.no_grad():
                reference = self.tool.multi_scale_deformable_attention(*inputs)
                fast = self.tool.multi_scale_deformable_attention_fast(*inputs)
            torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)

    def test_table(self):
        argv = ["benchmark_ms_deform_attn.py", "--image-size", "32", "48", "--num-levels", "2"]
        argv += ["--num-heads", "2", "--head-dim", "4", "--decoder-queries", "10", "--repeats"]
        argv += ["3", "--threads", str(torch.get_num_threads())]
        # per pass: a warm-up round (its runs are not timed: one reading each), then 3 timed
        # rounds, reference then fast in each; the reference takes 0.3, 0.5, 0.4 s (median
        # 0.4), the fast path 0.1, 0.2, 0.05 s (median 0.1)
        timed = [0.3, 0.1, 0.5, 0.2, 0.4, 0.05]
        one_pass = [0.0, 0.0] + _timed_steps(timed)
        clock = _FakeTime(one_pass * 4)  # encoder and decoder, forward and forward+backward
        with mock.patch.object(sys, "argv", argv), mock.patch.object(self.tool, "time", clock):
            with mock.patch("sys.stdout", new_callable=io.StringIO) as stdout:
                self.tool.main()
        lines = stdout.getvalue().splitlines()
        self.assertEqual(
            lines[0],
            f"torch {torch.__version__}, {torch.get_num_threads()} "
            "threads; levels [(8, 12), (4, 6)]",
        )
        self.assertEqual(
            lines[1].split(), ["case", "pass", "reference", "s", "fast", "s", "speedup"]
        )
        rows = [line.split() for line in lines[2:]]
        timing_rows = [row for row in rows if "max" not in row]
        self.assertEqual(
            timing_rows,
            [
                [case, phase, "0.400", "0.100", "4.00x"]
                for case in ("encoder", "decoder")
                for phase in ("forward", "forward+backward")
            ],
        )
        # the difference of the two implementations on the inputs: float32 rounding
        differences = [line for line in lines if "max |reference - fast|" in line]
        self.assertEqual(len(differences), 2)
        self.assertIn("(queries 120)", differences[0])  # encoder: 8 x 12 + 4 x 6 tokens
        self.assertIn("(queries 10)", differences[1])
        for line in differences:
            value = float(line.split("=")[1].split()[0])
            self.assertLess(value, 1e-5)
        self.assertEqual(clock.calls, 4 * len(one_pass))


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
