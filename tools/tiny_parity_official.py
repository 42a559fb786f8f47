#!/usr/bin/env python
"""
Make the references of tiny models for which the authors' parity outputs
(``shared/reference/official_parity``) have no counterpart, with the authors' code: their
config shrunk, random weights, and what their model computes on the two parity images, for
``tests/parity/test_tiny_co_dino_vit.py`` and ``tests/parity/test_tiny_mask_rcnn_head.py``.

    python tools/tiny_parity_official.py --codetr-root /path/to/Co-DETR \
        --mmcv-root /path/to/src --output-dir tests/parity [--models NAME ...]

(``--codetr-root`` / ``--mmcv-root`` as in ``tools/benchmark_official.py``, whose harness this
uses.) The images are those of ``shared/reference/official_parity`` (``--parity-dir``), handled
as the authors' test pipeline does apart from the resize: RGB, normalised, each image
zero-padded at the bottom / right to a multiple of the model's size divisor, the batch to the
largest of them.

The models (:data:`MODELS`):

- ``tiny_co_dino_vit``: the authors' ``co_dino_5scale_vit_large_coco.py`` with every code path of
  the full model (EVA-02 blocks with RoPE in 6 x 6 windows, padded, and global RoPE computed for
  the input's grid; SFP to p2 ... p6; Co-DINO with 5 levels; RPN, the 4-conv GN RoI box head
  with class-agnostic regression, ATSS; their test settings: soft-NMS in all three
  eval_modules, top 1000), at small widths (:func:`shrink_vit`): a 4-block ViT of 128 channels
  and 2 heads (head dim 64, the only one their global RoPE supports), position embedding
  stored for 128 x 128 images with a class token, 64-channel neck and transformer (8 heads,
  2 + 2 layers, FFN 128), 30 queries, 10 denoising queries, positive queries capped at 20.
  Inputs padded to a multiple of 32.
- ``tiny_co_deformable_detr_mask``: the tiny Co-Deformable-DETR of the parity outputs (its
  config as built) with the mask branch of the authors' ``co_deformable_detr_mask_r50_1x_coco.py``
  on its RoI head at the tiny width (:func:`with_mask_head`: 14 x 14 RoIAlign, four 3 x 3 convs
  of 64 channels, deconvolution, 28 x 28 masks, binarised at 0.5). Inputs not padded beyond
  the batch (size divisor 1), as the parity outputs.

Weights: the authors' construction and initialisation under ``--seed``, then every 1-D
parameter (biases, norms) moved by N(0, 0.1) so that no ranking is decided by ties.

Written to ``--output-dir``, per model ``NAME``:
- ``NAME_official_layout.pth``: ``{"meta", "state_dict"}`` as the authors' checkpoints are
  laid out (their key names; the ViT's RoPE tables included).
- ``NAME_official_outputs.pt`` (``torch.load(..., weights_only=True)``): ``images_bgr`` (the two
  uint8 (H, W, 3) images), ``model_config`` (the authors' config as built, as JSON text),
  ``neck`` (the neck's maps), ``query_head`` (``last_cls_logits`` (2, Q, 80),
  ``last_boxes_cxcywh`` (2, Q, 4), ``enc_topk_scores``, ``enc_topk_anchors``, ``encoder_maps``:
  the encoder memory per level plus the auxiliary heads' extra level), and ``detr`` /
  ``one-stage`` / ``two-stage``: per image, per class, an (n, 5) tensor ``x1, y1, x2, y2,
  score`` in image pixels; with a mask head also ``two-stage-masks``: per image, per class,
  the n binary masks of those detections, each (H, W) mask flattened and bit-packed
  (``numpy.packbits``) into an (n, ceil(H * W / 8)) uint8 tensor.
"""

import argparse
import copy
import json
import os
import sys
from typing import Callable, Dict, List, NamedTuple, Optional

import numpy as np
import torch

# tools/benchmark_official.py, beside this file
from benchmark_official import import_authors_code

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARITY_DIR = os.path.join(os.path.dirname(REPO_ROOT), "shared", "reference", "official_parity")
PIXEL_MEAN = (123.675, 116.28, 103.53)  # RGB, the authors' img_norm_cfg
PIXEL_STD = (58.395, 57.12, 57.375)

VIT_DIM = 128
EMBED_DIM = 64
NUM_QUERIES = 30


def shrink_vit(model: Dict) -> Dict:
    """The authors' ViT-L Co-DINO model config at the tiny size (edits listed in the docstring
    of this file); their test settings (``test_cfg``) are kept as they are."""
    model = copy.deepcopy(model)
    model["backbone"].update(
        img_size=256,
        pretrain_img_size=128,
        embed_dim=VIT_DIM,
        depth=4,
        num_heads=2,
        drop_path_rate=0.0,
        window_size=6,
        window_block_indexes=[0, 2],
        use_act_checkpoint=False,
    )
    model["neck"].update(in_channels=[VIT_DIM], out_channels=EMBED_DIM)

    head = model["query_head"]
    head.update(num_query=NUM_QUERIES, in_channels=VIT_DIM, max_pos_coords=20)
    head["dn_cfg"]["group_cfg"]["num_dn_queries"] = 10
    head["positional_encoding"]["num_feats"] = EMBED_DIM // 2
    transformer = head["transformer"]
    transformer["encoder"].update(num_layers=2, with_cp=0)
    transformer["decoder"]["num_layers"] = 2
    for stack in (transformer["encoder"], transformer["decoder"]):
        layer = stack["transformerlayers"]
        layer["feedforward_channels"] = 2 * EMBED_DIM
        # mmcv's default FFN config is 256 wide: its width is given with the layer's
        layer["ffn_cfgs"] = dict(
            type="FFN",
            embed_dims=EMBED_DIM,
            feedforward_channels=2 * EMBED_DIM,
            num_fcs=2,
            ffn_drop=0.0,
            act_cfg=dict(type="ReLU", inplace=True),
        )
        attentions = layer["attn_cfgs"]
        for attention in attentions if isinstance(attentions, list) else [attentions]:
            attention["embed_dims"] = EMBED_DIM

    model["rpn_head"].update(in_channels=EMBED_DIM, feat_channels=EMBED_DIM)
    roi_head = model["roi_head"][0]
    roi_head["bbox_roi_extractor"]["out_channels"] = EMBED_DIM
    roi_head["bbox_head"].update(
        in_channels=EMBED_DIM, conv_out_channels=EMBED_DIM, fc_out_channels=2 * EMBED_DIM
    )
    model["bbox_head"][0].update(in_channels=EMBED_DIM, feat_channels=EMBED_DIM)
    return model


def with_mask_head(model: Dict) -> Dict:
    """The tiny Co-Deformable-DETR (config as built) with the mask branch of the authors'
    ``co_deformable_detr_mask_r50_1x_coco.py`` at its width."""
    model = copy.deepcopy(model)
    roi_head = model["roi_head"][0]
    boxes = roi_head["bbox_roi_extractor"]
    roi_head["mask_roi_extractor"] = dict(
        type="SingleRoIExtractor",
        roi_layer=dict(type="RoIAlign", output_size=14, sampling_ratio=0),
        out_channels=boxes["out_channels"],
        featmap_strides=boxes["featmap_strides"],
        finest_scale=boxes["finest_scale"],
    )
    roi_head["mask_head"] = dict(
        type="FCNMaskHead",
        num_convs=4,
        in_channels=boxes["out_channels"],
        conv_out_channels=boxes["out_channels"],
        num_classes=roi_head["bbox_head"]["num_classes"],
        loss_mask=dict(type="CrossEntropyLoss", use_mask=True, loss_weight=12.0),
    )
    # the heads' settings as the detector hands them down, and the detector's own
    for rcnn_train in (roi_head["train_cfg"], model["train_cfg"][1]["rcnn"]):
        rcnn_train["mask_size"] = 28
    for rcnn_test in (roi_head["test_cfg"], model["test_cfg"][1]["rcnn"]):
        rcnn_test["mask_thr_binary"] = 0.5
    return model


class TinyModel(NamedTuple):
    """Where a tiny model's config comes from and how its inputs are padded."""

    base_config: Callable[[argparse.Namespace], Dict]  # the authors' config to shrink
    shrink: Callable[[Dict], Dict]
    size_divisor: int


def _authors_config(path: str) -> Callable[[argparse.Namespace], Dict]:
    def load(args: argparse.Namespace) -> Dict:
        from mmcv import Config

        config = Config.fromfile(os.path.join(args.codetr_root, path)).model.to_dict()
        config.pop("pretrained", None)
        return config

    return load


def _parity_config(name: str) -> Callable[[argparse.Namespace], Dict]:
    def load(args: argparse.Namespace) -> Dict:
        with open(os.path.join(args.parity_dir, f"{name}_model_config.json")) as f:
            return json.load(f)

    return load


MODELS = {
    "tiny_co_dino_vit": TinyModel(
        _authors_config("projects/configs/co_dino_vit/co_dino_5scale_vit_large_coco.py"),
        shrink_vit,
        size_divisor=32,  # the authors' ViT COCO test pipeline: Pad(size_divisor=32)
    ),
    "tiny_co_deformable_detr_mask": TinyModel(
        _parity_config("tiny_co_deformable_detr_r50_1x_coco"), with_mask_head, size_divisor=1
    ),
}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--codetr-root", required=True, metavar="DIR")
    parser.add_argument("--mmcv-root", required=True, metavar="DIR")
    parser.add_argument("--parity-dir", default=PARITY_DIR, metavar="DIR")
    parser.add_argument("--output-dir", required=True, metavar="DIR")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    return parser.parse_args(argv)


def authors_inputs(images_bgr: List[torch.Tensor], size_divisor: int):
    """mmdet's test inputs: RGB, normalised, each image padded to a multiple of
    ``size_divisor``, the batch zero-padded at the bottom / right to the largest."""

    def padded(size: int) -> int:
        return -(-size // size_divisor) * size_divisor

    height = max(padded(image.shape[0]) for image in images_bgr)
    width = max(padded(image.shape[1]) for image in images_bgr)
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
                pad_shape=(padded(h), padded(w), 3),
                batch_input_shape=(height, width),
                scale_factor=torch.ones(4).numpy(),
                flip=False,
                flip_direction=None,
            )
        )
    return batch, metas


def spread_weights(model: torch.nn.Module) -> None:
    """The authors' initialisation, then every 1-D parameter moved by N(0, 0.1)."""
    model.init_weights()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.add_(0.1 * torch.randn_like(parameter))


def as_tensors(per_class: List) -> List[torch.Tensor]:
    """mmdet's per-class numpy arrays as tensors."""
    return [torch.from_numpy(array).float() for array in per_class]


def packed_masks(per_class: List) -> List[torch.Tensor]:
    """mmdet's per-class lists of (H, W) bool masks, each class's as (n, ceil(H * W / 8))
    bit-packed uint8."""
    return [
        (
            torch.from_numpy(np.packbits(np.stack(masks).reshape(len(masks), -1), axis=1))
            if len(masks)
            else torch.zeros(0, 0, dtype=torch.uint8)
        )
        for masks in per_class
    ]


def reference(model: torch.nn.Module, images_bgr: List[torch.Tensor], size_divisor: int) -> Dict:
    """What the authors' model computes on ``images_bgr`` (see the docstring of this file)."""
    batch, metas = authors_inputs(images_bgr, size_divisor)
    outputs: Dict = {"images_bgr": images_bgr}
    with torch.no_grad():
        features = model.extract_feat(batch)
        outputs["neck"] = [f.clone() for f in features]
        classes, coords, topk_scores, topk_anchors, encoder_maps = model.query_head(
            features, copy.deepcopy(metas)
        )
        outputs["query_head"] = {
            "last_cls_logits": classes[-1],
            "last_boxes_cxcywh": coords[-1],
            "enc_topk_scores": topk_scores,
            "enc_topk_anchors": topk_anchors,
            "encoder_maps": list(encoder_maps),
        }
        for eval_module in ("detr", "one-stage", "two-stage"):
            model.eval_module = eval_module
            results = model.simple_test(batch, copy.deepcopy(metas), rescale=True)
            if isinstance(results[0], tuple):  # (boxes, masks) per image
                outputs[f"{eval_module}-masks"] = [packed_masks(masks) for _, masks in results]
                results = [boxes for boxes, _ in results]
            outputs[eval_module] = [as_tensors(per_class) for per_class in results]
    return outputs


def make_reference(name: str, images_bgr: List[torch.Tensor], args: argparse.Namespace) -> None:
    """Builds the authors' tiny model ``name`` and writes its two files (see above)."""
    from mmcv import ConfigDict
    from mmdet.models import build_detector

    tiny = MODELS[name]
    config = tiny.shrink(tiny.base_config(args))
    if config["query_head"].get("dn_cfg"):
        # a config as built has lost its generator's type to the builder
        config["query_head"]["dn_cfg"].setdefault("type", "CdnQueryGenerator")
    model_config = json.dumps(config, indent=1)
    # seeded before the model is built: init_weights leaves some modules as built
    torch.manual_seed(args.seed)
    model = build_detector(ConfigDict(config)).eval()
    spread_weights(model)
    outputs = reference(model, images_bgr, tiny.size_divisor)
    outputs["model_config"] = model_config

    checkpoint = {"meta": {"config": model_config}, "state_dict": model.state_dict()}
    torch.save(checkpoint, os.path.join(args.output_dir, f"{name}_official_layout.pth"))
    torch.save(outputs, os.path.join(args.output_dir, f"{name}_official_outputs.pt"))
    for eval_module in ("detr", "one-stage", "two-stage"):
        counts = [sum(len(c) for c in image) for image in outputs[eval_module]]
        print(f"{name} {eval_module}: detections per image {counts}")
    print(f"{name}: {sum(p.numel() for p in model.parameters())} parameters")


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    import_authors_code(args)
    torch.use_deterministic_algorithms(True)
    images_bgr = torch.load(
        os.path.join(args.parity_dir, "tiny_co_dino_5scale_r50_1x_coco_official_outputs.pt"),
        weights_only=False,
    )["images_bgr"]
    os.makedirs(args.output_dir, exist_ok=True)
    for name in args.models:
        make_reference(name, list(images_bgr), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
