#!/usr/bin/env python
"""
Measure a model of a LazyConfig on random inputs: inference seconds per image, training step
seconds (forward + backward), peak memory, parameters and FLOPs.

    python tools/benchmark.py --config-file configs/co_dino/co_dino_5scale_r50_1x_coco.py \
        [--device cpu|cuda] [--batch-size 1] [--height 800 --width 1333] [--iters 3] \
        [--warmup 1] [--amp auto|bfloat16|float16] [--no-train] [--no-inference] [--flops] \
        [--json OUT] [key=value ...]

Images are random pixels and every image gets ``--boxes`` random ground-truth boxes, so it runs
anywhere without data. Times are medians over ``--iters`` runs after ``--warmup`` runs, with
the min and max. Peak memory is the largest resident set size of this process during a phase
(CPU), or ``torch.cuda.max_memory_allocated`` (CUDA). Inference runs under
``torch.inference_mode`` with ``eval_module`` of the config and inside
``codetr.engine.reuse_freed_memory``, like ``demo.py`` and ``train_net.py --eval-only``; the
training step includes the auxiliary heads of the config and runs with the default allocator.
With ``--amp``, the forward passes run under ``torch.autocast`` in that precision ("auto":
bfloat16 on CPU, float16 on CUDA, as ``train.amp.precision``), the backward outside it, as in
the trainer.
"""

import argparse
import contextlib
import json
import os
import statistics
import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable, Dict, List, Optional

import torch
from detectron2.config import instantiate
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from codetr.engine import (
    amp_precision,
    autocast_to,
    flush_denormals,
    load_lazy_config,
    reuse_freed_memory,
)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1333)
    parser.add_argument("--iters", type=int, default=3, help="timed runs per phase")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per phase")
    parser.add_argument("--boxes", type=int, default=10, help="ground-truth boxes per image")
    parser.add_argument(
        "--amp",
        choices=("auto", "bfloat16", "float16"),
        help="run the forward passes under autocast in this precision",
    )
    parser.add_argument("--no-train", action="store_true", help="skip the training step")
    parser.add_argument("--no-inference", action="store_true", help="skip inference")
    parser.add_argument("--flops", action="store_true", help="count inference FLOPs (fvcore)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="OUT", help="also write the results as json")
    parser.add_argument("opts", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_args(argv)
    for name in ("batch_size", "height", "width", "iters"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def peak_memory(device: torch.device, result: Dict[str, float]):
    """Records the peak memory (MiB) of the enclosed code in ``result["peak_memory_mib"]``."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        yield
        torch.cuda.synchronize(device)
        result["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        return
    peak = [_rss_bytes()]
    stop = threading.Event()

    def sample():
        while not stop.wait(0.005):
            peak[0] = max(peak[0], _rss_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield
    finally:
        stop.set()
        sampler.join()
        peak[0] = max(peak[0], _rss_bytes())
        result["peak_memory_mib"] = peak[0] / 2**20


def time_runs(fn: Callable[[], None], device: torch.device, warmup: int, iters: int) -> Dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def measure_phase(
    fn: Callable[[], None], device: torch.device, warmup: int, iters: int, *, inference: bool
) -> Dict:
    """
    :func:`time_runs` of ``fn`` with its peak memory. Inference phases run inside
    ``reuse_freed_memory`` (and record whether it applied), training with the default allocator.
    """
    phase: Dict = {}
    reuse = reuse_freed_memory() if inference else contextlib.nullcontext(None)
    with reuse as reusing, peak_memory(device, phase):
        phase.update(time_runs(fn, device, warmup, iters))
    if inference:
        phase["reuse_freed_memory"] = reusing
    return phase


def report(results: Dict, json_path: Optional[str]) -> None:
    """Prints ``results`` as json, and writes them to ``json_path`` unless None."""
    print(json.dumps(results, indent=2))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=2)


def random_inputs(args, generator: torch.Generator) -> List[Dict]:
    """Random uint8 images with random boxes (inside the image, at least 8 px)."""
    inputs = []
    for _ in range(args.batch_size):
        image = torch.randint(
            0, 256, (3, args.height, args.width), dtype=torch.uint8, generator=generator
        )
        size = torch.tensor([args.width, args.height], dtype=torch.float32)
        corner = torch.rand(args.boxes, 2, generator=generator) * size * 0.8
        extent = 8 + torch.rand(args.boxes, 2, generator=generator) * (size * 0.2)
        instances = Instances((args.height, args.width))
        instances.gt_boxes = Boxes(torch.cat([corner, (corner + extent).minimum(size)], 1))
        instances.gt_classes = torch.randint(0, 2, (args.boxes,), generator=generator)
        inputs.append(
            {"image": image, "instances": instances, "height": args.height, "width": args.width}
        )
    return inputs


def benchmark(args: argparse.Namespace) -> Dict:
    flush_denormals()
    cfg = load_lazy_config(args.config_file, args.opts)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = instantiate(cfg.model).to(device)
    inputs = random_inputs(args, torch.Generator().manual_seed(args.seed))
    precision = amp_precision(args.amp, device) if args.amp else None

    results: Dict = {
        "config": args.config_file,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "batch_size": args.batch_size,
        "image_size": [args.height, args.width],
        "precision": str(precision or torch.float32).replace("torch.", ""),
        "torch_threads": torch.get_num_threads(),
        "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
    }
    if hasattr(model, "aux_heads"):
        from codetr.checkpoint import is_training_only

        results["inference_parameters_m"] = (
            sum(p.numel() for k, p in model.named_parameters() if not is_training_only(k)) / 1e6
        )

    if not args.no_inference:
        model.eval()

        def infer():
            with torch.inference_mode(), autocast_to(device.type, precision):
                model(inputs)

        phase = measure_phase(infer, device, args.warmup, args.iters, inference=True)
        phase["seconds_per_image"] = phase["median_s"] / args.batch_size
        results["inference"] = phase

    if not args.no_train:
        model.train()

        def train_step():
            with EventStorage():
                with autocast_to(device.type, precision):
                    losses = sum(model(inputs).values())
                losses.backward()
            model.zero_grad(set_to_none=True)

        results["train_step"] = measure_phase(
            train_step, device, args.warmup, args.iters, inference=False
        )

    if args.flops:
        from detectron2.utils.analysis import FlopCountAnalysis

        model.eval()
        flops = FlopCountAnalysis(model, [{"image": inputs[0]["image"].to(device)}])
        flops.unsupported_ops_warnings(False)
        flops.uncalled_modules_warnings(False)
        results["inference_gflops_per_image"] = flops.total() / 1e9
    return results


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    report(benchmark(args), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
