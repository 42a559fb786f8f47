#!/usr/bin/env python
"""
Time the authors' Co-DETR code (mmdet 2.x with mmcv 1.x) on the inputs of
``tools/benchmark.py``, so that both implementations are measured on one machine in one run.

    python tools/benchmark_official.py --codetr-root /path/to/Co-DETR --mmcv-root /path/to/src \
        --config projects/configs/co_deformable_detr/co_deformable_detr_r50_1x_coco.py \
        [--iters 3] [--warmup 1] [--no-train] [--no-inference] [--json OUT]

``--codetr-root`` is a checkout of github.com/Sense-X/Co-DETR (its ``mmdet``, ``mmcv_custom`` and
``projects`` folders); ``--mmcv-root`` the folder that holds the ``mmcv`` package (``src/mmcv``
above) of mmcv 1.7.0, the
newest its mmdet accepts (``git archive v1.7.0 mmcv`` of github.com/open-mmlab/mmcv);
``--config`` is relative to ``--codetr-root``. Both are imported from source, so they need their
pure-Python requirements (``pip install addict "yapf<0.40" terminaltables fairscale einops``)
but no compiled extension. The authors' model runs unchanged, on a
random-weight model (no pretrained backbone), except for what a CPU-only, extension-free run
needs, all listed in the output under ``"substitutions"``:

* mmcv's compiled extension is replaced by a module whose ops raise, apart from the CPU kernels
  this model calls: ``nms`` and ``roi_align`` (torchvision's kernels) and ``softnms`` (this
  project's bit-exact :func:`codetr.layers.batched_soft_nms`). Deformable attention on CPU is
  mmcv's own pure-PyTorch function, as in the authors' code.
* without a GPU, ``Tensor.cuda()`` returns the tensor unchanged and ``Tensor.to("cuda")`` stays
  on the CPU: the authors' positive-query sampling and denoising call them unconditionally.
* images are given to the model normalised (mmdet normalises in the data pipeline).

Times are medians after warm-up and peak memory the process's resident set, measured as in
``tools/benchmark.py`` (``measure_phase``).
"""

import argparse
import os
import sys
import types
from typing import Dict, List, Optional

import torch
import torchvision

# tools/benchmark.py, beside this file
from benchmark import measure_phase, random_inputs, report
from codetr.engine import flush_denormals


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--codetr-root", required=True, metavar="DIR")
    parser.add_argument("--mmcv-root", required=True, metavar="DIR")
    parser.add_argument("--config", required=True, metavar="FILE", help="under --codetr-root")
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1333)
    parser.add_argument("--iters", type=int, default=3, help="timed runs per phase")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per phase")
    parser.add_argument("--boxes", type=int, default=10, help="ground-truth boxes per image")
    parser.add_argument("--no-train", action="store_true", help="skip the training step")
    parser.add_argument("--no-inference", action="store_true", help="skip inference")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="OUT", help="also write the results as json")
    args = parser.parse_args(argv)
    expected = {"codetr_root": ("mmdet", "mmcv_custom", "projects"), "mmcv_root": ("mmcv",)}
    for name, packages in expected.items():
        path = getattr(args, name)
        if not os.path.isdir(path):
            parser.error(f"--{name.replace('_', '-')} {path!r} is not a directory")
        missing = [p for p in packages if not os.path.isfile(os.path.join(path, p, "__init__.py"))]
        if missing:
            hint = ""
            if name == "mmcv_root" and os.path.isfile(os.path.join(path, "version.py")):
                hint = ": it looks like the mmcv package itself, give its parent folder"
            parser.error(
                f"--{name.replace('_', '-')} {path!r} holds no package {', '.join(missing)}{hint}"
            )
    config = os.path.join(args.codetr_root, args.config)
    if not os.path.isfile(config):
        parser.error(f"--config: no file {config!r}")
    args.config = config
    return args


class _CompiledOps(types.ModuleType):
    """Stands in for ``mmcv._ext``: the CPU kernels the model needs, an error for the rest."""

    def __init__(self):
        super().__init__("mmcv._ext")

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def missing(*args, **kwargs):
            raise RuntimeError(f"compiled mmcv op {name!r} is not available in this benchmark")

        return missing

    @staticmethod
    def nms(boxes, scores, iou_threshold, offset):
        if offset != 0:
            raise RuntimeError("nms with offset=1 is not available in this benchmark")
        return torchvision.ops.nms(boxes, scores, iou_threshold)

    @staticmethod
    def softnms(boxes, scores, dets, iou_threshold, sigma, min_score, method, offset):
        from codetr.layers import batched_soft_nms

        if method != 1 or offset != 0:
            raise RuntimeError("only linear soft-NMS with offset=0 is available")
        keep, kept_scores = batched_soft_nms(
            boxes,
            scores,
            torch.zeros_like(scores, dtype=torch.long),
            iou_threshold=iou_threshold,
            min_score=min_score,
            max_keep=boxes.shape[0],
        )
        dets[: len(keep), :4] = boxes[keep]
        dets[: len(keep), 4] = kept_scores
        return keep

    @staticmethod
    def roi_align_forward(input, rois, output, argmax_y, argmax_x, **kw):
        if kw["pool_mode"] != 1:
            raise RuntimeError("only average RoIAlign is available in this benchmark")
        output.copy_(
            torchvision.ops.roi_align(
                input,
                rois,
                (kw["aligned_height"], kw["aligned_width"]),
                kw["spatial_scale"],
                kw["sampling_ratio"],
                kw["aligned"],
            )
        )

    @staticmethod
    def roi_align_backward(grad_output, rois, argmax_y, argmax_x, grad_input, **kw):
        batch_size, channels, height, width = grad_input.shape
        grad_input.copy_(
            torch.ops.torchvision._roi_align_backward(
                grad_output,
                rois,
                kw["spatial_scale"],
                kw["aligned_height"],
                kw["aligned_width"],
                batch_size,
                channels,
                height,
                width,
                kw["sampling_ratio"],
                kw["aligned"],
            )
        )


def _to_without_cuda(to):
    """``Tensor.to`` with a device string ``"cuda..."`` read as the CPU."""

    def to_cpu_for_cuda(self, *args, **kwargs):
        args = tuple("cpu" if isinstance(a, str) and a.startswith("cuda") else a for a in args)
        if isinstance(kwargs.get("device"), str) and kwargs["device"].startswith("cuda"):
            kwargs["device"] = "cpu"
        return to(self, *args, **kwargs)

    return to_cpu_for_cuda


def import_authors_code(args: argparse.Namespace) -> List[str]:
    """Puts mmcv and Co-DETR on the path with the stand-ins; returns the substitutions made."""
    sys.path[:0] = [args.mmcv_root, args.codetr_root]
    sys.modules["mmcv._ext"] = _CompiledOps()
    substitutions = [
        "mmcv._ext: nms and roi_align from torchvision, softnms from codetr, other ops raise"
    ]
    if not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *args, **kwargs: self
        torch.Tensor.to = _to_without_cuda(torch.Tensor.to)
        substitutions.append(
            "Tensor.cuda() returns the tensor unchanged and Tensor.to('cuda') stays on the CPU "
            "(no GPU)"
        )
    import projects.models  # noqa: F401  (registers the authors' modules with mmdet)

    return substitutions


def build_model(config_path: str):
    from mmcv import Config
    from mmdet.models import build_detector

    cfg = Config.fromfile(config_path)
    cfg.model.pop("pretrained", None)
    cfg.model.backbone.init_cfg = None  # random weights: no download
    return cfg, build_detector(
        cfg.model, train_cfg=cfg.get("train_cfg"), test_cfg=cfg.get("test_cfg")
    )


def random_batch(args: argparse.Namespace, cfg) -> Dict:
    """The image and boxes of ``tools/benchmark.py --seed S`` (batch 1), in mmdet's format."""
    bench_args = argparse.Namespace(
        batch_size=1, height=args.height, width=args.width, boxes=args.boxes
    )
    (sample,) = random_inputs(bench_args, torch.Generator().manual_seed(args.seed))
    norm = cfg.get(
        "img_norm_cfg", dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375])
    )
    mean = torch.tensor(norm["mean"]).view(3, 1, 1)
    std = torch.tensor(norm["std"]).view(3, 1, 1)
    # detectron2's images are BGR; mmdet's configs convert to RGB before normalising
    image = ((sample["image"].flip(0).float() - mean) / std)[None]
    shape = (args.height, args.width, 3)
    meta = dict(
        img_shape=shape,
        ori_shape=shape,
        pad_shape=shape,
        batch_input_shape=(args.height, args.width),
        scale_factor=torch.ones(4).numpy(),
        flip=False,
        flip_direction=None,
    )
    instances = sample["instances"]
    return dict(
        img=image,
        img_metas=[meta],
        gt_bboxes=[instances.gt_boxes.tensor],
        gt_labels=[instances.gt_classes],
    )


def benchmark(args: argparse.Namespace) -> Dict:
    flush_denormals()
    substitutions = import_authors_code(args)
    torch.manual_seed(args.seed)
    cfg, model = build_model(args.config)
    batch = random_batch(args, cfg)
    results: Dict = {
        "config": args.config,
        "implementation": "authors (mmdet 2.x / mmcv 1.x)",
        "image_size": [args.height, args.width],
        "torch_threads": torch.get_num_threads(),
        "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "substitutions": substitutions,
    }
    device = torch.device("cpu")
    if not args.no_inference:
        model.eval()

        def infer():
            with torch.no_grad():
                model.simple_test(batch["img"], batch["img_metas"], rescale=True)

        results["inference"] = measure_phase(infer, device, args.warmup, args.iters, inference=True)
    if not args.no_train:
        model.train()

        def train_step():
            losses = model.forward_train(**batch)
            loss, _ = model._parse_losses(losses)
            loss.backward()
            model.zero_grad(set_to_none=True)

        results["train_step"] = measure_phase(
            train_step, device, args.warmup, args.iters, inference=False
        )
    return results


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    report(benchmark(args), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
