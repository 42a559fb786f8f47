#!/usr/bin/env python
"""
Make the reference of the tiny ViT Co-DINO with the authors' code: their
``co_dino_5scale_vit_large_coco.py`` model shrunk (:func:`shrink`), random weights, and what
their model computes on the two parity images, for ``tests/parity/test_tiny_co_dino_vit.py``.

    python tools/tiny_vit_parity_official.py --codetr-root /path/to/Co-DETR \
        --mmcv-root /path/to/src --output-dir tests/parity

(``--codetr-root`` / ``--mmcv-root`` as in ``tools/benchmark_official.py``, whose harness this
uses.) The images are those of ``shared/reference/official_parity`` (``--parity-dir``), handled
as the authors' ViT COCO test pipeline does apart from the resize: RGB, normalised, each image
zero-padded at the bottom / right to a multiple of 32, the batch to the largest of them.

The model: every code path of the full model (EVA-02 blocks with RoPE in 6 x 6 windows, padded,
and global RoPE computed for the input's grid; SFP to p2 ... p6; Co-DINO with 5 levels; RPN, the
4-conv GN RoI box head with class-agnostic regression, ATSS; the authors' test settings: soft-NMS
in all three eval_modules, top 1000), at small widths: a 4-block ViT of 128 channels and 2 heads
(head dim 64, the only one their global RoPE supports), position embedding stored for 128 x 128
images with a class token, 64-channel neck and transformer (8 heads, 2 + 2 layers, FFN 128),
30 queries, 10 denoising queries, positive queries capped at 20. Weights: the authors'
construction and initialisation under ``--seed``, then every 1-D parameter (biases, norms) moved by N(0, 0.1)
so that no ranking is decided by ties.

Written to ``--output-dir``:
- ``tiny_co_dino_vit_official_layout.pth``: ``{"meta", "state_dict"}`` as the authors'
  checkpoints are laid out (their key names, with the RoPE tables).
- ``tiny_co_dino_vit_official_outputs.pt`` (``torch.load(..., weights_only=True)``):
  ``images_bgr`` (the two uint8 (H, W, 3) images), ``model_config`` (the authors' config as
  built, as JSON text), ``neck`` (five (2, 64, h, w) maps), ``query_head`` (``last_cls_logits``
  (2, 30, 80), ``last_boxes_cxcywh`` (2, 30, 4), ``enc_topk_scores`` (2, 30, 80),
  ``enc_topk_anchors`` (2, 30, 4), ``encoder_maps``: the encoder memory per level plus the
  auxiliary heads' extra level), and ``detr`` / ``one-stage`` / ``two-stage``: per image, per
  class, an (n, 5) tensor ``x1, y1, x2, y2, score`` in image pixels.
"""

import argparse
import copy
import json
import os
import sys
from typing import Dict, List, Optional

import torch

# tools/benchmark_official.py, beside this file
from benchmark_official import import_authors_code

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARITY_DIR = os.path.join(os.path.dirname(REPO_ROOT), "shared", "reference", "official_parity")
AUTHORS_CONFIG = "projects/configs/co_dino_vit/co_dino_5scale_vit_large_coco.py"
NAME = "tiny_co_dino_vit"
PIXEL_MEAN = (123.675, 116.28, 103.53)  # RGB, the authors' img_norm_cfg
PIXEL_STD = (58.395, 57.12, 57.375)
SIZE_DIVISOR = 32  # the authors' ViT COCO test pipeline: Pad(size_divisor=32)

VIT_DIM = 128
EMBED_DIM = 64
NUM_QUERIES = 30


def shrink(model: Dict) -> Dict:
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


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--codetr-root", required=True, metavar="DIR")
    parser.add_argument("--mmcv-root", required=True, metavar="DIR")
    parser.add_argument("--parity-dir", default=PARITY_DIR, metavar="DIR")
    parser.add_argument("--output-dir", required=True, metavar="DIR")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def authors_inputs(images_bgr: List[torch.Tensor]):
    """mmdet's test inputs: RGB, normalised, each image padded to a multiple of
    :data:`SIZE_DIVISOR`, the batch zero-padded at the bottom / right to the largest."""

    def padded(size: int) -> int:
        return -(-size // SIZE_DIVISOR) * SIZE_DIVISOR

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


def reference(model: torch.nn.Module, images_bgr: List[torch.Tensor]) -> Dict:
    """What the authors' model computes on ``images_bgr`` (see the docstring of this file)."""
    batch, metas = authors_inputs(images_bgr)
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
            outputs[eval_module] = [as_tensors(per_class) for per_class in results]
    return outputs


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    import_authors_code(args)
    from mmcv import Config, ConfigDict
    from mmdet.models import build_detector

    torch.use_deterministic_algorithms(True)
    config = shrink(Config.fromfile(os.path.join(args.codetr_root, AUTHORS_CONFIG)).model.to_dict())
    config.pop("pretrained", None)
    model_config = json.dumps(config, indent=1)
    # seeded before the model is built: init_weights leaves some modules as built
    torch.manual_seed(args.seed)
    model = build_detector(ConfigDict(config)).eval()
    spread_weights(model)

    images_bgr = torch.load(
        os.path.join(args.parity_dir, "tiny_co_dino_5scale_r50_1x_coco_official_outputs.pt"),
        weights_only=False,
    )["images_bgr"]
    outputs = reference(model, list(images_bgr))
    outputs["model_config"] = model_config

    os.makedirs(args.output_dir, exist_ok=True)
    checkpoint = {"meta": {"config": model_config}, "state_dict": model.state_dict()}
    torch.save(checkpoint, os.path.join(args.output_dir, f"{NAME}_official_layout.pth"))
    torch.save(outputs, os.path.join(args.output_dir, f"{NAME}_official_outputs.pt"))
    for eval_module in ("detr", "one-stage", "two-stage"):
        counts = [sum(len(c) for c in image) for image in outputs[eval_module]]
        print(f"{eval_module}: detections per image {counts}")
    print(f"parameters: {sum(p.numel() for p in model.parameters())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
