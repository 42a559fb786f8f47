"""
Conversion of the authors' Co-DETR checkpoints (mmdet 2.x ``{"meta", "state_dict"}``, see
spec §5) to our parameter names, checked against an instantiated model.

The target model's query head decides how the names are read (:func:`model_architecture`):
as a Co-DINO (``DINOHead``) or a Co-Deformable-DETR (``DeformableDETRHead``) checkpoint.
Authors' name -> ours (``T.`` = ``query_head.transformer.``, ``Q.`` = ``query_head.``), both:

- ``backbone.*`` in torchvision ResNet names -> detectron2 ResNet names (``resnet.py``); in
  Swin-V1 names -> detectron2 SwinTransformer names (``swin.py``); in the authors' EVA-02 ViT
  names -> :class:`~codetr.modeling.eva_vit.EVA02ViT` names (``eva02.py``), told apart by the
  names; the ViT's RoPE tables (``backbone.rope_win.*``, ``backbone.blocks.i.attn.rope.*``, ...)
  are dropped
- ``neck.{convs,extra_convs}.i.conv.weight`` / ``.gn.*`` -> ``neck.{...}.i.weight`` /
  ``.norm.*`` (ChannelMapper)
- ``neck.pL.j.weight`` -> ``neck.branches.pL.n.weight`` (the n-th conv of the authors' SFP
  branch ``pL``) and ``neck.pL.(j + 1).*`` -> ``neck.branches.pL.n.norm.*`` (its LayerNorm),
  with (j -> n) = p2 {1: 1, 5: 3, 8: 4, 11: 5}, p3 {1: 1, 4: 2, 7: 3}, p4 {0: 0, 3: 1},
  p5 {1: 1, 4: 2}, p6 {1: 1, 4: 2, 7: 3} (see :mod:`codetr.modeling.sfp`)
- ``T.level_embeds`` -> ``Q.level_embeds``
- ``T.encoder.layers.i.attentions.0.*`` -> ``Q.encoder.layers.i.self_attn.*``
- ``T.decoder.layers.i.attentions.0.attn.*`` -> ``Q.decoder.layers.i.self_attn.*``
- ``T.decoder.layers.i.attentions.1.*`` -> ``Q.decoder.layers.i.cross_attn.*``
- ``T.{encoder,decoder}.layers.i.ffns.0.layers.0.0.*`` / ``.layers.1.*`` ->
  ``Q.{...}.layers.i.ffn.linear1.*`` / ``.linear2.*``
- ``T.{encoder,decoder}.layers.i.norms.{0,1,2}.*`` -> ``Q.{...}.layers.i.norm{1,2,3}.*``
- ``T.{enc_output,enc_output_norm}.*`` -> ``Q.{same}.*``
- ``Q.cls_branches.k.*`` -> ``Q.class_heads.k.*``; ``Q.reg_branches.k.{0,2,4}.*`` ->
  ``Q.box_heads.k.{0,2,4}.*`` (k = num decoder layers: the encoder-proposal heads)

Co-DINO only:

- ``T.decoder.{ref_point_head,norm}.*`` -> ``Q.decoder.{ref_point_head,norm}.*``
- ``T.query_embed.*`` -> ``Q.query_embed.*``
- ``Q.label_embedding.weight`` -> ``Q.denoising.label_embedding.weight``

Co-Deformable-DETR only:

- ``T.{pos_trans,pos_trans_norm}.*`` -> ``Q.{pos_trans,pos_trans_norm}.*``
- ``Q.query_embedding.*`` -> ``Q.query_embed.*``

Auxiliary parts (converted only with ``keep_aux``):

- ``Q.downsample.{0,1}.*`` -> ``aux_extra_level.{0,1}.*``
- ``T.aux_pos_trans.k.*`` / ``T.aux_pos_trans_norm.k.*`` -> ``positive_queries.projections.k'.*``
  / ``positive_queries.norms.k'.*`` (2C -> C in Co-DINO, 2C -> 2C in Co-Deformable-DETR)
- Co-Deformable-DETR: ``T.pos_feats_trans.k.*`` / ``T.pos_feats_norm.k.*`` ->
  ``positive_queries.feature_projections.k'.*`` / ``positive_queries.feature_norms.k'.*``;
  ``T.head_pos_embed.weight`` (num_heads, 1) -> ``positive_queries.head_pos_embed``, row k
  moved to row k'
- ``rpn_head.{rpn_conv,rpn_cls,rpn_reg}.*`` ->
  ``aux_heads.r.rpn.rpn_head.{conv,objectness_logits,anchor_deltas}.*``
- ``roi_head.j.bbox_head.{shared_fcs.0,shared_fcs.1,fc_cls,fc_reg}.*`` ->
  ``aux_heads.r.roi_heads.{box_head.fc1,box_head.fc2,box_predictor.cls_score,
  box_predictor.bbox_pred}.*``
- ``roi_head.j.bbox_head.shared_convs.i.conv.weight`` / ``.gn.*`` (ConvFCBBoxHead, ViT-L) ->
  ``aux_heads.r.roi_heads.box_head.conv{i + 1}.weight`` / ``.norm.*``
- ``roi_head.j.mask_head.{convs.i.conv,upsample,conv_logits}.*`` (FCNMaskHead) ->
  ``aux_heads.r.roi_heads.mask_head.{mask_fcn{i + 1},deconv,predictor}.*``
- ``bbox_head.j.{cls_convs,reg_convs}.i.conv.weight`` / ``.gn.*`` ->
  ``aux_heads.a.{cls_tower,bbox_tower}.i.weight`` / ``.norm.*``
- ``bbox_head.j.{atss_cls,atss_reg,atss_centerness,scales.l}.*`` ->
  ``aux_heads.a.{cls_score,bbox_pred,centerness,scales.l}.*``

Co-DINO-Inst's mask branch (the top-level ``mask_head`` / ``mask_iou_head`` of the authors'
``CoDETR``; ``M.`` = ``mask_branch.mask_head.``, ``I.`` = ``mask_branch.mask_iou_head.``; their
``mask_roi_extractor`` has no parameters; see :mod:`codetr.modeling.mask_heads`):

- ``mask_head.{instance,semantic}_convs.i.conv.weight`` / ``.norm_layer.*`` ->
  ``M.{instance,semantic}_convs.i.weight`` / ``.norm.*``
- ``mask_head.stages.j.{semantic_transform_in,fuse_conv.0,fuse_transform_out}.*`` ->
  ``M.stages.j.{semantic_transform_in,fuse_in,fuse_out}.*``
- ``mask_head.stages.j.fuse_conv.1.dilation_conv_d.conv.*`` / ``.merge_conv.conv.*`` ->
  ``M.stages.j.fusion.dilation_convs.{d - 1}.*`` / ``.merge_conv.*``
- ``mask_head.stage_instance_logits.j.*`` -> ``M.stage_instance_logits.j.*``
- ``mask_iou_head.convs.i.conv.weight`` / ``.norm_layer.*`` -> ``I.convs.i.weight`` /
  ``.norm.*``; ``mask_iou_head.{fcs.i,fc_mask_iou}.*`` -> ``I.{same}.*``

A model without the mask branch (``mask_branch=None``), or without its MaskIoU head, reports
these keys as unused.

``roi_head.j`` is our j-th "two-stage" auxiliary head ``r`` (``rpn_head`` goes to the first),
``bbox_head.j`` our j-th "one-stage" head ``a``. The authors number the positive-query branches
RoI heads first, then dense heads; ``k'`` is the position of that head in our ``aux_heads``.
mmdet orders the anchors of a location ratio-major: where ours are in another order (detectron2's
``DefaultAnchorGenerator`` is size-major), the output channels of ``rpn_cls`` and the 4-channel
groups of ``rpn_reg`` are permuted accordingly.

Dropped, always: the EMA copies ``ema_*`` of the ViT-L checkpoints (their weights are the EMA
already), the ViT's RoPE tables, and the federated loss's class weights
``*.loss_cls.fed_loss_weight`` (LVIS), with a note in the report: ours are no model state but
the loss's ``fed_loss_class_weights``, from the dataset metadata. BatchNorm
``num_batches_tracked`` counters are dropped when the model has none (FrozenBN). Backbones
other than ResNet, Swin and EVA-02 are not covered: their names are reported as unused, as are
the names of the other architecture (a Co-DINO checkpoint read for a Co-Deformable-DETR model,
or the reverse; :func:`official_architecture` tells from a state dict which it is).
"""
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from codetr.modeling.query_heads import DeformableDETRHead, DINOHead

from .inference import is_training_only
from .eva02 import eva02_key, is_eva02_fixed_buffer
from .resnet import torchvision_resnet_key
from .swin import swin_key

__all__ = [
    "ARCHITECTURES",
    "ConversionReport",
    "load_official_checkpoint",
    "official_key_to_ours",
    "model_architecture",
    "official_architecture",
    "is_auxiliary_key",
    "convert_official_state_dict",
]

# authors' names that belong to the auxiliary heads and the positive-query branch
_AUX_SOURCE = re.compile(
    r"(rpn_head|roi_head|bbox_head)\.|query_head\.downsample\."
    r"|query_head\.transformer\.(aux_pos_trans|aux_pos_trans_norm|pos_feats_trans"
    r"|pos_feats_norm|head_pos_embed)\."
)
# exponential-moving-average copies of some checkpoints (ViT-L): not model weights
_EMA_SOURCE = re.compile(r"ema_")
# the federated loss's class weights (LVIS checkpoints): not model state here
_FED_LOSS_WEIGHT = re.compile(r"(\w+\.)*loss_cls\.fed_loss_weight")
_FED_LOSS_NOTE = (
    "dropped {key}: the federated loss's class weights are no model state here; they come "
    "from the dataset metadata (DetectionLoss(fed_loss_class_weights=...))"
)
# the authors' SFP neck: per branch, index of a conv in their Sequential -> index in ours
_SFP_CONVS = {
    "p2": {1: 1, 5: 3, 8: 4, 11: 5},
    "p3": {1: 1, 4: 2, 7: 3},
    "p4": {0: 0, 3: 1},
    "p5": {1: 1, 4: 2},
    "p6": {1: 1, 4: 2, 7: 3},
}
_SFP = re.compile(r"neck\.(?P<level>p[2-6])\.(?P<j>\d+)\.(?P<param>weight|bias)")
_COUNTER = ".num_batches_tracked"

_T = r"query_head\.transformer\."
_LAYER = _T + r"(?P<stack>encoder|decoder)\.layers\.(?P<i>\d+)\."
_PARAM = r"(?P<param>\w+)"
_NECK = r"neck\.(?P<kind>convs|extra_convs)\.(?P<i>\d+)\."
_MASK = r"mask_head\."
_STAGE = _MASK + r"stages\.(?P<j>\d+)\."
_MASK_IOU = r"mask_iou_head\."

# (authors' name pattern, our name template); templates are filled with the named groups, with
# ``norm`` = the authors' norm index + 1, ``fc1`` = the authors' FC index + 1, ``conv1`` =
# the authors' conv index + 1 and ``dilation0`` = the authors' (1-based) dilation conv - 1
_SHARED_RULES: List[Tuple[str, str]] = [
    (_NECK + r"conv\.weight", "neck.{kind}.{i}.weight"),
    (_NECK + r"gn\." + _PARAM, "neck.{kind}.{i}.norm.{param}"),
    (_T + r"level_embeds", "query_head.level_embeds"),
    (_T + r"encoder\.layers\.(?P<i>\d+)\.attentions\.0\.(?P<rest>[\w.]+)",
     "query_head.encoder.layers.{i}.self_attn.{rest}"),
    (_T + r"decoder\.layers\.(?P<i>\d+)\.attentions\.0\.attn\.(?P<rest>[\w.]+)",
     "query_head.decoder.layers.{i}.self_attn.{rest}"),
    (_T + r"decoder\.layers\.(?P<i>\d+)\.attentions\.1\.(?P<rest>[\w.]+)",
     "query_head.decoder.layers.{i}.cross_attn.{rest}"),
    (_LAYER + r"ffns\.0\.layers\.0\.0\." + _PARAM,
     "query_head.{stack}.layers.{i}.ffn.linear1.{param}"),
    (_LAYER + r"ffns\.0\.layers\.1\." + _PARAM,
     "query_head.{stack}.layers.{i}.ffn.linear2.{param}"),
    (_LAYER + r"norms\.(?P<n>\d)\." + _PARAM,
     "query_head.{stack}.layers.{i}.norm{norm}.{param}"),
    (_T + r"(?P<part>enc_output|enc_output_norm)\." + _PARAM, "query_head.{part}.{param}"),
    (r"query_head\.cls_branches\.(?P<k>\d+)\." + _PARAM, "query_head.class_heads.{k}.{param}"),
    (r"query_head\.reg_branches\.(?P<k>\d+)\.(?P<j>\d+)\." + _PARAM,
     "query_head.box_heads.{k}.{j}.{param}"),
    # auxiliary parts; {rcnn}, {atss} and {pos} are our indices of the authors' heads
    (r"query_head\.downsample\.(?P<j>\d+)\." + _PARAM, "aux_extra_level.{j}.{param}"),
    (_T + r"aux_pos_trans\.(?P<pos>\d+)\." + _PARAM,
     "positive_queries.projections.{pos}.{param}"),
    (_T + r"aux_pos_trans_norm\.(?P<pos>\d+)\." + _PARAM,
     "positive_queries.norms.{pos}.{param}"),
    (r"rpn_head\.rpn_conv\." + _PARAM, "aux_heads.{rpn}.rpn.rpn_head.conv.{param}"),
    (r"rpn_head\.rpn_cls\." + _PARAM, "aux_heads.{rpn}.rpn.rpn_head.objectness_logits.{param}"),
    (r"rpn_head\.rpn_reg\." + _PARAM, "aux_heads.{rpn}.rpn.rpn_head.anchor_deltas.{param}"),
    (r"roi_head\.(?P<rcnn>\d+)\.bbox_head\.shared_fcs\.(?P<fc>\d+)\." + _PARAM,
     "aux_heads.{rcnn}.roi_heads.box_head.fc{fc1}.{param}"),
    (r"roi_head\.(?P<rcnn>\d+)\.bbox_head\.shared_convs\.(?P<conv>\d+)\.conv\.weight",
     "aux_heads.{rcnn}.roi_heads.box_head.conv{conv1}.weight"),
    (r"roi_head\.(?P<rcnn>\d+)\.bbox_head\.shared_convs\.(?P<conv>\d+)\.gn\." + _PARAM,
     "aux_heads.{rcnn}.roi_heads.box_head.conv{conv1}.norm.{param}"),
    (r"roi_head\.(?P<rcnn>\d+)\.bbox_head\.fc_cls\." + _PARAM,
     "aux_heads.{rcnn}.roi_heads.box_predictor.cls_score.{param}"),
    (r"roi_head\.(?P<rcnn>\d+)\.bbox_head\.fc_reg\." + _PARAM,
     "aux_heads.{rcnn}.roi_heads.box_predictor.bbox_pred.{param}"),
    (r"roi_head\.(?P<rcnn>\d+)\.mask_head\.convs\.(?P<conv>\d+)\.conv\." + _PARAM,
     "aux_heads.{rcnn}.roi_heads.mask_head.mask_fcn{conv1}.{param}"),
    (r"roi_head\.(?P<rcnn>\d+)\.mask_head\.upsample\." + _PARAM,
     "aux_heads.{rcnn}.roi_heads.mask_head.deconv.{param}"),
    (r"roi_head\.(?P<rcnn>\d+)\.mask_head\.conv_logits\." + _PARAM,
     "aux_heads.{rcnn}.roi_heads.mask_head.predictor.{param}"),
    # Co-DINO-Inst's mask branch
    (_MASK + r"(?P<branch>instance|semantic)_convs\.(?P<i>\d+)\.conv\.weight",
     "mask_branch.mask_head.{branch}_convs.{i}.weight"),
    (_MASK + r"(?P<branch>instance|semantic)_convs\.(?P<i>\d+)\.norm_layer\." + _PARAM,
     "mask_branch.mask_head.{branch}_convs.{i}.norm.{param}"),
    (_STAGE + r"semantic_transform_in\." + _PARAM,
     "mask_branch.mask_head.stages.{j}.semantic_transform_in.{param}"),
    (_STAGE + r"fuse_conv\.0\." + _PARAM, "mask_branch.mask_head.stages.{j}.fuse_in.{param}"),
    (_STAGE + r"fuse_conv\.1\.dilation_conv_(?P<dilation>\d+)\.conv\." + _PARAM,
     "mask_branch.mask_head.stages.{j}.fusion.dilation_convs.{dilation0}.{param}"),
    (_STAGE + r"fuse_conv\.1\.merge_conv\.conv\." + _PARAM,
     "mask_branch.mask_head.stages.{j}.fusion.merge_conv.{param}"),
    (_STAGE + r"fuse_transform_out\." + _PARAM,
     "mask_branch.mask_head.stages.{j}.fuse_out.{param}"),
    (_MASK + r"stage_instance_logits\.(?P<j>\d+)\." + _PARAM,
     "mask_branch.mask_head.stage_instance_logits.{j}.{param}"),
    (_MASK_IOU + r"convs\.(?P<i>\d+)\.conv\.weight", "mask_branch.mask_iou_head.convs.{i}.weight"),
    (_MASK_IOU + r"convs\.(?P<i>\d+)\.norm_layer\." + _PARAM,
     "mask_branch.mask_iou_head.convs.{i}.norm.{param}"),
    (_MASK_IOU + r"(?P<part>fcs\.\d+|fc_mask_iou)\." + _PARAM,
     "mask_branch.mask_iou_head.{part}.{param}"),
    (r"bbox_head\.(?P<atss>\d+)\.cls_convs\.(?P<i>\d+)\.conv\.weight",
     "aux_heads.{atss}.cls_tower.{i}.weight"),
    (r"bbox_head\.(?P<atss>\d+)\.cls_convs\.(?P<i>\d+)\.gn\." + _PARAM,
     "aux_heads.{atss}.cls_tower.{i}.norm.{param}"),
    (r"bbox_head\.(?P<atss>\d+)\.reg_convs\.(?P<i>\d+)\.conv\.weight",
     "aux_heads.{atss}.bbox_tower.{i}.weight"),
    (r"bbox_head\.(?P<atss>\d+)\.reg_convs\.(?P<i>\d+)\.gn\." + _PARAM,
     "aux_heads.{atss}.bbox_tower.{i}.norm.{param}"),
    (r"bbox_head\.(?P<atss>\d+)\.atss_cls\." + _PARAM, "aux_heads.{atss}.cls_score.{param}"),
    (r"bbox_head\.(?P<atss>\d+)\.atss_reg\." + _PARAM, "aux_heads.{atss}.bbox_pred.{param}"),
    (r"bbox_head\.(?P<atss>\d+)\.atss_centerness\." + _PARAM,
     "aux_heads.{atss}.centerness.{param}"),
    (r"bbox_head\.(?P<atss>\d+)\.scales\.(?P<level>\d+)\.scale",
     "aux_heads.{atss}.scales.{level}.scale"),
]
# the parts only one of the query heads has
_ARCHITECTURE_RULES: Dict[str, List[Tuple[str, str]]] = {
    "co_dino": [
        (_T + r"decoder\.(?P<part>ref_point_head\.\d+|norm)\." + _PARAM,
         "query_head.decoder.{part}.{param}"),
        (_T + r"query_embed\." + _PARAM, "query_head.query_embed.{param}"),
        (r"query_head\.label_embedding\.weight", "query_head.denoising.label_embedding.weight"),
    ],
    "co_deformable_detr": [
        (_T + r"(?P<part>pos_trans|pos_trans_norm)\." + _PARAM, "query_head.{part}.{param}"),
        (r"query_head\.query_embedding\." + _PARAM, "query_head.query_embed.{param}"),
        # auxiliary parts
        (_T + r"pos_feats_trans\.(?P<pos>\d+)\." + _PARAM,
         "positive_queries.feature_projections.{pos}.{param}"),
        (_T + r"pos_feats_norm\.(?P<pos>\d+)\." + _PARAM,
         "positive_queries.feature_norms.{pos}.{param}"),
        (_T + r"head_pos_embed\.weight", "positive_queries.head_pos_embed"),
    ],
}
ARCHITECTURES = tuple(_ARCHITECTURE_RULES)
# a parameter prefix only the authors' checkpoints of that architecture have
_ARCHITECTURE_MARKERS = {
    "co_dino": "query_head.label_embedding.",
    "co_deformable_detr": "query_head.transformer.pos_trans.",
}
_COMPILED_RULES = {
    name: [(re.compile(pattern), template) for pattern, template in _SHARED_RULES + rules]
    for name, rules in _ARCHITECTURE_RULES.items()
}


@dataclass
class ConversionReport:
    """
    What a conversion could not do. It succeeded when ``unused``, ``missing`` and
    ``shape_mismatches`` are all empty.

    Attributes:
        unused: authors' keys that filled no parameter of the model (no rule maps them, or the
            model has no parameter of that name).
        missing: model keys that no authors' key filled.
        shape_mismatches: (authors' key, our key, authors' shape, our shape); not converted.
        dropped: authors' keys left out on purpose (auxiliary parts without ``keep_aux``,
            EMA copies, RoPE tables, the federated loss's class weights).
        notes: why some of the ``dropped`` keys were dropped, for the reader.
    """

    unused: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    shape_mismatches: List[Tuple[str, str, Tuple[int, ...], Tuple[int, ...]]] = field(
        default_factory=list
    )
    dropped: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.unused or self.missing or self.shape_mismatches)

    def summary(self) -> str:
        """A human-readable listing of every problem (and the count of dropped keys)."""
        lines = [f"{len(self.dropped)} auxiliary / EMA / fixed-table keys dropped on purpose."]
        lines += [f"  note: {note}" for note in self.notes]
        if self.unused:
            lines.append(f"{len(self.unused)} keys of the checkpoint were not used:")
            lines += [f"  {k}" for k in self.unused]
        if self.missing:
            lines.append(f"{len(self.missing)} keys of the model were not filled:")
            lines += [f"  {k}" for k in self.missing]
        if self.shape_mismatches:
            lines.append(f"{len(self.shape_mismatches)} shape mismatches (checkpoint -> model):")
            lines += [
                f"  {src} {tuple(src_shape)} -> {dst} {tuple(dst_shape)}"
                for src, dst, src_shape, dst_shape in self.shape_mismatches
            ]
        return "\n".join(lines)


def load_official_checkpoint(path: str) -> Dict[str, Tensor]:
    """
    Reads the ``state_dict`` of an authors' checkpoint file (tensors only are unpickled).

    Raises:
        ValueError: naming the file, when it cannot be read, holds no state dict, or is
            already in detectron2's ``{"model": ...}`` layout.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(
            f"Cannot read checkpoint {path!r} as a PyTorch file of tensors (corrupted, "
            f"truncated, or not a checkpoint): {type(e).__name__}: {e}"
        ) from e
    if not isinstance(checkpoint, dict):
        raise ValueError(
            f"Checkpoint {path!r} holds a {type(checkpoint).__name__}, expected the authors' "
            f"dict {{'meta', 'state_dict'}}"
        )
    if "state_dict" in checkpoint:
        state_dict = checkpoint["state_dict"]
    elif "model" in checkpoint:
        raise ValueError(
            f"Checkpoint {path!r} has a 'model' entry: it looks like a detectron2 checkpoint "
            f"already, not one in the authors' layout {{'meta', 'state_dict'}}"
        )
    else:
        state_dict = checkpoint
    if not isinstance(state_dict, dict) or not all(
        isinstance(v, Tensor) for v in state_dict.values()
    ):
        raise ValueError(
            f"Checkpoint {path!r}: its state dict is not a mapping of names to tensors"
        )
    return state_dict


def is_auxiliary_key(key: str) -> bool:
    """Whether an authors' key belongs to the auxiliary heads or the positive-query branch."""
    return _AUX_SOURCE.match(key) is not None


def _auxiliary_indices(aux_head_kinds: Sequence[str]) -> Dict[str, Dict[int, int]]:
    """For each authors' index family, authors' index -> our index in ``aux_heads``."""
    two_stage = [i for i, kind in enumerate(aux_head_kinds) if kind == "two-stage"]
    one_stage = [i for i, kind in enumerate(aux_head_kinds) if kind == "one-stage"]
    return {
        "rcnn": dict(enumerate(two_stage)),
        "rpn": dict(enumerate(two_stage[:1])),
        "atss": dict(enumerate(one_stage)),
        "pos": dict(enumerate(two_stage + one_stage)),
    }


def model_architecture(model: nn.Module) -> str:
    """
    Which authors' model ``model`` takes the weights of, from its query head: "co_dino"
    (:class:`DINOHead`) or "co_deformable_detr" (:class:`DeformableDETRHead`).

    Raises:
        ValueError: naming the query head, when it is neither.
    """
    query_head = getattr(model, "query_head", None)
    if isinstance(query_head, DINOHead):
        return "co_dino"
    if isinstance(query_head, DeformableDETRHead):
        return "co_deformable_detr"
    raise ValueError(
        f"Cannot convert the authors' weights for a model whose query_head is "
        f"{type(query_head).__name__}: expected a DINOHead (Co-DINO) or a DeformableDETRHead "
        f"(Co-Deformable-DETR)"
    )


def official_architecture(state_dict: Dict[str, Tensor]) -> Optional[str]:
    """The authors' model an authors' state dict belongs to (one of :data:`ARCHITECTURES`), or
    None when it has none of their distinctive parameters."""
    for architecture, prefix in _ARCHITECTURE_MARKERS.items():
        if any(key.startswith(prefix) for key in state_dict):
            return architecture
    return None


def official_key_to_ours(
    key: str, aux_head_kinds: Sequence[str] = (), architecture: str = "co_dino"
) -> Optional[str]:
    """
    Our name of one authors' parameter, or None when no rule covers it.

    Args:
        key: the authors' name, e.g. ``query_head.transformer.decoder.layers.0.norms.1.bias``.
        aux_head_kinds: the ``kind`` of each of our ``aux_heads`` in order ("two-stage" for
            the RPN + RoI head, "one-stage" for ATSS); auxiliary keys whose head does not
            exist there map to None.
        architecture: the authors' model the key comes from, one of :data:`ARCHITECTURES`
            ("co_dino", "co_deformable_detr"); the names of the other one map to None.
    """
    if architecture not in _COMPILED_RULES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
    if key.startswith("backbone."):
        name = key[len("backbone."):]
        # ResNet, Swin and EVA-02 names are disjoint (but for Swin's and EVA-02's same
        # ``patch_embed.proj.*``)
        name = swin_key(name) or torchvision_resnet_key(name) or eva02_key(name)
        return None if name is None else "backbone." + name
    sfp = _SFP.fullmatch(key)
    if sfp is not None:
        return _sfp_key(sfp["level"], int(sfp["j"]), sfp["param"])
    indices = _auxiliary_indices(aux_head_kinds)
    for pattern, template in _COMPILED_RULES[architecture]:
        match = pattern.fullmatch(key)
        if match is None:
            continue
        values = match.groupdict()
        if "n" in values:
            values["norm"] = int(values["n"]) + 1
        if "fc" in values:
            values["fc1"] = int(values["fc"]) + 1
        if "conv" in values:
            values["conv1"] = int(values["conv"]) + 1
        if "dilation" in values:
            values["dilation0"] = int(values["dilation"]) - 1
        if "{rpn}" in template:  # the authors' single RPN belongs to our first RoI head
            values["rpn"] = "0"
        for family in ("rcnn", "rpn", "atss", "pos"):
            if family in values:
                ours = indices[family].get(int(values[family]))
                if ours is None:
                    return None
                values[family] = ours
        return template.format(**values)
    return None


def _sfp_key(level: str, index: int, param: str) -> Optional[str]:
    """Our name of the parameter ``param`` of module ``index`` of the authors' SFP branch."""
    convs = _SFP_CONVS[level]
    if index in convs and param == "weight":
        return f"neck.branches.{level}.{convs[index]}.weight"
    if index - 1 in convs:  # the LayerNorm after a conv
        return f"neck.branches.{level}.{convs[index - 1]}.norm.{param}"
    return None


def _is_dropped(key: str, keep_aux: bool) -> bool:
    """Whether an authors' key is left out on purpose (auxiliary parts without ``keep_aux``,
    EMA copies, RoPE tables, the federated loss's class weights)."""
    return (
        _EMA_SOURCE.match(key) is not None
        or _FED_LOSS_WEIGHT.fullmatch(key) is not None
        or (key.startswith("backbone.") and is_eva02_fixed_buffer(key[len("backbone."):]))
        or (not keep_aux and is_auxiliary_key(key))
    )


def _rpn_anchor_permutation(cell_anchors: Tensor) -> Tensor:
    """
    Index into the authors' anchors of a location for each of our anchors.

    mmdet enumerates a location's anchors ratio-major (``r * num_sizes + s``); the ratio and
    size of each of our anchors are read off ``cell_anchors`` (A, 4), numbered in order of first
    appearance, so any order of ours maps (the identity for :class:`RatioMajorAnchorGenerator`).
    """
    widths = cell_anchors[:, 2] - cell_anchors[:, 0]
    heights = cell_anchors[:, 3] - cell_anchors[:, 1]
    ratios = torch.round(heights / widths, decimals=4).tolist()
    sizes = torch.round(torch.sqrt(widths * heights), decimals=2).tolist()
    ratio_ids = {r: i for i, r in enumerate(dict.fromkeys(ratios))}
    size_ids = {s: i for i, s in enumerate(dict.fromkeys(sizes))}
    return torch.tensor(
        [ratio_ids[r] * len(size_ids) + size_ids[s] for r, s in zip(ratios, sizes)]
    )


def _value_transforms(model: nn.Module) -> Dict[str, Callable[[Tensor], Tensor]]:
    """Per target key, a function applied to the authors' tensor (RPN anchor order, order of
    the per-head position embeddings)."""
    transforms = {}
    positive_queries = getattr(model, "positive_queries", None)
    if isinstance(getattr(positive_queries, "head_pos_embed", None), Tensor):
        kinds = [getattr(head, "kind", None) for head in model.aux_heads]
        # row k of the authors' embedding is our row ours[k]
        ours = list(_auxiliary_indices(kinds)["pos"].values())
        if sorted(ours) == list(range(len(kinds))):
            order = torch.tensor(ours).argsort()
            transforms["positive_queries.head_pos_embed"] = lambda t, o=order: t[o]
    for index, head in enumerate(getattr(model, "aux_heads", [])):
        rpn = getattr(head, "rpn", None)
        if rpn is None:
            continue
        cell_anchors = next(iter(rpn.anchor_generator.cell_anchors))
        order = _rpn_anchor_permutation(cell_anchors.cpu())
        prefix = f"aux_heads.{index}.rpn.rpn_head."
        for param in ("weight", "bias"):
            transforms[f"{prefix}objectness_logits.{param}"] = lambda t, o=order: t[o]
            transforms[f"{prefix}anchor_deltas.{param}"] = lambda t, o=order: (
                t.reshape(len(o), 4, *t.shape[1:])[o].reshape(t.shape)
            )
    return transforms


def convert_official_state_dict(
    state_dict: Dict[str, Tensor], model: nn.Module, *, keep_aux: bool = False
) -> Tuple[Dict[str, Tensor], ConversionReport]:
    """
    Renames an authors' state dict for ``model`` and checks it against the model's own.

    Args:
        state_dict: the authors' parameters (the ``state_dict`` entry of their checkpoint).
        model: an instance of the target model (its state dict gives the expected keys and
            shapes, its ``aux_heads`` the auxiliary-head layout, its query head which
            authors' model the names are read as: :func:`model_architecture`).
        keep_aux: convert the auxiliary heads, the extra downsampled level and the positive
            query projections as well; otherwise they are dropped and the model's own
            auxiliary parameters are not expected.
    Returns:
        the converted state dict (only keys the model has, with matching shapes) and the
        report of what did not convert.
    """
    target = model.state_dict()
    architecture = model_architecture(model)
    kinds = [getattr(head, "kind", type(head).__name__) for head in getattr(model, "aux_heads", [])]
    transforms = _value_transforms(model)
    report = ConversionReport()
    converted: Dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if _is_dropped(key, keep_aux):
            report.dropped.append(key)
            if _FED_LOSS_WEIGHT.fullmatch(key):
                report.notes.append(_FED_LOSS_NOTE.format(key=key))
            continue
        new_key = official_key_to_ours(key, kinds, architecture)
        if new_key is None or new_key not in target:
            if not key.endswith(_COUNTER):
                report.unused.append(key)
            continue
        if value.shape != target[new_key].shape:
            report.shape_mismatches.append(
                (key, new_key, tuple(value.shape), tuple(target[new_key].shape))
            )
            continue
        if new_key in transforms:  # shape-preserving reorderings
            value = transforms[new_key](value)
        converted[new_key] = value.contiguous()
    mismatched = {dst for _, dst, _, _ in report.shape_mismatches}
    report.missing = [
        key
        for key in target
        if key not in converted
        and key not in mismatched
        and not key.endswith(_COUNTER)
        and (keep_aux or not is_training_only(key))
    ]
    return converted, report
