"""
CoDETR: a DETR query detector trained with collaborative hybrid assignments.

backbone -> neck -> query head (encoder, decoder); in training only, auxiliary one-to-many
heads on the encoder memory and, from their positives, extra decoder queries. Optionally
(Co-DINO-Inst) a mask branch on the query head's boxes.
"""

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import Backbone, detector_postprocess
from detectron2.structures import ImageList, Instances
from torch import Tensor, nn

from torchvision.ops import box_convert

from .neck import ChannelMapper
from .positive_queries import PositiveQueryBuilder
from .query_heads import QueryHeadBase
from .transformer import MultiLevelSequence

__all__ = ["CoDETR"]


class CoDETR(nn.Module):
    """
    detectron2 meta-architecture contract: ``forward(batched_inputs)`` returns a dict of
    losses in training and ``[{"instances": Instances}]`` at inference.

    Args:
        backbone: any detectron2 Backbone.
        neck: maps backbone levels to the query head's levels.
        query_head: the DETR head (encoder, two-stage selection, decoder, losses).
        aux_heads: builders of the one-to-many heads used in training (see
            ``aux_heads/base.py``), each called as ``build(input_shape=..., num_classes=...)``
            with the shapes of the encoder memory maps plus one downsampled level and the
            query head's class count (configs give them as ``LazyPartial``). A head has a
            ``kind`` ("one-stage" or "two-stage") and may produce test output via
            ``eval_module``. Empty: the base DETR detector.
        positive_queries: builder of the customized positive queries made from the auxiliary
            heads' assignments, called as ``build(num_heads=..., embed_dim=...,
            num_classes=...)``; None (or no auxiliary heads) switches them off.
        mask_branch: builder of the query head's mask branch (Co-DINO-Inst, see
            ``mask_heads/query_mask_branch.py``), called as ``build(input_shape=...,
            num_classes=..., num_proposals=...)`` with the encoder memory's levels, the query
            head's class count and its ``max_detections``. It trains on the last decoder
            layer's boxes, its losses weighted like the auxiliary heads' (lambda_2 x decoder
            layers, as the authors' configs), and gives the test output of ``eval_module``
            "detr" masks. None: no masks (the default).
        lambda_1: weight of the positive queries' losses (the paper's lambda_1).
        lambda_2: weight of the auxiliary heads' losses (the paper's lambda_2). As in the
            paper's sum over decoder layers, these losses are added once per decoder layer:
            their multiplier is ``lambda_2 * num_decoder_layers`` (2.0 x 6 = 12 for the
            authors' models), on top of each head's own loss weights.
        eval_module: which head produces test output: "detr", or "one-stage" /
            "two-stage", optionally with ":index" among the heads of that kind.
        pixel_mean, pixel_std: input normalisation, in the channel order of ``input_format``.
        input_format: channel order of the input images ("RGB" for the authors' weights).
        size_divisibility: batched images are padded to a multiple of this.
    """

    def __init__(
        self,
        *,
        backbone: Backbone,
        neck: ChannelMapper,
        query_head: QueryHeadBase,
        aux_heads: Sequence[Callable[..., nn.Module]] = (),
        positive_queries: Optional[Callable[..., PositiveQueryBuilder]] = None,
        mask_branch: Optional[Callable[..., nn.Module]] = None,
        lambda_1: float = 1.0,
        lambda_2: float = 2.0,
        eval_module: str = "detr",
        pixel_mean: Tuple[float, float, float] = (123.675, 116.28, 103.53),
        pixel_std: Tuple[float, float, float] = (58.395, 57.12, 57.375),
        input_format: str = "RGB",
        size_divisibility: int = 1,
    ):
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.query_head = query_head
        # the auxiliary heads see the encoder memory as the neck's maps plus one level
        # downsampled from the last, named as the neck names its levels
        levels = neck.output_shape()
        coarsest = list(levels.values())[-1]
        channels, stride = coarsest.channels, coarsest.stride * 2
        # the query head is built before the model: its size can only be checked here
        if tuple(query_head.level_embeds.shape) != (len(levels), channels):
            raise ValueError(
                f"The neck gives {len(levels)} levels of {channels} channels "
                f"({list(levels)}), the query head expects "
                f"{tuple(query_head.level_embeds.shape)} (levels, channels): give the "
                f"encoder and the decoder the neck's num_levels and embed_dim"
            )
        aux_input_shape = {
            **levels,
            f"p{int(math.log2(stride))}": ShapeSpec(channels=channels, stride=stride),
        }
        self.aux_feature_names = list(aux_input_shape)
        built = [
            type(b).__name__
            for b in [*aux_heads, positive_queries, mask_branch]
            if isinstance(b, nn.Module)
        ]
        if built:
            raise TypeError(
                f"CoDETR builds its auxiliary heads, positive queries and mask branch itself, "
                f"from the shapes it derives, but got built modules {built}: write them in a "
                f"config as LazyPartial(Class)(...) (codetr.engine.LazyPartial) instead of "
                f"L(Class)(...), without input_shape / num_heads / embed_dim / num_classes "
                f"(functools.partial in Python)"
            )
        num_classes = query_head.num_classes
        self.aux_heads = nn.ModuleList(
            build(input_shape=aux_input_shape, num_classes=num_classes) for build in aux_heads
        )
        self.positive_queries = (
            positive_queries(num_heads=len(aux_heads), embed_dim=channels, num_classes=num_classes)
            if positive_queries is not None and aux_heads
            else None
        )
        # the mask branch reads the encoder memory's levels (no downsampled one)
        self.level_names = list(levels)
        self.mask_branch = (
            mask_branch(
                input_shape=dict(levels),
                num_classes=num_classes,
                num_proposals=query_head.max_detections,
            )
            if mask_branch is not None
            else None
        )
        self.lambda_1 = lambda_1
        self.aux_loss_weight = lambda_2 * query_head.decoder.num_layers
        self.input_format = input_format
        self.size_divisibility = size_divisibility
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.eval_module = eval_module
        self.aux_extra_level = (
            nn.Sequential(
                nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1),
                nn.GroupNorm(32, channels),
            )
            if self.aux_heads
            else None
        )

    @property
    def eval_module(self) -> str:
        """Which head produces the test output; can be changed on a built model."""
        return self._eval_module

    @eval_module.setter
    def eval_module(self, value: str) -> None:
        self._eval_head_index = self._parse_eval_module(value)
        self._eval_module = value

    def _parse_eval_module(self, eval_module: str) -> Optional[int]:
        """None for "detr", else the index in ``aux_heads`` of the requested head."""
        if eval_module == "detr":
            return None
        kind, _, index = eval_module.partition(":")
        candidates = [i for i, h in enumerate(self.aux_heads) if getattr(h, "kind", None) == kind]
        position = int(index) if index.isdigit() else (0 if index == "" else -1)
        if kind not in ("one-stage", "two-stage") or not 0 <= position < len(candidates):
            raise ValueError(
                f"eval_module={eval_module!r}: expected 'detr', 'one-stage[:i]' or "
                f"'two-stage[:i]' (i >= 0) naming one of the auxiliary heads "
                f"{[getattr(h, 'kind', type(h).__name__) for h in self.aux_heads]}"
            )
        return candidates[position]

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    # ----------------------------------------------------------------------------- inputs
    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        images = [
            (x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs
        ]
        return ImageList.from_tensors(images, self.size_divisibility)

    def padding_mask(self, images: ImageList) -> Tensor:
        """(B, H, W) bool, True at the padding of the batched images."""
        batch, _, height, width = images.tensor.shape
        mask = torch.ones((batch, height, width), dtype=torch.bool, device=self.device)
        for i, (h, w) in enumerate(images.image_sizes):
            mask[i, :h, :w] = False
        return mask

    def box_normalizers(self, images: ImageList) -> Tensor:
        """
        (B, 4) per image (w, h, w, h): normalised boxes are relative to the unpadded input
        size. (LSJ pads images to the fixed square in the dataset mapper, so there the square
        is the input size, as in the reference's LSJ configs.)
        """
        return torch.tensor(
            [[w, h, w, h] for h, w in images.image_sizes], dtype=torch.float32, device=self.device
        )

    @staticmethod
    def normalized_targets(
        gt_instances: List[Instances], box_normalizers: Tensor
    ) -> List[Dict[str, Tensor]]:
        """
        Per image {"labels": (n,), "boxes": (n, 4) normalised cxcywh, "query_boxes": the same
        boxes converted to cxcywh before they are normalised, "box_normalizer": (4,) the
        image's (w, h, w, h)}. The authors' code takes the
        denoising queries' boxes in the second order and every loss target in the first; the
        two differ by rounding only, but that rounding decides the sign of the L1 / IoU
        gradients where a prediction equals its target (denoising without box noise).
        """
        return [
            {
                "labels": gt.gt_classes,
                "boxes": box_convert(gt.gt_boxes.tensor / normalizer, "xyxy", "cxcywh"),
                "query_boxes": box_convert(gt.gt_boxes.tensor, "xyxy", "cxcywh") / normalizer,
                "box_normalizer": normalizer,
            }
            for gt, normalizer in zip(gt_instances, box_normalizers)
        ]

    def encode(self, images: ImageList) -> MultiLevelSequence:
        """backbone -> neck -> the query head's encoder: the encoder memory of the batch."""
        levels = self.neck(self.backbone(images.tensor))
        return self.query_head.encode(list(levels.values()), self.padding_mask(images))

    def auxiliary_features(self, memory: MultiLevelSequence) -> Dict[str, Tensor]:
        """The encoder memory as per-level maps plus one downsampled level, named by stride
        (``p2`` ... ``p7`` for Co-DINO): the input of the auxiliary heads."""
        maps = memory.to_maps()
        maps.append(self.aux_extra_level(maps[-1]))
        return dict(zip(self.aux_feature_names, maps))

    def memory_maps(self, memory: MultiLevelSequence) -> Dict[str, Tensor]:
        """The encoder memory as per-level maps named as the neck's levels: the input of the
        mask branch."""
        return dict(zip(self.level_names, memory.to_maps()))

    # ----------------------------------------------------------------------------- forward
    def forward(self, batched_inputs: List[Dict]):
        """
        Args:
            batched_inputs: detectron2 dataset-mapper dicts with "image" (C, H, W) and, in
                training, "instances" (gt_boxes, gt_classes; with the mask branch gt_masks
                where there are objects); "height" / "width" at test.
        """
        if not self.training:
            return self.inference(batched_inputs)
        images = self.preprocess_image(batched_inputs)
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        box_normalizers = self.box_normalizers(images)
        targets = self.normalized_targets(gt_instances, box_normalizers)

        # 1-2. backbone -> neck -> encoder; denoising and matching queries through the decoder
        memory = self.encode(images)
        if self.mask_branch is None:
            losses = self.query_head.losses(memory, targets)
        else:
            losses, outputs = self.query_head.losses(memory, targets, return_outputs=True)
            # Co-DINO-Inst: masks for the last decoder layer's boxes that overlap an object
            mask_losses = self.mask_branch.losses(
                self.memory_maps(memory),
                outputs,
                box_normalizers,
                images.image_sizes,
                gt_instances,
            )
            losses.update({k: v * self.aux_loss_weight for k, v in mask_losses.items()})
        if not self.aux_heads:
            return losses

        # 3-5. one-to-many auxiliary heads on the encoder memory
        aux_features = self.auxiliary_features(memory)
        for index, head in enumerate(self.aux_heads):
            head_losses, assignments = head(aux_features, images, gt_instances)
            losses.update(
                {f"aux{index}.{k}": v * self.aux_loss_weight for k, v in head_losses.items()}
            )
            # 6. the head's positives as extra queries through the shared decoder
            if self.positive_queries is not None:
                queries = self.positive_queries(index, assignments, box_normalizers, aux_features)
                losses.update(
                    self.query_head.extra_query_losses(
                        memory,
                        queries,
                        weight=self.lambda_1,
                        suffix=f"_aux{index}",
                    )
                )
        return losses

    @torch.no_grad()
    def inference(self, batched_inputs: List[Dict], do_postprocess: bool = True):
        images = self.preprocess_image(batched_inputs)
        memory = self.encode(images)
        if self._eval_head_index is None:
            outputs = self.query_head.decode(memory)
            results = self.query_head.detections(
                outputs["logits"][-1],
                outputs["boxes"][-1],
                self.box_normalizers(images),
                images.image_sizes,
            )
            if self.mask_branch is not None:
                results = self.mask_branch.inference(self.memory_maps(memory), results)
        else:
            aux_features = self.auxiliary_features(memory)
            results = self.aux_heads[self._eval_head_index].inference(aux_features, images)
        if not do_postprocess:
            return results
        return [
            {
                "instances": detector_postprocess(
                    r, x.get("height", r.image_size[0]), x.get("width", r.image_size[1])
                )
            }
            for r, x in zip(results, batched_inputs)
        ]
