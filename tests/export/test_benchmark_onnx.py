"""tools/deploy/benchmark_onnx.py on the toy Co-DINO at a small size: PyTorch and ONNX Runtime
phases in one json, and their detections agree."""

import importlib.util
import json
import os
import sys
from unittest import mock

import onnxruntime  # noqa: F401  (the deploy extra: fail, not skip, without it)
import pytest
import torch
from detectron2.structures import Boxes, Instances

from ..parity import REPO_ROOT

TOY_CONFIG = os.path.join(REPO_ROOT, "configs", "toy", "co_dino_toy.py")
_DEPLOY = os.path.join(REPO_ROOT, "tools", "deploy")


def _load_tool():
    # the tool imports tools/benchmark.py and its neighbour export_model.py, as when run as a
    # script (it puts both folders on sys.path itself)
    with mock.patch.object(sys, "path", list(sys.path)):
        path = os.path.join(_DEPLOY, "benchmark_onnx.py")
        spec = importlib.util.spec_from_file_location("benchmark_onnx", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tool():
    return _load_tool()


def _run(tool, *args):
    """The tool on the toy config at 96 x 128, one timed run, one thread; its json result."""
    threads = torch.get_num_threads()
    # the tool flushes denormals process-wide: not in the test process
    with mock.patch.object(tool, "flush_denormals"):
        (result,) = tool.main(
            ["--config-file", TOY_CONFIG, "--height", "96", "--width", "128", "--iters", "1"]
            + ["--warmup", "0", "--threads", "1", *args]
        )
    torch.set_num_threads(threads)
    return result


def test_pytorch_and_onnx_runtime_phases_agree(tool, tmp_path):
    out, onnx_path = tmp_path / "speed.json", tmp_path / "model.onnx"
    _run(tool, "--json", str(out), "--save-onnx", str(onnx_path), "--ort-profile")
    (result,) = json.loads(out.read_text())
    assert result["config"] == TOY_CONFIG and result["image_size"] == [96, 128]
    assert result["torch_threads"] == result["ort_intra_op_threads"] == 1
    assert set(result["phases"]) == {"pytorch", "ort_all", "ort_disable"}
    for name, phase in result["phases"].items():
        assert len(phase["times_s"]) == 1 and phase["median_s"] > 0, name
        assert phase["peak_memory_mib"] > 0, name
    assert result["phases"]["ort_all"]["graph_optimization_level"] == "ORT_ENABLE_ALL"
    assert result["phases"]["ort_disable"]["graph_optimization_level"] == "ORT_DISABLE_ALL"
    assert set(result["ratios"]) == {"ort_all/pytorch", "ort_disable/pytorch"}
    # the profiled run (first level): kernel seconds per operator type, largest first; the
    # model's convolutions, GridSample (deformable attention) and the soft-NMS Loop among them
    profile = result["ort_profile"]
    assert profile["graph_optimization_level"] == "ORT_ENABLE_ALL"
    seconds = list(profile["kernel_seconds"].values())
    assert seconds == sorted(seconds, reverse=True) and all(s > 0 for s in seconds)
    assert {"Conv", "GridSample", "Loop"} <= set(profile["kernel_seconds"])
    # PyTorch inside reuse_freed_memory (where glibc is the C library), ONNX Runtime not
    assert not result["phases"]["ort_all"]["reuse_freed_memory"]
    for name, agreement in result["agreement"].items():
        count = agreement["num_expected"]
        assert count > 0, name
        assert agreement["num_detections"] == count, name
        assert agreement["equal"] == agreement["equal_prefix"] == agreement["found"] == count
        assert agreement["scores_rel"] < 1e-4, name

    # one runtime alone (for its own memory): the saved graph without PyTorch, PyTorch alone
    alone = _run(
        tool, "--onnx", str(onnx_path), "--no-pytorch", "--ort-levels", "all", "--ort-mem-arena"
    )
    assert set(alone["phases"]) == {"ort_all"} and not alone["agreement"]
    assert alone["ort_cpu_mem_arena"] and not alone["ort_reuse_freed_memory"]
    assert set(_run(tool, "--ort-levels")["phases"]) == {"pytorch"}


def test_compare_detections_counts_equal_and_found(tool):
    def instances(boxes, scores, classes):
        result = Instances((100, 100))
        result.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        result.scores = torch.tensor(scores)
        result.pred_classes = torch.tensor(classes)
        return result

    boxes = [[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 90, 90]]
    expected = instances(boxes, [0.9, 0.5, 0.4], [1, 2, 3])
    # the last two swapped: one equal, all three found
    swapped = instances([boxes[0], boxes[2], boxes[1]], [0.9, 0.4, 0.5], [1, 3, 2])
    report = tool.compare_detections(swapped, expected)
    assert (report["equal"], report["equal_prefix"], report["found"]) == (1, 1, 3)
    assert tool.compare_detections(expected, expected)["equal"] == 3


def test_arguments_are_checked(tool):
    with pytest.raises(SystemExit):
        tool.parse_args(["--onnx", "model.onnx"])  # two default configs
    with pytest.raises(SystemExit):
        tool.parse_args(["--config-file", TOY_CONFIG, "--iters", "0"])
    with pytest.raises(SystemExit):
        tool.parse_args(["--config-file", TOY_CONFIG, "--no-pytorch", "--ort-levels"])
    with pytest.raises(SystemExit):
        tool.parse_args(["--config-file", TOY_CONFIG, "--ort-profile", "--ort-levels"])
