"""
The inference model of a Co-DETR detector as one traceable function of tensors, for ONNX and
TorchScript export.

:class:`DeployableDetector` wraps a built :class:`~codetr.modeling.CoDETR` (DINO, Co-DINO,
Deformable-DETR, Co-Deformable-DETR; ResNet or Swin backbone; ``eval_module="detr"``) and
computes what ``model.inference(..., do_postprocess=False)`` computes, from a padded batch of
images and their sizes to padded detections:

* the preprocessing: normalisation by the model's pixel mean and std, zeros in the padding,
  padding to ``size_divisibility``, the padding mask;
* backbone, neck, deformable encoder, two-stage query selection, decoder (the model's own
  modules), every level size taken from a feature map's shape, so that under
  ``torch.jit.trace`` the graph stays valid for any batch size and image size;
* the test output: top-k over (query x class) scores, boxes in input pixels, and the model's
  class-aware soft-NMS (:func:`~codetr.export.soft_nms_graph.soft_nms_padded`, a bounded loop).

The model's own encoder and decoder run here, with the level sizes kept as the shapes
``torch.jit.trace`` records (0-dim tensors), so that its deformable attention samples with
``grid_sample`` (ONNX ``GridSample``, opset >= 16) instead of its ``embedding_bag`` kernel (no
ONNX operator). What is written out here is what reads sizes as Python ints in the model
(constants of a trace) or runs only in training: the flattening of the levels and their masks,
the two-stage query selection, the test output, and the Swin stages.
"""

from typing import List, NamedTuple, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.modeling.backbone.resnet import ResNet
from detectron2.modeling.backbone.swin import (
    BasicLayer,
    PatchEmbed,
    PatchMerging,
    SwinTransformer,
    SwinTransformerBlock,
    window_partition,
)
from torch import Tensor, nn
from torchvision.ops import box_convert

from codetr.layers import box_sine_embedding
from codetr.layers.soft_nms import SPLIT_THRESHOLD
from codetr.modeling import CoDETR, DeformableDETRHead, DINOHead
from codetr.modeling.transformer.multi_level import _valid_ratio
from codetr.modeling.transformer.two_stage import encoder_proposals

from .soft_nms_graph import soft_nms_padded

__all__ = ["DeployableDetector", "batch_images", "OUTPUT_NAMES", "INPUT_NAMES"]

INPUT_NAMES = ("images", "image_sizes")
OUTPUT_NAMES = ("boxes", "scores", "classes", "num_detections")
# mmcv's default min_score, used by batched_soft_nms in the model's test output
_SOFT_NMS_MIN_SCORE = 1e-3


# a level size: a Python int, or under torch.jit.trace a 0-dim tensor recorded from a shape
Size = Union[int, Tensor]


class _Levels(NamedTuple):
    """The flattened multi-level sequence (see ``codetr.modeling.transformer.multi_level``)
    with its level sizes as given (ints, or 0-dim tensors under tracing)."""

    tokens: Tensor
    padding_mask: Tensor
    spatial_shapes: Tensor
    level_start_index: Tensor
    valid_ratios: Tensor
    level_shapes: List[Tuple[Size, Size]]

    def check_layout(self) -> None:
        """Nothing to check: the layout is made from the maps' shapes here, and the model's
        check (``MultiLevelSequence.check_layout``) would read the traced sizes as ints."""


def _as_tensor(size: Size, device: torch.device) -> Tensor:
    return size if isinstance(size, Tensor) else torch.tensor(size, device=device)


class DeployableDetector(nn.Module):
    """
    ``forward(images, image_sizes) -> (boxes, scores, classes, num_detections)``.

    Args:
        model: a ``CoDETR`` whose test output is its DETR query head (``eval_module="detr"``)
            with a ``DINOHead`` or ``DeformableDETRHead``, and a detectron2 ``ResNet`` or
            ``SwinTransformer`` backbone; put in eval mode. Its parameters are shared, not
            copied.

    Inputs of ``forward``:
        images: (B, 3, H, W) uint8 or float, 0-255, in the model's ``input_format`` channel
            order, each image at the top-left of the batch, anything in the padding.
        image_sizes: (B, 2) int64, the (height, width) of every image.

    Outputs (D = the model's ``max_detections``, at most its top-k candidates):
        boxes: (B, D, 4) float32 XYXY in input pixels, clamped to the image.
        scores: (B, D) float32, non-increasing.
        classes: (B, D) int64.
        num_detections: (B,) int64: the first ``num_detections[i]`` rows of image i are its
            detections (those of ``model.inference(..., do_postprocess=False)``), the rest is
            padding (zeros).
    """

    def __init__(self, model: CoDETR):
        super().__init__()
        if not isinstance(model, CoDETR):
            raise TypeError(f"DeployableDetector needs a CoDETR model, got {type(model).__name__}")
        if model.eval_module != "detr":
            raise ValueError(
                f"Only the DETR query head's test output is exported (eval_module='detr'), the "
                f"model has eval_module={model.eval_module!r}"
            )
        head = model.query_head
        if not isinstance(head, (DINOHead, DeformableDETRHead)):
            raise TypeError(
                f"DeployableDetector exports DINOHead and DeformableDETRHead query heads, got "
                f"{type(head).__name__}"
            )
        if not isinstance(model.backbone, (ResNet, SwinTransformer)):
            raise NotImplementedError(
                f"DeployableDetector exports ResNet and Swin backbones (their sizes follow the "
                f"input in a traced graph), got {type(model.backbone).__name__}"
            )
        self.model = model.eval()
        self.num_candidates = min(head.num_candidates, head.num_queries * head.num_classes)
        if head.soft_nms_iou_threshold is not None and self.num_candidates >= SPLIT_THRESHOLD:
            raise ValueError(
                f"The exported soft-NMS runs one problem of all {self.num_candidates} candidates "
                f"(mmcv below its split threshold {SPLIT_THRESHOLD}): use fewer num_candidates"
            )
        self.num_outputs = min(head.max_detections, self.num_candidates)

    # ----------------------------------------------------------------------------- forward
    @torch.no_grad()
    def forward(self, images: Tensor, image_sizes: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        pixels, padding_mask = self.preprocess(images, image_sizes)
        backbone = self.model.backbone
        if isinstance(backbone, SwinTransformer):
            features = _swin_forward(backbone, pixels)
        else:
            features = backbone(pixels)
        levels = list(self.model.neck(features).values())
        memory = self.encode(levels, padding_mask, image_sizes)
        logits, boxes = self.decode(memory)
        return self.detections(logits, boxes, image_sizes)

    def preprocess(self, images: Tensor, image_sizes: Tensor) -> Tuple[Tensor, Tensor]:
        """
        As ``CoDETR.preprocess_image`` + ``padding_mask``: (B, 3, H', W') normalised images with
        zeros in the padding, H', W' rounded up to ``size_divisibility``, and the (B, H', W')
        bool padding mask.
        """
        model = self.model
        pixels = (images.to(model.pixel_mean.dtype) - model.pixel_mean) / model.pixel_std
        divisor = model.size_divisibility
        if divisor > 1:
            height, width = pixels.shape[-2:]
            pad_h = (divisor - height % divisor) % divisor
            pad_w = (divisor - width % divisor) % divisor
            pixels = F.pad(pixels, (0, pad_w, 0, pad_h))
        height, width = pixels.shape[-2:]
        device = pixels.device
        rows = torch.arange(height, device=device)[None, :, None]
        columns = torch.arange(width, device=device)[None, None, :]
        padding_mask = (rows >= image_sizes[:, 0, None, None]) | (
            columns >= image_sizes[:, 1, None, None]
        )
        pixels = torch.where(padding_mask[:, None], torch.zeros_like(pixels), pixels)
        return pixels, padding_mask

    def encode(self, levels: List[Tensor], padding_mask: Tensor, image_sizes: Tensor) -> _Levels:
        """``QueryHeadBase.encode``: level masks, flattening, position embedding, encoder."""
        head = self.model.query_head
        masks = [_level_mask(padding_mask, image_sizes, level) for level in levels]
        sequence = _flatten_levels(levels, masks)
        pos = torch.cat(
            [
                head.position_embedding(mask).flatten(2).transpose(1, 2) + level_embed
                for mask, level_embed in zip(masks, head.level_embeds)
            ],
            1,
        )
        return sequence._replace(tokens=head.encoder(sequence, pos))

    def decode(self, memory: _Levels) -> Tuple[Tensor, Tensor]:
        """The head's two-stage selection and decoder: the last layer's (B, Q, K) logits and
        (B, Q, 4) normalised cxcywh boxes of the matching queries."""
        head = self.model.query_head
        tokens, proposals = encoder_proposals(memory)
        tokens = head.enc_output_norm(head.enc_output(tokens))
        logits = head.class_heads[-1](tokens)
        coords = head.box_heads[-1](tokens) + proposals
        batch_size = tokens.shape[0]
        content = head.query_embed.weight[None].expand(batch_size, -1, -1)
        if isinstance(head, DINOHead):
            reference = _top(logits.max(-1)[0], coords, head.num_queries).sigmoid()
            return self._decode_queries(memory, content, reference, None)
        reference = _top(logits[..., 0], coords.sigmoid(), head.num_queries)
        embed_dim = head.decoder.embed_dim
        embedding = head.pos_trans_norm(
            head.pos_trans(
                box_sine_embedding(reference, num_pos_feats=embed_dim // 2, yx_first=False)
            )
        )
        return self._decode_queries(memory, content, reference, embedding[..., :embed_dim])

    def _decode_queries(
        self, memory: _Levels, query: Tensor, reference_boxes: Tensor, query_pos
    ) -> Tuple[Tensor, Tensor]:
        """The model's decoder; the last layer's logits and boxes."""
        head = self.model.query_head
        hidden, boxes = head.decoder(query, reference_boxes, memory, head.box_heads, query_pos)
        return head.class_heads[head.decoder.num_layers - 1](hidden[-1]), boxes[-1]

    def detections(
        self, logits: Tensor, boxes: Tensor, image_sizes: Tensor
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """``detr_detections`` on the batch, padded to ``num_outputs`` per image."""
        head = self.model.query_head
        num_classes = logits.shape[-1]
        scores = logits.float().sigmoid().flatten(1)
        top_scores, top_index = scores.topk(self.num_candidates, dim=1)
        query_index = torch.div(top_index, num_classes, rounding_mode="floor")
        top_labels = top_index % num_classes
        top_boxes = box_convert(
            boxes.float().gather(1, query_index[..., None].expand(-1, -1, 4)), "cxcywh", "xyxy"
        )
        sizes = image_sizes.to(torch.float32)
        limits = torch.stack([sizes[:, 1], sizes[:, 0], sizes[:, 1], sizes[:, 0]], -1)[:, None]
        top_boxes = torch.minimum((top_boxes * limits).clamp(min=0), limits)
        if head.soft_nms_iou_threshold is None:
            num_detections = torch.full_like(top_index[:, 0], self.num_outputs)
            return (
                top_boxes[:, : self.num_outputs],
                top_scores[:, : self.num_outputs],
                top_labels[:, : self.num_outputs],
                num_detections,
            )
        keep, kept_scores, num_detections = soft_nms_padded(
            top_boxes,
            top_scores,
            top_labels,
            iou_threshold=float(head.soft_nms_iou_threshold),
            min_score=_SOFT_NMS_MIN_SCORE,
            max_keep=int(head.max_detections),
        )
        selected = (
            torch.arange(keep.shape[1], device=keep.device)[None, :] < num_detections[:, None]
        )
        kept_boxes = top_boxes.gather(1, keep[..., None].expand(-1, -1, 4))
        kept_boxes = torch.where(selected[..., None], kept_boxes, torch.zeros_like(kept_boxes))
        kept_labels = torch.where(selected, top_labels.gather(1, keep), torch.zeros_like(keep))
        return kept_boxes, kept_scores, kept_labels, num_detections


# --------------------------------------------------------------------------------- transformer
def _level_mask(padding_mask: Tensor, image_sizes: Tensor, level: Tensor) -> Tensor:
    """
    ``level_masks``' nearest resizing of the (B, H, W) image padding mask to the size of the
    (B, C, h, w) ``level``, written as the index arithmetic of PyTorch's nearest interpolation
    (source pixel ``min(floor(i * float(H) / h), H - 1)``, in float32): the same mask, exactly,
    for any size, where ONNX ``Resize`` could round a boundary pixel differently.
    """
    height, width = padding_mask.shape[-2:]
    level_height, level_width = level.shape[-2:]
    device = padding_mask.device
    rows = _nearest_sources(height, level_height, device)
    columns = _nearest_sources(width, level_width, device)
    return (rows[None, :, None] >= image_sizes[:, 0, None, None]) | (
        columns[None, None, :] >= image_sizes[:, 1, None, None]
    )


def _nearest_sources(input_size: Size, output_size: Size, device: torch.device) -> Tensor:
    """(output_size,) source index of every output pixel of nearest interpolation."""
    scale = _as_tensor(input_size, device).to(torch.float32) / _as_tensor(output_size, device).to(
        torch.float32
    )
    positions = torch.arange(output_size, device=device).to(torch.float32)
    return torch.min((positions * scale).floor().long(), _as_tensor(input_size, device) - 1)


def _flatten_levels(levels: List[Tensor], masks: List[Tensor]) -> _Levels:
    """``flatten_levels`` with the level sizes from the maps' shapes, kept as given."""
    device = levels[0].device
    tokens = torch.cat([x.flatten(2).transpose(1, 2) for x in levels], 1)
    padding_mask = torch.cat([m.flatten(1) for m in masks], 1)
    level_shapes = [(x.shape[-2], x.shape[-1]) for x in levels]
    spatial_shapes = torch.stack(
        [torch.stack([_as_tensor(h, device), _as_tensor(w, device)]) for h, w in level_shapes]
    ).long()
    level_start_index = torch.cat(
        [spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]]
    )
    valid_ratios = torch.stack([_valid_ratio(m) for m in masks], 1)
    return _Levels(
        tokens, padding_mask, spatial_shapes, level_start_index, valid_ratios, level_shapes
    )


def _top(scores: Tensor, values: Tensor, k: int) -> Tensor:
    """``QueryHeadBase._top_proposals``: (B, k, D) ``values`` at the k highest ``scores``."""
    top = scores.topk(k, dim=1)[1]
    return values.gather(1, top[..., None].expand(-1, -1, values.shape[-1]))


# ---------------------------------------------------------------------------------------- Swin
def _swin_forward(swin: SwinTransformer, x: Tensor) -> dict:
    """
    ``SwinTransformer.forward`` (detectron2) with every size derived from tensor shapes: the
    padding to the patch and window sizes is always applied (by zero where the size divides)
    and the shifted-window mask is computed from index arithmetic, where detectron2 branches on
    the sizes and computes them with ``numpy`` (constants of a trace).
    """
    if swin.ape:
        raise NotImplementedError("Swin with absolute position embedding is not exported")
    x = _patch_embed(swin.patch_embed, x)
    height, width = x.shape[-2:]
    x = swin.pos_drop(x.flatten(2).transpose(1, 2))
    outputs = {}
    for index in range(swin.num_layers):
        x_out, out_height, out_width, x, height, width = _swin_stage(
            swin.layers[index], x, height, width
        )
        if index in swin.out_indices:
            x_out = getattr(swin, f"norm{index}")(x_out)
            channels = swin.num_features[index]
            outputs[f"p{index}"] = (
                x_out.view(-1, out_height, out_width, channels).permute(0, 3, 1, 2).contiguous()
            )
    return outputs


def _pad_amount(size: Size, multiple: int) -> Size:
    return (multiple - size % multiple) % multiple


def _patch_embed(embed: PatchEmbed, x: Tensor) -> Tensor:
    height, width = x.shape[-2:]
    x = F.pad(
        x, (0, _pad_amount(width, embed.patch_size[1]), 0, _pad_amount(height, embed.patch_size[0]))
    )
    x = embed.proj(x)
    if embed.norm is not None:
        height, width = x.shape[-2:]
        x = embed.norm(x.flatten(2).transpose(1, 2))
        x = x.transpose(1, 2).reshape(-1, embed.embed_dim, height, width)
    return x


def _shift_mask(height: Size, width: Size, window: int, shift: int, device) -> Tensor:
    """``BasicLayer``'s (nW, window**2, window**2) attention mask of the shifted windows of a
    ``height`` x ``width`` map padded to the window size: 0 within a region, -100 across."""
    padded_h = (height + window - 1) // window * window
    padded_w = (width + window - 1) // window * window

    def regions(size: Size) -> Tensor:
        # slices (0, -window), (-window, -shift), (-shift, None) -> regions 0, 1, 2
        index = torch.arange(size, device=device)
        return (index >= size - window).long() + (index >= size - shift).long()

    region = regions(padded_h)[:, None] * 3 + regions(padded_w)[None, :]
    image_mask = region.to(torch.float32)[None, :, :, None]
    mask_windows = window_partition(image_mask, window).view(-1, window * window)
    attn_mask = mask_windows.unsqueeze(1) - mask_windows.unsqueeze(2)
    return attn_mask.masked_fill(attn_mask != 0, -100.0).masked_fill(attn_mask == 0, 0.0)


def _swin_stage(layer: BasicLayer, x: Tensor, height: Size, width: Size):
    attn_mask = _shift_mask(height, width, layer.window_size, layer.shift_size, x.device)
    for block in layer.blocks:
        x = _swin_block(block, x, height, width, attn_mask)
    if layer.downsample is not None:
        x_down = _patch_merging(layer.downsample, x, height, width)
        return x, height, width, x_down, (height + 1) // 2, (width + 1) // 2
    return x, height, width, x, height, width


def _swin_block(
    block: SwinTransformerBlock, x: Tensor, height: Size, width: Size, mask: Tensor
) -> Tensor:
    batch_size, _, channels = x.shape
    window, shift = block.window_size, block.shift_size
    shortcut = x
    x = block.norm1(x).view(batch_size, height, width, channels)
    x = F.pad(x, (0, 0, 0, _pad_amount(width, window), 0, _pad_amount(height, window)))
    padded_h, padded_w = x.shape[1], x.shape[2]
    if shift > 0:
        x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
    windows = window_partition(x, window).view(-1, window * window, channels)
    windows = block.attn(windows, mask=mask if shift > 0 else None)
    windows = windows.view(-1, window, window, channels)
    # window_reverse, with the batch size inferred
    x = windows.view(-1, padded_h // window, padded_w // window, window, window, channels)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, padded_h, padded_w, channels)
    if shift > 0:
        x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
    x = x[:, :height, :width, :].reshape(batch_size, height * width, channels)
    x = shortcut + block.drop_path(x)
    return x + block.drop_path(block.mlp(block.norm2(x)))


def _patch_merging(merging: PatchMerging, x: Tensor, height: Size, width: Size) -> Tensor:
    batch_size, _, channels = x.shape
    x = x.view(batch_size, height, width, channels)
    x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
    x0 = x[:, 0::2, 0::2, :]
    x1 = x[:, 1::2, 0::2, :]
    x2 = x[:, 0::2, 1::2, :]
    x3 = x[:, 1::2, 1::2, :]
    x = torch.cat([x0, x1, x2, x3], -1).view(batch_size, -1, 4 * channels)
    return merging.reduction(merging.norm(x))


# ------------------------------------------------------------------------------------- inputs
def batch_images(
    images: Sequence[Union[Tensor, np.ndarray]], size_divisibility: int = 1
) -> Tuple[Tensor, Tensor]:
    """
    (3, h, w) images (tensors or arrays, any dtype; all the same dtype) -> the padded (B, 3, H,
    W) batch of that dtype, H, W the largest sizes (rounded up to ``size_divisibility``, which
    the exported graph also does), and the (B, 2) int64 sizes: the inputs of the exported model,
    as ``ImageList.from_tensors`` batches images for the PyTorch model.
    """
    tensors = [torch.as_tensor(image) for image in images]
    if not tensors:
        raise ValueError("batch_images needs at least one image")
    sizes = torch.tensor([list(t.shape[-2:]) for t in tensors], dtype=torch.long)
    height, width = (int(s) for s in sizes.max(0)[0])
    if size_divisibility > 1:
        height = -(-height // size_divisibility) * size_divisibility
        width = -(-width // size_divisibility) * size_divisibility
    batch = tensors[0].new_zeros((len(tensors), tensors[0].shape[0], height, width))
    for index, tensor in enumerate(tensors):
        batch[index, :, : tensor.shape[1], : tensor.shape[2]] = tensor
    return batch, sizes
