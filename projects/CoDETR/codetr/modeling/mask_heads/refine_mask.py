"""
The RefineMask-style mask head of Co-DINO-Inst (the authors' mmdet ``SimpleRefineMaskHead``
with ``BARCrossEntropyLoss``): coarse-to-fine instance masks at 14, 28, 56 and 112 pixels per
RoI, each stage fusing the RoI's features with RoI-pooled features of a full-image "semantic"
branch and the previous stage's mask, and a loss that from the third stage on only looks at
the pixels near the mask boundary.

Layout, for ``conv_dim`` C = 256 and the authors' settings::

    instance: RoI features (R, C, 14, 14) -> 1 3x3 conv + LN + ReLU
    semantic: the stride-4 map (B, C, H/4, W/4) -> 2 3x3 convs + LN + ReLU
    stage j = 0, 1, 2 (input width c = C / 2^j, side s = 14 * 2^j):
        logits_j = 1x1 conv (class-specific) of the instance features          (R, 1, s, s)
        [instance features, RoIAlign_s(ReLU(1x1 conv C -> c)(semantic)), sigmoid(logits_j)]
        -> 1x1 conv -> c, ReLU -> multi-branch fusion (3x3 convs at dilation 1, 3, 5 + the
        global average, 1x1 merge), ReLU -> 1x1 conv -> c/2 - 1, ReLU -> + sigmoid(logits_j)
        -> 2x bilinear upsampling (not after the last stage)
    logits_3 = 1x1 conv (class-agnostic) at 56, upsampled 2x (bilinear, corners aligned) -> 112

Parameter names: authors' key (``mask_head.`` prefix; ``mask_branch.mask_head.`` here) ->
ours. mmcv's ``ConvModule`` keeps its conv as ``.conv`` and its channels-first LayerNorm
(``LN2d``) as ``.norm_layer``; detectron2's ``Conv2d`` is the conv itself with ``.norm``::

    {instance,semantic}_convs.{i}.conv.weight        -> {instance,semantic}_convs.{i}.weight
    {instance,semantic}_convs.{i}.norm_layer.*       -> {instance,semantic}_convs.{i}.norm.*
    stages.{j}.semantic_transform_in.*               -> stages.{j}.semantic_transform_in.*
    stages.{j}.fuse_conv.0.*                         -> stages.{j}.fuse_in.*
    stages.{j}.fuse_conv.1.dilation_conv_{k}.conv.*  -> stages.{j}.fusion.dilation_convs.{k-1}.*
    stages.{j}.fuse_conv.1.merge_conv.conv.*         -> stages.{j}.fusion.merge_conv.*
    stages.{j}.fuse_transform_out.*                  -> stages.{j}.fuse_out.*
    stage_instance_logits.{j}.*                      -> stage_instance_logits.{j}.*
"""

from typing import List, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d, get_norm
from detectron2.modeling.poolers import ROIPooler
from detectron2.structures import BitMasks, Boxes, PolygonMasks
from torch import Tensor, nn

__all__ = [
    "RefineMaskHead",
    "boundary_aware_mask_loss",
    "boundary_block_targets",
    "refine_stage_logits",
    "stage_mask_targets",
]


def boundary_block_targets(masks: Tensor, boundary_width: int) -> Tensor:
    """
    Splits binary masks into background (0), a band around the mask boundary (1) and the
    mask's interior (2), as the authors' ``generate_block_target``.

    With the (2w+1) x (2w+1) window around each pixel (w = ``boundary_width``; outside the
    mask's extent counts as background), a mask pixel is on the boundary when more than a
    tenth of its window is background, a background pixel when more than a tenth of its window
    is mask. (The authors apply a Laplacian kernel to the mask and to its complement and keep
    values above 0.1 after dividing by the window's area; these are the same counts: with an
    odd window side the tenth is never reached exactly.)

    Args:
        masks: (N, H, W) bool or 0/1 float.
    Returns:
        (N, H, W) int64 in {0, 1, 2}.
    """
    masks = masks.float()
    side = 2 * boundary_width + 1
    window = side * side
    kernel = masks.new_ones(1, 1, side, side)
    inside = F.conv2d(masks[:, None], kernel, padding=boundary_width)[:, 0]  # mask pixels
    in_mask = masks > 0
    mask_boundary = in_mask & ((window - inside) * 10 > window)
    background_boundary = ~in_mask & (inside * 10 > window)
    blocks = torch.zeros_like(masks, dtype=torch.int64)
    blocks[mask_boundary | background_boundary] = 1
    blocks[in_mask & ~mask_boundary] = 2
    return blocks


def _boundary_at(boundary_width: int, size: Tuple[int, int], *binary: Tensor) -> Tensor:
    """(N, 1, *size) bool: the union of the boundary bands of the ``binary`` masks (each
    (N, h, w)), resized bilinearly (corners aligned) and kept where it covers at least half a
    pixel."""
    band = torch.stack([boundary_block_targets(b, boundary_width) == 1 for b in binary]).any(0)
    return F.interpolate(band.float()[:, None], size, mode="bilinear", align_corners=True) >= 0.5


def _upsampled(logits: Tensor, size: Tuple[int, int]) -> Tensor:
    return F.interpolate(logits, size, mode="bilinear", align_corners=True)


def refine_stage_logits(stage_logits: Sequence[Tensor]) -> Tensor:
    """
    The test-time mask of the authors' ``simple_test_mask``: from the second stage on, each
    finer stage replaces the coarser mask only in a band of width 1 around its boundary; the
    rest is the coarser mask upsampled (bilinear, corners aligned).

    Args:
        stage_logits: per stage (R, 1, s, s) logits, coarse to fine (the first is not used).
    Returns:
        (R, 1, S, S) logits at the finest stage's side S.
    """
    logits = stage_logits[1]
    for finer in stage_logits[2:]:
        size = finer.shape[-2:]
        boundary = _boundary_at(1, size, logits[:, 0].sigmoid() >= 0.5)
        # the authors resize the band's complement: the same pixels, since resizing a 0/1 map
        # from s to 2s (corners aligned) gives multiples of 1 / (2s - 1)^2, never 0.5
        logits = torch.where(boundary, finer, _upsampled(logits, size))
    return logits


def boundary_aware_mask_loss(
    stage_logits: Sequence[Tensor],
    stage_targets: Sequence[Tensor],
    *,
    stage_weights: Sequence[float],
    boundary_width: int = 2,
    start_stage: int = 1,
) -> Tensor:
    """
    The authors' ``BARCrossEntropyLoss``. Stages up to ``start_stage``: binary cross-entropy
    averaged over all RoI pixels. Each later stage: binary cross-entropy summed over its
    boundary region and divided by that region's pixel count (at least 1); the region is the
    union of the boundary bands (width ``boundary_width``) of the previous stage's target and
    of the previous prediction, taken at the previous stage's side and then resized to the
    stage (bilinear, corners aligned, >= 0.5). The previous prediction is the previous stage's
    own mask up to ``start_stage``; after a later stage it is the previous stage's raw mask
    upsampled, with this stage's mask in the width-1 band around the previous prediction's
    boundary (as at test time, but from the raw rather than the merged coarser mask, as the
    authors' code). Returns the stage losses weighted by ``stage_weights`` and summed.

    Args:
        stage_logits: per stage (R, 1, s, s) logits, R > 0.
        stage_targets: per stage (R, s, s) 0/1 float targets.
    """
    if not len(stage_logits) == len(stage_targets) == len(stage_weights):
        raise ValueError(
            f"{len(stage_logits)} stages of logits, {len(stage_targets)} of targets and "
            f"{len(stage_weights)} weights"
        )
    total = 0.0
    previous = None  # (R, s, s) bool: the previous prediction
    for index, (logits, targets, weight) in enumerate(
        zip(stage_logits, stage_targets, stage_weights)
    ):
        logits = logits[:, 0]
        if index <= start_stage:
            loss = F.binary_cross_entropy_with_logits(logits, targets)
            previous = logits.detach().sigmoid() >= 0.5
        else:
            size = logits.shape[-2:]
            region = _boundary_at(boundary_width, size, previous, stage_targets[index - 1])[:, 0]
            per_pixel = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
            loss = per_pixel[region].sum() / region.sum().clamp(min=1)
            if index + 1 < len(stage_logits):
                band = _boundary_at(1, size, previous)
                merged = torch.where(
                    band, stage_logits[index].detach(), _upsampled(stage_logits[index - 1], size)
                )
                previous = merged.detach()[:, 0].sigmoid() >= 0.5
        total = total + weight * loss
    return total


def stage_mask_targets(
    gt_masks: Union[BitMasks, PolygonMasks],
    boxes: Boxes,
    image_size: Tuple[int, int],
    sizes: Sequence[int],
) -> List[Tensor]:
    """
    The mask targets of RoIs at each stage's side, as the authors' ``get_targets``: the RoIs
    clipped to the image, then each matched ground-truth mask cropped to its RoI and resized
    (detectron2's ``crop_and_resize``: for ``BitMasks`` mmdet's aligned RoIAlign of the bitmap
    kept at >= 0.5; for ``PolygonMasks`` the polygons rasterised inside the RoI, where the
    authors' pipeline has bitmaps).

    Args:
        gt_masks: the matched ground truth of each RoI (already indexed), N masks.
        boxes: (N, 4) the RoIs, XYXY input pixels.
        image_size: (h, w) of the image the masks are in.
        sizes: the side of each stage's target.
    Returns:
        per stage (N, s, s) float32 0/1 targets.
    """
    boxes = boxes.clone()
    # mmdet clips the RoIs to the masks' extent before cropping
    boxes.clip(image_size)
    return [gt_masks.crop_and_resize(boxes.tensor, size).to(torch.float32) for size in sizes]


def _conv(in_channels: int, out_channels: int, kernel_size: int = 1, **kwargs) -> Conv2d:
    """A conv with bias, 'same' padding (at the given dilation)."""
    dilation = kwargs.get("dilation", 1)
    return Conv2d(
        in_channels, out_channels, kernel_size, padding=dilation * (kernel_size // 2), **kwargs
    )


def _msra_fill(*convs: nn.Conv2d) -> None:
    """mmdet's initialisation of these convs: Kaiming normal (fan-out), zero bias."""
    for conv in convs:
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)


class MultiBranchFusion(nn.Module):
    """
    The authors' ``MultiBranchFusionAvg``: the sum of 3x3 convs (+ ReLU) at several dilations
    and of the input's global average, merged by a 1x1 conv (no activation).
    """

    def __init__(self, *, channels: int, dilations: Sequence[int]):
        super().__init__()
        self.dilation_convs = nn.ModuleList(
            _conv(channels, channels, 3, dilation=d, activation=F.relu) for d in dilations
        )
        self.merge_conv = _conv(channels, channels, 1)
        _msra_fill(*self.dilation_convs, self.merge_conv)

    def forward(self, x: Tensor) -> Tensor:
        """x: (R, C, s, s) -> (R, C, s, s)."""
        # the authors: avg_pool2d with the width as kernel, the global average of square RoIs
        fused = x.mean(dim=(2, 3), keepdim=True)
        for conv in self.dilation_convs:
            fused = fused + conv(x)
        return self.merge_conv(fused)


class RefinementStage(nn.Module):
    """
    One stage of the authors' ``SimpleSFMStage`` (semantic fusion module): fuses the RoI
    features with the RoI's part of the semantic features and the stage's mask, halves the
    width and (but after the last stage) doubles the side.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        semantic_channels: int,
        out_channels: int,
        roi_size: int,
        semantic_stride: int,
        dilations: Sequence[int],
    ):
        """
        Args:
            in_channels: width c of the instance features (and of the pooled semantic ones).
            semantic_channels: width of the semantic branch's map.
            out_channels: width of the output (the fused features and the stage's mask).
            roi_size: side of the instance features, at which the semantic map is pooled.
            semantic_stride: stride of the semantic map.
            dilations: of the fusion's 3x3 convs.
        """
        super().__init__()
        self.semantic_transform_in = _conv(semantic_channels, in_channels, 1)
        self.semantic_pooler = ROIPooler(
            output_size=roi_size,
            scales=(1.0 / semantic_stride,),
            sampling_ratio=0,
            pooler_type="ROIAlignV2",
        )
        self.fuse_in = _conv(2 * in_channels + 1, in_channels, 1)
        self.fusion = MultiBranchFusion(channels=in_channels, dilations=dilations)
        self.fuse_out = _conv(in_channels, out_channels - 1, 1)
        _msra_fill(self.semantic_transform_in, self.fuse_in, self.fuse_out)

    def forward(
        self,
        instance_features: Tensor,
        mask_logits: Tensor,
        semantic_features: Tensor,
        boxes: List[Boxes],
        upsample: bool,
    ) -> Tuple[Tensor, Tensor]:
        """
        Args:
            instance_features: (R, c, s, s).
            mask_logits: (R, 1, s, s) the stage's mask.
            semantic_features: (B, C_sem, H', W') the semantic branch's map.
            boxes: per image the RoIs (R in all), XYXY input pixels.
            upsample: double the side of the output.
        Returns:
            the fused features (R, out_channels, s', s') (s' = 2s with ``upsample``) and the
            transformed semantic map (B, c, H', W').
        """
        semantic = F.relu(self.semantic_transform_in(semantic_features))
        roi_semantic = self.semantic_pooler([semantic], boxes)
        mask = mask_logits.sigmoid()
        fused = torch.cat([instance_features, roi_semantic, mask], dim=1)
        fused = F.relu(self.fusion(F.relu(self.fuse_in(fused))))
        fused = torch.cat([F.relu(self.fuse_out(fused)), mask], dim=1)
        if upsample:
            fused = F.interpolate(fused, scale_factor=2, mode="bilinear", align_corners=False)
        return fused, semantic


class RefineMaskHead(nn.Module):
    """
    The authors' ``SimpleRefineMaskHead`` (with ``pre_upsample_last_stage=False``, as all their
    configs): see the module docstring for the layout.

    Differences from the authors' code, none changing a result:

    * each stage's mask is computed from the RoI's class only (its row of the 1x1 conv), not
      for every class and then selected: a (R, K, 56, 56) tensor for LVIS's 1203 classes
      would not fit; the parameters are the same;
    * the zero loss of a batch without RoIs is the sum of the outputs times 0 (the authors add
      the hidden states too; the outputs already depend on every parameter).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        semantic_stride: int,
        conv_dim: int = 256,
        num_instance_convs: int = 1,
        num_semantic_convs: int = 2,
        conv_norm: str = "LN",
        dilations: Sequence[int] = (1, 3, 5),
        stage_sizes: Sequence[int] = (14, 28, 56, 112),
        class_agnostic_last_stage: bool = True,
        stage_loss_weights: Sequence[float] = (0.5, 0.75, 0.75, 1.0),
        boundary_width: int = 2,
        start_stage: int = 1,
        loss_weight: float = 1.0,
    ):
        """
        Args:
            in_channels: width of the RoI features and of the semantic input map.
            num_classes: K; each stage but (with ``class_agnostic_last_stage``) the last
                predicts one mask per class.
            semantic_stride: stride of the semantic input map (the finest level, 4).
            conv_dim: width of the instance and semantic convs (C); stage j works at C / 2^j.
            num_instance_convs, num_semantic_convs: 3x3 convs of the two branches.
            conv_norm: detectron2 norm after those convs ("LN": channels-first LayerNorm, eps
                1e-6, the authors' ``LN2d``).
            dilations: of each stage's fusion convs.
            stage_sizes: side of each stage's mask; the first is the RoI features' side, each
                next one twice the previous.
            class_agnostic_last_stage: one mask for all classes at the last stage (the authors'
                ``stage_num_classes=[K, K, K, 1]``).
            stage_loss_weights, boundary_width, start_stage: of
                :func:`boundary_aware_mask_loss`.
            loss_weight: multiplies that loss.
        """
        super().__init__()
        stage_sizes = list(stage_sizes)
        if len(stage_sizes) < 2 or any(b != 2 * a for a, b in zip(stage_sizes, stage_sizes[1:])):
            raise ValueError(f"stage_sizes must double from stage to stage, got {stage_sizes}")
        if len(stage_loss_weights) != len(stage_sizes):
            raise ValueError(
                f"{len(stage_sizes)} stages but {len(stage_loss_weights)} stage_loss_weights"
            )
        num_stages = len(stage_sizes) - 1
        if conv_dim % 2**num_stages != 0 or conv_dim // 2**num_stages < 2:
            raise ValueError(f"conv_dim={conv_dim} cannot be halved {num_stages} times")
        self.num_classes = num_classes
        self.stage_sizes = stage_sizes
        self.class_agnostic_last_stage = class_agnostic_last_stage
        self.stage_loss_weights = list(stage_loss_weights)
        self.boundary_width = boundary_width
        self.start_stage = start_stage
        self.loss_weight = loss_weight

        def branch(num_convs: int) -> nn.ModuleList:
            convs = nn.ModuleList(
                Conv2d(
                    in_channels if i == 0 else conv_dim,
                    conv_dim,
                    kernel_size=3,
                    padding=1,
                    bias=not conv_norm,
                    norm=get_norm(conv_norm, conv_dim),
                    activation=F.relu,
                )
                for i in range(num_convs)
            )
            _msra_fill(*convs)
            return convs

        self.instance_convs = branch(num_instance_convs)
        self.semantic_convs = branch(num_semantic_convs)
        stage_channels = [conv_dim // 2**j for j in range(num_stages + 1)]
        self.stages = nn.ModuleList(
            RefinementStage(
                in_channels=stage_channels[j],
                semantic_channels=conv_dim,
                out_channels=stage_channels[j + 1],
                roi_size=stage_sizes[j],
                semantic_stride=semantic_stride,
                dilations=dilations,
            )
            for j in range(num_stages)
        )
        stage_classes = [num_classes] * num_stages + [
            1 if class_agnostic_last_stage else num_classes
        ]
        self.stage_instance_logits = nn.ModuleList(
            nn.Conv2d(c, k, kernel_size=1) for c, k in zip(stage_channels, stage_classes)
        )
        _msra_fill(*self.stage_instance_logits)

    @staticmethod
    def _class_logits(conv: nn.Conv2d, features: Tensor, labels: Tensor) -> Tensor:
        """(R, 1, s, s): the 1x1 conv's output channel ``labels[r]`` for each RoI r."""
        weight = conv.weight[labels, :, 0, 0]  # (R, c)
        logits = torch.einsum("rchw,rc->rhw", features, weight) + conv.bias[labels, None, None]
        return logits[:, None]

    def forward(
        self,
        instance_features: Tensor,
        semantic_features: Tensor,
        boxes: List[Boxes],
        labels: Tensor,
    ) -> List[Tensor]:
        """
        Args:
            instance_features: (R, in_channels, s0, s0) the RoIs' pooled features, s0 the
                first stage size.
            semantic_features: (B, in_channels, H', W') the finest level of the batch.
            boxes: per image its RoIs (R in all, in the order of ``instance_features``), XYXY
                input pixels.
            labels: (R,) int64 the class of each RoI (its ground truth in training, the
                detection's at test time).
        Returns:
            per stage (R, 1, s, s) mask logits of the RoI's class, s = ``stage_sizes``.
        """
        x = instance_features
        for conv in self.instance_convs:
            x = conv(x)
        semantic = semantic_features
        for conv in self.semantic_convs:
            semantic = conv(semantic)
        stage_logits = []
        for index, stage in enumerate(self.stages):
            logits = self._class_logits(self.stage_instance_logits[index], x, labels)
            stage_logits.append(logits)
            x, _ = stage(x, logits, semantic, boxes, upsample=index + 1 < len(self.stages))
        last_labels = labels.clamp(max=0) if self.class_agnostic_last_stage else labels
        logits = self._class_logits(self.stage_instance_logits[-1], x, last_labels)
        stage_logits.append(
            F.interpolate(logits, scale_factor=2, mode="bilinear", align_corners=True)
        )
        return stage_logits

    def losses(self, stage_logits: List[Tensor], stage_targets: List[Tensor]) -> Tensor:
        """
        :func:`boundary_aware_mask_loss` times ``loss_weight``; 0 (connected to the logits)
        without RoIs.

        Args:
            stage_logits: as returned by :meth:`forward`.
            stage_targets: per stage (R, s, s) 0/1 float (:func:`stage_mask_targets`).
        """
        if stage_logits[0].shape[0] == 0:
            return sum(logits.sum() for logits in stage_logits) * 0.0
        loss = boundary_aware_mask_loss(
            stage_logits,
            stage_targets,
            stage_weights=self.stage_loss_weights,
            boundary_width=self.boundary_width,
            start_stage=self.start_stage,
        )
        return loss * self.loss_weight
