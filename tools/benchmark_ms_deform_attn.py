#!/usr/bin/env python
"""
Micro-benchmark of multi-scale deformable attention: the reference (per-level grid_sample)
against the fast path the module uses, forward alone (no autograd) and forward + backward, for
Co-DINO R50 shapes (5 levels, strides 4 to 64, 8 heads of 32 channels, 4 points).

    PYTHONPATH=projects/CoDETR python tools/benchmark_ms_deform_attn.py
    PYTHONPATH=projects/CoDETR python tools/benchmark_ms_deform_attn.py --threads 1
    PYTHONPATH=projects/CoDETR python tools/benchmark_ms_deform_attn.py --image-size 400 667

Encoder: every token is a query sampling around its own position. Decoder: 900 + 200 queries
(matching + denoising) around random reference points. Offsets are a few pixels, like a trained
model's. Reference and fast runs alternate, and medians are reported, to share machine load.
"""

import argparse
import math
import statistics
import time
from typing import Callable, Dict, List, Tuple

import torch
from torch import Tensor

from codetr.layers.ms_deform_attn import multi_scale_deformable_attention
from codetr.layers.ms_deform_attn_fast import multi_scale_deformable_attention_fast

Inputs = Tuple[Tensor, Tensor, Tensor, Tensor]


def level_shapes(height: int, width: int, num_levels: int) -> List[Tuple[int, int]]:
    """(h, w) of levels with strides 4, 8, ...: each a stride-2 (ceil) reduction of the last."""
    shapes = [(math.ceil(height / 4), math.ceil(width / 4))]
    while len(shapes) < num_levels:
        h, w = shapes[-1]
        shapes.append((math.ceil(h / 2), math.ceil(w / 2)))
    return shapes


def make_inputs(
    shapes: List[Tuple[int, int]],
    *,
    num_queries: int,
    batch_size: int,
    num_heads: int,
    head_dim: int,
    num_points: int,
    offset_pixels: float,
    seed: int,
) -> Inputs:
    """
    Values, spatial shapes, sampling locations and softmax attention weights. ``num_queries``
    0 means encoder queries: one per token at its own position.
    """
    generator = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes)
    num_levels = len(shapes)
    num_values = sum(h * w for h, w in shapes)
    value = torch.randn(batch_size, num_values, num_heads, head_dim, generator=generator)
    if num_queries == 0:
        centres = []
        for h, w in shapes:
            ys, xs = torch.meshgrid(
                (torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij"
            )
            centres.append(torch.stack([xs, ys], -1).view(-1, 2))
        references = torch.cat(centres).expand(batch_size, -1, -1)
    else:
        references = torch.rand(batch_size, num_queries, 2, generator=generator)
    num_queries = references.shape[1]
    sizes = spatial_shapes.flip(-1).float()  # (L, 2) as (w, h)
    offsets = torch.randn(
        batch_size, num_queries, num_heads, num_levels, num_points, 2, generator=generator
    )
    locations = references[:, :, None, None, None] + offsets * offset_pixels / sizes[:, None]
    logits = torch.randn(
        batch_size, num_queries, num_heads, num_levels * num_points, generator=generator
    )
    weights = logits.softmax(-1).view(batch_size, num_queries, num_heads, num_levels, num_points)
    return value, spatial_shapes, locations, weights


def forward_only(function: Callable, inputs: Inputs) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            function(*inputs)

    return run


def forward_backward(function: Callable, inputs: Inputs) -> Callable[[], None]:
    value, spatial_shapes, locations, weights = inputs
    leaves = [t.clone().requires_grad_() for t in (value, locations, weights)]
    grad_output = torch.randn(value.shape[0], locations.shape[1], value.shape[2] * value.shape[3])

    def run() -> None:
        output = function(leaves[0], spatial_shapes, leaves[1], leaves[2])
        torch.autograd.grad(output, leaves, grad_output)

    return run


def median_times(runs: Dict[str, Callable[[], None]], repeats: int) -> Dict[str, float]:
    """Median seconds of every run over ``repeats`` rounds, after one warm-up round."""
    times: Dict[str, List[float]] = {name: [] for name in runs}
    for round_index in range(repeats + 1):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            if round_index > 0:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, nargs=2, default=(800, 1333), metavar=("H", "W"))
    parser.add_argument("--num-levels", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--num-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--num-points", type=int, default=4)
    parser.add_argument("--decoder-queries", type=int, default=900 + 200)
    parser.add_argument("--offset-pixels", type=float, default=4.0, help="std of the offsets")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)"
    )
    parser.add_argument("--cases", nargs="+", default=["encoder", "decoder"])
    parser.add_argument("--no-backward", action="store_true", help="time forward passes only")
    args = parser.parse_args()

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    shapes = level_shapes(*args.image_size, args.num_levels)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; levels {shapes}")
    print(f"{'case':8} {'pass':17} {'reference s':>12} {'fast s':>9} {'speedup':>8}")
    for case in args.cases:
        inputs = make_inputs(
            shapes,
            num_queries=0 if case == "encoder" else args.decoder_queries,
            batch_size=args.batch_size,
            num_heads=args.num_heads,
            head_dim=args.head_dim,
            num_points=args.num_points,
            offset_pixels=args.offset_pixels,
            seed=0,
        )
        with torch.no_grad():
            difference = (
                (
                    multi_scale_deformable_attention(*inputs)
                    - multi_scale_deformable_attention_fast(*inputs)
                )
                .abs()
                .max()
            )
        passes = [("forward", forward_only)]
        if not args.no_backward:
            passes.append(("forward+backward", forward_backward))
        for pass_name, make_run in passes:
            medians = median_times(
                {
                    "reference": make_run(multi_scale_deformable_attention, inputs),
                    "fast": make_run(multi_scale_deformable_attention_fast, inputs),
                },
                args.repeats,
            )
            print(
                f"{case:8} {pass_name:17} {medians['reference']:12.3f} {medians['fast']:9.3f} "
                f"{medians['reference'] / medians['fast']:7.2f}x"
            )
        print(f"{case:8} max |reference - fast| = {difference:.2e} (queries {inputs[2].shape[1]})")


if __name__ == "__main__":
    main()
