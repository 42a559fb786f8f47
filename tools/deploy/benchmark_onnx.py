#!/usr/bin/env python
"""
ONNX Runtime against PyTorch on the CPU, side by side in one process: inference seconds per
image of a config's model in PyTorch (as ``tools/benchmark.py`` runs it) and of its exported
graph (``tools/deploy/export_model.py``'s) in ONNX Runtime at several graph optimisation
levels, and whether their detections agree.

    python tools/deploy/benchmark_onnx.py \\
        [--config-file configs/co_dino/co_dino_5scale_r50_1x_coco.py ...] \\
        [--height 800 --width 1333] [--iters 5] [--warmup 1] [--seed 0] [--threads N] \\
        [--ort-levels all disable] [--ort-mem-arena] [--onnx FILE | --save-onnx FILE] \\
        [--ort-profile] [--json OUT] [key=value ...]

Default configs: Co-DINO and Co-Deformable-DETR R50, one after the other
(``configs/co_dino/co_dino_5scale_r50_1x_coco.py``,
``configs/co_deformable_detr/co_deformable_detr_r50_1x_coco.py``).

* Model: ``instantiate(cfg.model)`` after ``torch.manual_seed(--seed)`` (random weights, biases
  as the model initialises them: the model ``tools/benchmark.py`` measures), or the weights of
  ``train.init_checkpoint=...`` (as ``export_model.py``). fp32, batch 1.
* Input: ``tools/benchmark.py``'s random uint8 image of ``--seed`` (the same image), one for
  every phase.
* Graph: the model exported by ``codetr.export.export_onnx`` with that image as the trace's
  sample (to a temporary file, or ``--save-onnx FILE``), or ``--onnx FILE`` exported before from
  the same config, seed and weights.
* Phases: ``pytorch``: ``model(inputs)`` under ``torch.inference_mode`` (the dataset-mapper
  dict in, ``[{"instances": Instances}]`` out: preprocessing, network, test output,
  ``detector_postprocess``); ``ort_<level>`` for every ``--ort-levels`` level: the same call
  through :class:`codetr.export.onnx_predictor.OnnxDetector` (uint8 batch to numpy, the graph,
  the arrays back to ``Instances``, ``detector_postprocess``) on an ``InferenceSession`` with
  ``graph_optimization_level`` ``ORT_ENABLE_ALL`` / ``ORT_ENABLE_EXTENDED`` /
  ``ORT_ENABLE_BASIC`` / ``ORT_DISABLE_ALL``. Export and session creation are not in the times
  (reported apart).
* Same settings for both: ``torch.get_num_threads()`` (or ``--threads``) PyTorch threads and
  ONNX Runtime ``intra_op_num_threads`` (one inter-op thread, sequential execution), denormals
  flushed (``codetr.engine.flush_denormals``; ONNX Runtime's ``session.set_denormal_as_zero``).
* Memory settings: PyTorch runs inside ``codetr.engine.reuse_freed_memory`` (as
  ``tools/benchmark.py``, ``demo.py`` and the evaluation), ONNX Runtime with glibc's defaults
  (``--ort-reuse-freed-memory``: inside it too) and without its CPU memory arena (unless
  ``--ort-mem-arena``). Inside ``reuse_freed_memory`` ONNX Runtime is up to ~8% faster
  (Co-Deformable-DETR R50) but its allocations fragment glibc's heap (Co-DINO R50: 17.5 GB
  instead of 5.5 GB); its arena, ONNX Runtime's default, grows from run to run (Co-DINO R50: 7.2
  GB after one 800 x 1333 image, 11.6 GB after two; two such sessions and PyTorch in one process
  ran out of 24 GB).
* Alternation: ``--warmup`` untimed then ``--iters`` timed rounds; a round runs every phase
  once, the phase order rotating from round to round, so that the machine's load drifts hit
  all phases alike. Per phase: median, min and max seconds, every time, and the peak resident
  set of the process during its runs (``tools/benchmark.py``'s sampler; it includes what the
  other phases hold: their weights, the heap PyTorch freed) with the growth of the resident set
  during the phase's first run and the resident set before every timed run; the CPU seconds of
  the process
  per run (``time.process_time``: the work done, less sensitive than wall time to other
  processes on the machine, though threads that spin while waiting count too).
* Ratios: ONNX Runtime / PyTorch median seconds, and the median of the per-round ratios.
* Agreement of every ONNX Runtime phase's detections (last run) with PyTorch's (last run):
  ``equal`` detections at the same rank (same class, box within 1e-3 of the image size, score
  within 1e-3 relative; ``equal_prefix``: how many before the first difference), and ``found``:
  PyTorch detections that ONNX Runtime has anywhere (same class, IoU >= 0.99). With random
  weights near-equal scores can be ordered differently by rounding, and the soft-NMS then goes
  on differently (see ``export_model.compare_with_pytorch``).
* ``--ort-profile``: after the timed rounds, one more run of the first ``--ort-levels`` level
  in a session with ONNX Runtime's profiler on: the kernel seconds of every operator type
  (``ort_profile``, largest first), where the ONNX Runtime time goes.
* Memory of one runtime alone: in the alternated process the phases share the process, so a
  phase's peak includes what the others keep. For each runtime's own peak, run it alone:
  ``--ort-levels`` with no level (PyTorch only), or ``--no-pytorch --ort-levels all``.

Prints the results (a list, one entry per config) as json, and writes them to ``--json OUT``.
"""

import argparse
import gc
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
from detectron2.config import instantiate
from detectron2.structures import Instances
from detectron2.utils.logger import setup_logger
from torchvision.ops import box_iou

# tools/benchmark.py (the PyTorch benchmark) is in the parent folder, export_model.py beside
_DEPLOY = os.path.dirname(os.path.abspath(__file__))
for _folder in (_DEPLOY, os.path.dirname(_DEPLOY)):
    if _folder not in sys.path:
        sys.path.insert(0, _folder)

from benchmark import _rss_bytes, measure_phase, random_inputs, report  # noqa: E402
from export_model import build_model  # noqa: E402

from codetr.engine import flush_denormals, load_lazy_config  # noqa: E402
from codetr.export import batch_images, export_onnx  # noqa: E402

logger = logging.getLogger("codetr.benchmark_onnx")

DEFAULT_CONFIGS = [
    "configs/co_dino/co_dino_5scale_r50_1x_coco.py",
    "configs/co_deformable_detr/co_deformable_detr_r50_1x_coco.py",
]
ORT_LEVELS = {
    "all": "ORT_ENABLE_ALL",
    "extended": "ORT_ENABLE_EXTENDED",
    "basic": "ORT_ENABLE_BASIC",
    "disable": "ORT_DISABLE_ALL",
}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", nargs="+", default=DEFAULT_CONFIGS, metavar="FILE")
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1333)
    parser.add_argument("--iters", type=int, default=5, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the image")
    parser.add_argument(
        "--threads", type=int, help="PyTorch and ONNX Runtime threads (default: PyTorch's)"
    )
    parser.add_argument(
        "--ort-levels",
        nargs="*",
        choices=sorted(ORT_LEVELS),
        default=["all", "disable"],
        help="ONNX Runtime graph optimisation levels, one phase each (none: PyTorch alone)",
    )
    parser.add_argument(
        "--no-pytorch",
        action="store_true",
        help="ONNX Runtime phases only (with --onnx the PyTorch model is not even built)",
    )
    parser.add_argument(
        "--ort-mem-arena",
        action="store_true",
        help="ONNX Runtime's CPU memory arena on (default off: the arena grows from run to run)",
    )
    parser.add_argument(
        "--ort-reuse-freed-memory",
        action="store_true",
        help="run the ONNX Runtime phases inside reuse_freed_memory too (faster, more memory)",
    )
    parser.add_argument("--onnx", metavar="FILE", help="an exported model: no export")
    parser.add_argument("--save-onnx", metavar="FILE", help="keep the exported model here")
    parser.add_argument(
        "--ort-profile",
        action="store_true",
        help="one more, profiled run: ONNX Runtime kernel seconds per operator type",
    )
    parser.add_argument("--json", metavar="OUT", help="also write the results as json")
    parser.add_argument("opts", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_args(argv)
    for name in ("height", "width", "iters"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    if (args.onnx or args.save_onnx) and len(args.config_file) > 1:
        parser.error("--onnx and --save-onnx take one --config-file")
    if args.onnx and args.save_onnx:
        parser.error("--onnx and --save-onnx exclude each other")
    if (args.no_pytorch or args.ort_profile) and not args.ort_levels:
        parser.error("--no-pytorch and --ort-profile need at least one --ort-levels level")
    # tools/benchmark.py's random_inputs: batch 1, its default box count (the same image)
    args.batch_size, args.boxes = 1, 10
    return args


def ort_session(
    path: str, level: str, threads: int, mem_arena: bool = False, profile_prefix: str = ""
):
    """An ONNX Runtime CPU session of ``path`` at optimisation ``level`` (a key of
    :data:`ORT_LEVELS`) with ``threads`` intra-op threads, its CPU memory arena on or off, its
    profiler on when ``profile_prefix`` is given (the path prefix of its json)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    options.enable_cpu_mem_arena = mem_arena
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, ORT_LEVELS[level])
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.set_denormal_as_zero", "1")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def operator_seconds(profile_json: str) -> Dict[str, float]:
    """Kernel seconds per operator type in an ONNX Runtime profile (its "Node" events),
    largest first."""
    with open(profile_json) as f:
        events = json.load(f)
    seconds: Dict[str, float] = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            op = event["args"]["op_name"]
            seconds[op] = seconds.get(op, 0.0) + event["dur"] / 1e6
    return dict(sorted(seconds.items(), key=lambda item: -item[1]))


def compare_detections(detections: Instances, expected: Instances) -> Dict:
    """How far ``detections`` agree with ``expected`` (the criteria of
    ``export_model.compare_with_pytorch``, on Instances of the same image)."""
    count, num_expected = len(detections), len(expected)
    common = min(count, num_expected)
    boxes, expected_boxes = detections.pred_boxes.tensor, expected.pred_boxes.tensor
    box_errors = (boxes[:common] - expected_boxes[:common]).abs().amax(-1)
    expected_scores = expected.scores[:common]
    score_errors = (
        detections.scores[:common] - expected_scores
    ).abs() / expected_scores.abs().clamp(min=1e-12)
    equal = (
        (detections.pred_classes[:common] == expected.pred_classes[:common])
        & (box_errors <= 1e-3 * max(expected.image_size))
        & (score_errors <= 1e-3)
    )
    prefix = int(equal.long().cumprod(0).sum())
    same_class = detections.pred_classes[:, None] == expected.pred_classes[None, :]
    found = int(((box_iou(boxes, expected_boxes) >= 0.99) & same_class).any(0).sum())
    return {
        "num_detections": count,
        "num_expected": num_expected,
        "equal": int(equal.sum()),
        "equal_prefix": prefix,
        "found": found,
        "boxes_px": float(box_errors[:prefix].max()) if prefix else 0.0,
        "scores_rel": float(score_errors[:prefix].max()) if prefix else 0.0,
    }


def alternate(
    phases: Dict[str, Callable[[], None]],
    warmup: int,
    iters: int,
    device: torch.device,
    reuse: Sequence[str] = ("pytorch",),
) -> Dict[str, Dict]:
    """
    Runs ``warmup`` + ``iters`` rounds of every phase once, the order rotating by one phase
    per round, each run a ``tools/benchmark.py`` ``measure_phase`` of its own: the ``reuse``
    phases as inference (inside ``reuse_freed_memory``), the others with glibc's default
    allocator. Returns per phase the times
    of the timed rounds, their median, min and max, their CPU seconds, the resident set before
    each timed run, the peak resident set during its runs and its growth in the first run.
    """
    names = list(phases)
    results = {
        name: {"times_s": [], "cpu_times_s": [], "rss_before_mib": [], "peak_memory_mib": 0.0}
        for name in names
    }
    for round_index in range(warmup + iters):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            before = _rss_bytes() / 2**20
            cpu_start = time.process_time()
            run = measure_phase(phases[name], device, 0, 1, inference=name in reuse)
            cpu_seconds = time.process_time() - cpu_start
            result = results[name]
            result["peak_memory_mib"] = max(result["peak_memory_mib"], run["peak_memory_mib"])
            result.setdefault("first_run_growth_mib", run["peak_memory_mib"] - before)
            result["reuse_freed_memory"] = run.get("reuse_freed_memory", False)
            if round_index >= warmup:
                result["times_s"].append(run["median_s"])
                result["cpu_times_s"].append(cpu_seconds)
                result["rss_before_mib"].append(before)
    for result in results.values():
        times = result["times_s"]
        result.update(
            median_s=statistics.median(times),
            min_s=min(times),
            max_s=max(times),
            seconds_per_image=statistics.median(times),  # batch 1
            median_cpu_s=statistics.median(result["cpu_times_s"]),
        )
    return results


def benchmark_config(config_file: str, args: argparse.Namespace, threads: int) -> Dict:
    device = torch.device("cpu")
    cfg = load_lazy_config(config_file, args.opts)
    model = None
    if not (args.no_pytorch and args.onnx):
        torch.manual_seed(args.seed)
        # with train.init_checkpoint its weights (EMA ones when enabled), as export_model.py
        model = build_model(cfg) if "train" in cfg else instantiate(cfg.model).eval()
    inputs = random_inputs(args, torch.Generator().manual_seed(args.seed))
    results: Dict = {
        "config": config_file,
        "device": "cpu",
        "batch_size": 1,
        "image_size": [args.height, args.width],
        "precision": "float32",
        "seed": args.seed,
        "warmup": args.warmup,
        "iters": args.iters,
        "torch_threads": torch.get_num_threads(),
        "ort_intra_op_threads": threads,
        "ort_cpu_mem_arena": args.ort_mem_arena,
        "ort_reuse_freed_memory": args.ort_reuse_freed_memory,
        "torch_version": torch.__version__,
    }
    if args.ort_levels:  # PyTorch alone: without onnxruntime in the process
        import onnxruntime

        from codetr.export.onnx_predictor import OnnxDetector

        results["onnxruntime_version"] = onnxruntime.__version__
    detectors = {}
    with tempfile.TemporaryDirectory() as directory:
        path = args.onnx
        if path is None and args.ort_levels:
            path = args.save_onnx or os.path.join(directory, "model.onnx")
            images, image_sizes = batch_images([inputs[0]["image"]])
            start = time.perf_counter()
            export_onnx(model, images, image_sizes, path)
            results["export_s"] = time.perf_counter() - start
            if args.no_pytorch:
                model = None  # not in the memory of the ONNX Runtime phases
            gc.collect()
        if args.ort_levels:
            results["onnx"] = args.onnx or args.save_onnx or "(temporary)"
            results["onnx_mib"] = os.path.getsize(path) / 2**20
        for level in args.ort_levels:
            start = time.perf_counter()
            detectors[level] = OnnxDetector(ort_session(path, level, threads, args.ort_mem_arena))
            results.setdefault("session_s", {})[level] = time.perf_counter() - start
        if args.ort_profile:  # created now, while the exported file exists
            profile_dir = tempfile.mkdtemp()
            profiled = OnnxDetector(
                ort_session(
                    path,
                    args.ort_levels[0],
                    threads,
                    args.ort_mem_arena,
                    profile_prefix=os.path.join(profile_dir, "ort"),
                )
            )

    outputs: Dict[str, List] = {}

    def run_pytorch():
        with torch.inference_mode():
            outputs["pytorch"] = model(inputs)

    phases = {} if args.no_pytorch else {"pytorch": run_pytorch}
    for level, detector in detectors.items():

        def run_ort(detector=detector, name=f"ort_{level}"):
            outputs[name] = detector(inputs)

        phases[f"ort_{level}"] = run_ort

    results["rss_before_runs_mib"] = _rss_bytes() / 2**20
    reuse = list(phases) if args.ort_reuse_freed_memory else ["pytorch"]
    results["phases"] = alternate(phases, args.warmup, args.iters, device, reuse)
    if args.ort_profile:
        profiled(inputs)
        results["ort_profile"] = {
            "graph_optimization_level": ORT_LEVELS[args.ort_levels[0]],
            "kernel_seconds": operator_seconds(profiled.session.end_profiling()),
        }
        del profiled
        shutil.rmtree(profile_dir)
    reference = results["phases"].get("pytorch")
    results["ratios"] = {}
    results["agreement"] = {}
    for level in args.ort_levels:
        name = f"ort_{level}"
        phase = results["phases"][name]
        phase["graph_optimization_level"] = ORT_LEVELS[level]
        if reference is None:
            continue
        results["ratios"][f"{name}/pytorch"] = {
            "of_medians": phase["median_s"] / reference["median_s"],
            "median_of_rounds": statistics.median(
                t / r for t, r in zip(phase["times_s"], reference["times_s"])
            ),
        }
        results["agreement"][name] = compare_detections(
            outputs[name][0]["instances"], outputs["pytorch"][0]["instances"]
        )
    for name, phase in results["phases"].items():
        logger.info(
            f"{os.path.basename(config_file)} {name}: {phase['median_s']:.3f} s "
            f"({phase['min_s']:.3f}-{phase['max_s']:.3f}), peak {phase['peak_memory_mib']:.0f} MiB"
        )
    return results


def main(argv: Optional[List[str]] = None) -> List[Dict]:
    args = parse_args(argv)
    setup_logger(name="codetr")
    flush_denormals()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    results = []
    for config_file in args.config_file:
        results.append(benchmark_config(config_file, args, threads))
        gc.collect()
    report(results, args.json)
    return results


if __name__ == "__main__":
    main()
