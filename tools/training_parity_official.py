#!/usr/bin/env python
"""
Record what one training step of the authors' Co-DETR code computes on the tiny parity models of
``shared/reference/official_parity``: every loss term, the total, the gradients of a fixed set
of parameters and every random number drawn, so that ``tests/parity/test_training_parity.py``
can replay the step on our model. Regenerate the fixture with

    python tools/training_parity_official.py --codetr-root /path/to/Co-DETR \
        --mmcv-root /path/to/src --output tests/parity/training_reference.pt

(``--codetr-root`` / ``--mmcv-root`` as in ``tools/benchmark_official.py``, whose harness this
uses: the authors' code from source, mmcv 1.7.0 without compiled ops, the CPU stand-ins listed
there.)

The batch: the two images of the parity outputs, normalised and zero-padded as the parity
README says, with the ground truth of :data:`GROUND_TRUTH` (image 0: three objects, two of
them overlapping; image 1: one small object). Each model runs in the set-ups of :data:`SETUPS`;
a set-up edits the authors' model config (and, where a head is removed, the names of the
remaining heads' parameters, recorded with it so that our side loads the same weights).

The fixture, one dict (``torch.load(..., weights_only=True)``):
``{"images": [(H, W, 3) uint8 BGR], "gt_boxes": [(n, 4) float xyxy pixels], "gt_labels":
[(n,) int64], "models": {model: {setup: {"losses": {name: float}, "total": float,
"gradients": {authors' parameter name: Tensor}, "draws": [{"callers": innermost
first, the first with its line, "function", "value"}], "renamed": {old prefix: new prefix}, "dropped": [prefix]}}}}``.
"""

import argparse
import copy
import inspect
import json
import os
import sys
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional

import torch

# tools/benchmark_official.py, beside this file
from benchmark_official import import_authors_code
from codetr.checkpoint import load_official_checkpoint

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARITY_DIR = os.path.join(os.path.dirname(REPO_ROOT), "shared", "reference", "official_parity")
MODELS = ("tiny_co_dino_5scale_r50_1x_coco", "tiny_co_deformable_detr_r50_1x_coco")
PIXEL_MEAN = (123.675, 116.28, 103.53)  # RGB, as the parity README
PIXEL_STD = (58.395, 57.12, 57.375)

# x1, y1, x2, y2 in pixels; image 0 is 243 x 192 (H x W), image 1 183 x 215
GROUND_TRUTH = (
    ([[20.0, 30.0, 120.0, 150.0], [60.0, 80.0, 170.0, 220.0], [5.0, 5.0, 40.0, 35.0]], [3, 17, 0]),
    ([[100.0, 90.0, 116.0, 104.0]], [45]),
)

# the parameters whose gradients are recorded (authors' names; "Q." = "query_head.",
# "T." = "query_head.transformer."); those of a removed head are left out. Of the layers with
# more than 30k weights, the bias (it gets the same gradients through the layer's output).
RECORDED_PARAMETERS = (
    "backbone.conv1.weight",
    "neck.convs.1.conv.weight",
    "T.encoder.layers.0.attentions.0.sampling_offsets.weight",
    "T.encoder.layers.0.attentions.0.value_proj.weight",
    "T.decoder.layers.1.attentions.0.attn.in_proj_weight",
    "T.decoder.layers.1.attentions.1.sampling_offsets.weight",
    "T.decoder.layers.1.attentions.1.attention_weights.weight",
    "T.decoder.layers.1.attentions.1.value_proj.weight",
    "T.decoder.layers.1.attentions.1.output_proj.weight",
    "T.decoder.layers.0.attentions.1.sampling_offsets.weight",
    "T.decoder.layers.1.ffns.0.layers.0.0.weight",
    "T.decoder.layers.1.ffns.0.layers.1.weight",
    "T.decoder.ref_point_head.layers.0.weight",
    "T.decoder.ref_point_head.layers.1.weight",
    "T.query_embed.weight",
    "Q.query_embedding.weight",
    "T.pos_trans.weight",
    "T.enc_output.weight",
    "Q.cls_branches.1.weight",
    "Q.cls_branches.1.bias",
    "Q.reg_branches.1.4.weight",
    "Q.reg_branches.1.0.weight",
    "Q.cls_branches.2.weight",
    "Q.cls_branches.2.bias",
    "Q.reg_branches.2.4.weight",
    "Q.label_embedding.weight",
    "Q.downsample.0.bias",
    "T.aux_pos_trans.0.weight",
    "T.aux_pos_trans.1.weight",
    "T.pos_feats_trans.0.weight",
    "T.pos_feats_trans.1.weight",
    "T.head_pos_embed.weight",
    "rpn_head.rpn_conv.bias",
    "rpn_head.rpn_cls.weight",
    "rpn_head.rpn_reg.weight",
    "roi_head.0.bbox_head.shared_fcs.1.weight",
    "roi_head.0.bbox_head.fc_cls.weight",
    "roi_head.0.bbox_head.fc_reg.bias",
    "bbox_head.0.cls_convs.0.conv.bias",
    "bbox_head.0.atss_cls.bias",
    "bbox_head.0.atss_reg.weight",
    "bbox_head.0.atss_centerness.weight",
)


def _without_rcnn(config: Dict) -> Dict:
    """ATSS as the only auxiliary head (K = 1)."""
    config["rpn_head"] = None
    config["roi_head"] = [None]
    config["train_cfg"] = [config["train_cfg"][0], config["train_cfg"][2]]
    config["test_cfg"] = [config["test_cfg"][0], config["test_cfg"][2]]
    config["query_head"]["transformer"]["num_co_heads"] = 1
    return config


def _without_aux(config: Dict) -> Dict:
    config["rpn_head"] = None
    config["roi_head"] = [None]
    config["bbox_head"] = [None]
    return config


def _without_positive_queries(config: Dict) -> Dict:
    config["with_pos_coord"] = False
    return config


def _no_denoising_queries(gt_bboxes, gt_labels, label_embedding, img_metas):
    """Stands in for the authors' denoising generator, which their Co-DINO head requires: no
    denoising queries, no attention mask, no denoising losses (their head's own path for a
    missing ``dn_meta``)."""
    return None, None, None, None


# set-up -> (models it applies to, config edit, state-dict renames, dropped prefixes)
SETUPS = {
    "all_heads": (MODELS, lambda c: c, {}, []),
    "no_aux_heads": (MODELS, _without_aux, {}, ["rpn_head.", "roi_head.", "bbox_head."]),
    "no_positive_queries": (MODELS, _without_positive_queries, {}, []),
    # Co-Deformable-DETR only with both branches: the authors' head position embedding
    # (nn.Embedding(num_co_heads, 1, padding_idx=1)) cannot be built for one branch
    "atss_only": (
        MODELS[:1],
        _without_rcnn,
        # the ATSS head's positive-query branch is the authors' branch 1 with the RoI head, 0
        # without it
        {
            "query_head.transformer.aux_pos_trans.1.": "query_head.transformer.aux_pos_trans.0.",
            "query_head.transformer.aux_pos_trans_norm.1.": (
                "query_head.transformer.aux_pos_trans_norm.0."
            ),
            "query_head.transformer.pos_feats_trans.1.": "query_head.transformer.pos_feats_trans.0.",
            "query_head.transformer.pos_feats_norm.1.": "query_head.transformer.pos_feats_norm.0.",
        },
        [
            "rpn_head.",
            "roi_head.",
            "query_head.transformer.aux_pos_trans.0.",
            "query_head.transformer.aux_pos_trans_norm.0.",
            "query_head.transformer.pos_feats_trans.0.",
            "query_head.transformer.pos_feats_norm.0.",
        ],
    ),
    # the model is edited after it is built: see _no_denoising_queries
    "no_denoising": (MODELS[:1], lambda c: c, {}, []),
}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--codetr-root", required=True, metavar="DIR")
    parser.add_argument("--mmcv-root", required=True, metavar="DIR")
    parser.add_argument("--parity-dir", default=PARITY_DIR, metavar="DIR")
    parser.add_argument("--output", required=True, metavar="FILE")
    parser.add_argument("--seed", type=int, default=0, help="torch seed before each step")
    parser.add_argument(
        "--all-gradients",
        action="store_true",
        help="record every parameter's gradient (to look for a difference)",
    )
    parser.add_argument("--setups", nargs="*", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    return parser.parse_args(argv)


def edited_state_dict(
    state_dict: Dict[str, torch.Tensor], renamed: Dict[str, str], dropped: List[str]
) -> Dict[str, torch.Tensor]:
    """``state_dict`` without the keys under ``dropped``, then with ``renamed`` prefixes."""
    kept = {k: v for k, v in state_dict.items() if not any(k.startswith(p) for p in dropped)}
    edited = {}
    for key, value in kept.items():
        for old, new in renamed.items():
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        edited[key] = value
    return edited


_RANDOM_FUNCTIONS = (
    "rand",
    "rand_like",
    "randint",
    "randint_like",
    "randn",
    "randn_like",
    "randperm",
    "multinomial",
    "normal",
    "bernoulli",
)


@contextmanager
def recorded_draws() -> Iterator[List[Dict]]:
    """Every call of torch's random functions, in order, with the calling function and result."""
    draws: List[Dict] = []
    originals = {name: getattr(torch, name) for name in _RANDOM_FUNCTIONS}

    def recording(name: str, function: Callable) -> Callable:
        def draw(*args, **kwargs):
            value = function(*args, **kwargs)
            frame = inspect.currentframe().f_back
            callers = [
                f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_code.co_name}"
                f":{frame.f_lineno}"
            ]
            frame = frame.f_back
            while frame is not None and len(callers) < 8:
                callers.append(
                    f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_code.co_name}"
                )
                frame = frame.f_back
            # integers are stored as int32 to keep the fixture small
            stored = value.int() if value.dtype == torch.int64 else value.clone()
            draws.append({"callers": callers, "function": name, "value": stored})
            return value

        return draw

    for name, function in originals.items():
        setattr(torch, name, recording(name, function))
    try:
        yield draws
    finally:
        for name, function in originals.items():
            setattr(torch, name, function)


def authors_batch(images_bgr: List[torch.Tensor]) -> Dict:
    """mmdet's training inputs: RGB, normalised, zero-padded at the bottom / right."""
    height = max(image.shape[0] for image in images_bgr)
    width = max(image.shape[1] for image in images_bgr)
    mean = torch.tensor(PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(3, 1, 1)
    batch = torch.zeros(len(images_bgr), 3, height, width)
    metas = []
    for i, image in enumerate(images_bgr):
        h, w = image.shape[:2]
        batch[i, :, :h, :w] = (image.flip(-1).permute(2, 0, 1).float() - mean) / std
        metas.append(
            dict(
                img_shape=(h, w, 3),
                ori_shape=(h, w, 3),
                pad_shape=(height, width, 3),
                batch_input_shape=(height, width),
                scale_factor=torch.ones(4).numpy(),
                flip=False,
                flip_direction=None,
            )
        )
    return dict(
        img=batch,
        img_metas=metas,
        gt_bboxes=[torch.tensor(boxes) for boxes, _ in GROUND_TRUTH],
        gt_labels=[torch.tensor(labels) for _, labels in GROUND_TRUTH],
    )


def authors_parameter_name(name: str) -> str:
    return name.replace("T.", "query_head.transformer.", 1).replace("Q.", "query_head.", 1)


def training_step(
    model_name: str, setup: str, images_bgr: List[torch.Tensor], args: argparse.Namespace
) -> Dict:
    from mmcv import ConfigDict
    from mmdet.models import build_detector

    _, edit, renamed, dropped = SETUPS[setup]
    with open(os.path.join(args.parity_dir, f"{model_name}_model_config.json")) as f:
        config = edit(copy.deepcopy(json.load(f)))
    if config["query_head"].get("dn_cfg"):
        # the stored config is the one as built, after the generator's builder took its type
        config["query_head"]["dn_cfg"].setdefault("type", "CdnQueryGenerator")
    model = build_detector(ConfigDict(config))
    checkpoint = load_official_checkpoint(
        os.path.join(args.parity_dir, f"{model_name}_official_layout.pth")
    )
    state_dict = edited_state_dict(checkpoint, renamed, dropped)
    model.load_state_dict(state_dict, strict=True)
    if setup == "no_denoising":
        model.query_head.dn_generator = _no_denoising_queries
    model.train()

    batch = authors_batch(images_bgr)
    torch.manual_seed(args.seed)
    with recorded_draws() as draws:
        losses = model.forward_train(**batch)
    total, log_vars = model._parse_losses(losses)
    total.backward()
    parameters = dict(model.named_parameters())
    if args.all_gradients:
        names = [n for n, p in parameters.items() if p.grad is not None]
    else:
        names = [authors_parameter_name(n) for n in RECORDED_PARAMETERS]
        names = [n for n in names if n in parameters and parameters[n].grad is not None]
    return {
        # "loss" is _parse_losses' total, recorded as "total"
        "losses": {k: float(v) for k, v in log_vars.items() if "loss" in k and k != "loss"},
        "total": float(total),
        "gradients": {n: parameters[n].grad.detach().clone() for n in names},
        "draws": draws,
        "renamed": renamed,
        "dropped": dropped,
    }


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    import_authors_code(args)
    torch.use_deterministic_algorithms(True)
    # both models' outputs hold the same two images
    images_bgr = torch.load(
        os.path.join(args.parity_dir, f"{MODELS[0]}_official_outputs.pt"), weights_only=True
    )["images_bgr"]
    reference = {
        "images": list(images_bgr),
        "gt_boxes": [torch.tensor(boxes) for boxes, _ in GROUND_TRUTH],
        "gt_labels": [torch.tensor(labels) for _, labels in GROUND_TRUTH],
        "models": {},
    }
    for model_name in args.models:
        for setup in args.setups:
            if model_name not in SETUPS[setup][0]:
                continue
            step = training_step(model_name, setup, images_bgr, args)
            reference["models"].setdefault(model_name, {})[setup] = step
            print(
                f"{model_name} {setup}: total {step['total']:.6f}, "
                f"{len(step['losses'])} losses, {len(step['gradients'])} gradients, "
                f"{len(step['draws'])} draws"
            )
    torch.save(reference, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
