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
- ``tiny_co_dino_inst``: the tiny Co-DINO R50 of the parity outputs (its config as built) with
  the Co-DINO-Inst mask branch of the authors' ``co_dino_5scale_vit_large_coco_instance.py``
  (``mask_roi_extractor``, ``mask_head``, ``mask_iou_head`` and the detector's train / test
  settings of the branch, their second entries) grafted as it is there, at the tiny width
  (:func:`shrink_query_mask_branch`): 14 x 14 RoIAlign on the five encoder levels, the
  ``SimpleRefineMaskHead`` with its 1 instance and 2 semantic 3 x 3 convs (LN) of 64 channels
  and its three fusion stages (64 -> 32 -> 16 -> 8 channels, dilations 1, 3, 5 with the global
  average; masks of 14, 28, 56 and 112, the last class-agnostic), and the ``MaskIoUHead``
  (2 LN convs of 64 channels, one FC of 128 instead of 1024, sigmoid scores); masks binarised
  at 0.5. Inputs not padded beyond the batch (size divisor 1), as the parity outputs.

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
  (``numpy.packbits``) into an (n, ceil(H * W / 8)) uint8 tensor. With the query head's mask
  branch (Co-DINO-Inst), ``detr`` holds the query head's detections with the query head's
  score (as the authors' bbox results), ``detr-masks`` their masks (packed as above) and
  ``detr-mask-scores`` per image, per class, the (n,) mask scores of those detections (the
  score times the MaskIoU head's predicted IoU of the mask's class, what the authors' segm
  results carry), and ``detr-roi-masks`` the refined (S, S) masks of those detections in their
  RoIs (S = 112, the mask head's output) binarised at 0.5 before they are pasted into the
  image, bit-packed as the masks. The authors' ``simple_test_mask`` handles one image per call
  only (it fails on a second): ``detr`` is run image by image, each image padded to the batch's
  size as in a batch of two.
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


QUERY_MASK_BRANCH = ("mask_roi_extractor", "mask_head", "mask_iou_head")


def shrink_query_mask_branch(model: Dict) -> Dict:
    """The Co-DINO-Inst mask branch grafted by :func:`_with_query_mask_branch` at the width of
    the tiny model's encoder (the neck's channels), its MaskIoU FC narrowed to twice that."""
    model = copy.deepcopy(model)
    channels = model["neck"]["out_channels"]
    num_classes = model["query_head"]["num_classes"]
    model["mask_roi_extractor"]["out_channels"] = channels
    mask_head = model["mask_head"]
    mask_head.update(
        conv_in_channels_instance=channels,
        conv_in_channels_semantic=channels,
        conv_out_channels_instance=channels,
        conv_out_channels_semantic=channels,
    )
    stages = mask_head["stage_num_classes"]
    mask_head["stage_num_classes"] = [num_classes] * (len(stages) - 1) + [stages[-1]]
    model["mask_iou_head"].update(
        in_channels=channels,
        conv_out_channels=channels,
        fc_out_channels=2 * channels,
        num_classes=num_classes,
    )
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


def _with_query_mask_branch(
    base_config: Callable[[argparse.Namespace], Dict], path: str
) -> Callable[[argparse.Namespace], Dict]:
    """``base_config`` with the query head's mask branch of the authors' config ``path`` as it
    is there: its modules and the detector's train / test settings of the branch (the second
    entry of ``train_cfg`` / ``test_cfg``, before those of the auxiliary heads)."""

    def load(args: argparse.Namespace) -> Dict:
        model = base_config(args)
        source = _authors_config(path)(args)
        for key in QUERY_MASK_BRANCH:
            model[key] = copy.deepcopy(source[key])
        for settings in ("train_cfg", "test_cfg"):
            model[settings].insert(1, copy.deepcopy(source[settings][1]))
        return model

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
    "tiny_co_dino_inst": TinyModel(
        _with_query_mask_branch(
            _parity_config("tiny_co_dino_5scale_r50_1x_coco"),
            "projects/configs/co_dino_vit/co_dino_5scale_vit_large_coco_instance.py",
        ),
        shrink_query_mask_branch,
        size_divisor=1,
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


def query_head_with_masks(
    model: torch.nn.Module, batch: torch.Tensor, metas: List[Dict]
) -> Dict[str, List[List[torch.Tensor]]]:
    """
    The authors' ``simple_test`` of eval_module "detr" with the query head's mask branch, one
    image at a time, each padded to the batch's size (their ``simple_test_mask`` rebinds
    ``det_bboxes`` / ``det_labels`` to the first image's in its loop over the images, and fails
    on the second): ``detr`` (boxes and the query head's
    scores), ``detr-masks``, ``detr-mask-scores`` (with the MaskIoU head) and ``detr-roi-masks``
    (the refined masks their ``get_seg_masks`` is given, recorded on the way).
    """
    outputs: Dict[str, List] = {"detr": [], "detr-masks": [], "detr-roi-masks": []}
    if hasattr(model, "mask_iou_head"):
        outputs["detr-mask-scores"] = []
    mask_head = model.mask_head
    paste = mask_head.get_seg_masks
    chunks = []  # per chunk of RoIs: their refined masks binarised at 0.5 and their labels

    def recording_paste(mask_pred, det_bboxes, det_labels, *args):
        chunks.append((mask_pred[:, 0].sigmoid() >= 0.5, det_labels))
        return paste(mask_pred, det_bboxes, det_labels, *args)

    mask_head.get_seg_masks = recording_paste
    try:
        for image, meta in enumerate(metas):
            chunks.clear()
            ((boxes, masks),) = model.simple_test(
                batch[image : image + 1], copy.deepcopy([meta]), rescale=True
            )
            if "detr-mask-scores" in outputs:  # (masks, mask scores) per class
                masks, mask_scores = masks
                outputs["detr-mask-scores"].append(
                    [torch.tensor(np.array(scores, dtype=np.float32)) for scores in mask_scores]
                )
            outputs["detr"].append(as_tensors(boxes))
            outputs["detr-masks"].append(packed_masks(masks))
            if chunks:
                roi_masks = torch.cat([binary for binary, _ in chunks])
                labels = torch.cat([classes for _, classes in chunks])
            else:  # no detections
                roi_masks, labels = torch.zeros(0, 0, 0, dtype=torch.bool), torch.zeros(0)
            outputs["detr-roi-masks"].append(
                packed_masks([list(roi_masks[labels == c].numpy()) for c in range(len(boxes))])
            )
    finally:
        del mask_head.get_seg_masks  # the class's method again
    return outputs


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
            if eval_module == "detr" and hasattr(model, "mask_head"):
                outputs.update(query_head_with_masks(model, batch, metas))
                continue
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
        weights_only=True,
    )["images_bgr"]
    os.makedirs(args.output_dir, exist_ok=True)
    for name in args.models:
        make_reference(name, list(images_bgr), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
