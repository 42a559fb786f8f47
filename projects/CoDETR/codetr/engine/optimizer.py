"""
Optimizer helpers of the Co-DETR training recipe.

- :func:`lr_factor` gives the per-parameter learning-rate multiplier, for detectron2's
  ``get_default_optimizer_params(lr_factor_func=...)``; with ``layer_decay`` it includes the
  layer-wise decay of a ViT backbone (layer ids from :func:`vit_layer_id`).
- :func:`layer_decay_optimizer_params` builds the parameter groups with the weight-decay
  exemptions of the authors' ``LayerDecayOptimizerConstructor`` (their ViT recipe).
- :func:`add_gradient_clipping` makes ``optimizer.step()`` clip the global gradient norm first.
"""

import functools
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from detectron2.solver.build import (
    _generate_optimizer_class_with_gradient_clipping,
    reduce_param_groups,
)

__all__ = ["lr_factor", "vit_layer_id", "layer_decay_optimizer_params", "add_gradient_clipping"]

# Parameter-name keys of the deformable attention's linear projections that the
# Co-Deformable-DETR recipe trains with a smaller learning rate. (The authors' recipe also
# names "reference_points", a layer only their one-stage Deformable DETR has: none of ours.)
_LINEAR_PROJECTION_KEYS: Tuple[str, ...] = ("sampling_offsets",)
# Name suffix of the classes made by ``_generate_optimizer_class_with_gradient_clipping``.
_CLIPPING_SUFFIX = "WithGradientClip"
# Names (last component) of the ViT parameters in layer 0, besides those of its patch embedding.
_VIT_EMBEDDING_PARAMETERS: Tuple[str, ...] = ("pos_embed", "cls_token", "mask_token")
# Substrings of the names of the relative position tables that get no weight decay.
_RELATIVE_POSITION_KEYS: Tuple[str, ...] = ("relative_position_bias_table", "rel_pos")


# not detectron2's get_vit_lr_decay_rate: it puts cls_token / mask_token and blocks.i.residual.*
# at num_layers + 1, the authors' rule at 0 and i + 1, and it cannot compose with lr_factor
def vit_layer_id(name: str, *, num_layers: int) -> int:
    """
    Layer id of one parameter for the layer-wise learning-rate decay of a ViT backbone, as the
    authors' ``get_layer_id_for_vit``: 0 for the embeddings (``pos_embed``, ``cls_token``,
    ``mask_token``, ``patch_embed.*``), i + 1 for ``blocks.<i>.*``, ``num_layers + 1`` for every
    other parameter (the rest of the backbone, the neck and the heads). The authors match names
    that start with ``"backbone.pos_embed"`` etc.; here the ViT may sit deeper in the backbone
    (``"backbone.net.blocks.3.attn.qkv.weight"``), so these are names that start with
    ``"backbone."`` and contain the component (the first ``blocks``).

    Args:
        name: full parameter name.
        num_layers: the number of ViT blocks.

    Returns:
        the layer id, in [0, num_layers + 1].
    """
    parts = name.split(".")
    if parts[0] != "backbone":
        return num_layers + 1
    if parts[-1] in _VIT_EMBEDDING_PARAMETERS or "patch_embed" in parts[:-1]:
        return 0
    if "blocks" in parts[:-1]:
        block = int(parts[parts.index("blocks") + 1])
        if not 0 <= block < num_layers:
            raise ValueError(f"{name}: block {block} of a ViT with num_layers={num_layers}")
        return block + 1
    return num_layers + 1


def lr_factor(
    name: str,
    *,
    backbone_multiplier: float = 0.1,
    linear_projection_multiplier: float = 1.0,
    layer_decay: Optional[float] = None,
    num_layers: Optional[int] = None,
) -> float:
    """
    Learning-rate multiplier of one parameter, following the authors' ``paramwise_cfg``
    ``custom_keys``: a key matches when it is a substring of the full parameter name, and
    only the longest matching key applies (multipliers never compound). With ``layer_decay``
    it is multiplied by the layer-wise decay ``layer_decay ** (num_layers + 1 - layer_id)``
    (:func:`vit_layer_id`) of the authors' ``LayerDecayOptimizerConstructor``, which has no
    custom keys: their ViT recipe is ``backbone_multiplier=1.0, layer_decay=0.8,
    num_layers=24``.

    Args:
        name: full parameter name, e.g. ``"backbone.res2.0.conv1.weight"``.
        backbone_multiplier: multiplier of parameters whose name contains ``"backbone"``.
        linear_projection_multiplier: multiplier of parameters whose name contains
            ``"sampling_offsets"`` (0.1 for Co-Deformable-DETR).
            The default 1.0 means the recipe has no such keys (Co-DINO), so these
            parameters follow the other rules.
        layer_decay: the decay rate per ViT block, or None for no layer-wise decay.
        num_layers: the number of ViT blocks; required with ``layer_decay``.

    Returns:
        the multiplier of the base learning rate.
    """
    if linear_projection_multiplier != 1.0 and any(k in name for k in _LINEAR_PROJECTION_KEYS):
        factor = linear_projection_multiplier
    elif "backbone" in name:
        factor = backbone_multiplier
    else:
        factor = 1.0
    if layer_decay is None:
        return factor
    if num_layers is None:
        raise ValueError("lr_factor(layer_decay=) needs num_layers")
    return factor * layer_decay ** (num_layers + 1 - vit_layer_id(name, num_layers=num_layers))


def layer_decay_optimizer_params(
    model: torch.nn.Module,
    *,
    base_lr: float,
    weight_decay: float,
    lr_factor_func: Callable[[str], float],
) -> List[Dict[str, Any]]:
    """
    Parameter groups of the authors' ``LayerDecayOptimizerConstructor`` (ViT recipe), in place
    of ``get_default_optimizer_params``: learning rate ``base_lr * lr_factor_func(name)``;
    weight decay 0 for every 1-D parameter (biases, norms, ``q_bias``, ...), every name ending
    in ``.bias`` and every name containing ``rel_pos`` or ``relative_position_bias_table``,
    ``weight_decay`` for the others. The authors also list ``pos_embed`` and ``cls_token``, but
    compare them with full names (``backbone.pos_embed``), so these keep their weight decay,
    here as there.

    Args:
        model: the model; parameters that do not require gradients are left out.
        base_lr: the base learning rate.
        weight_decay: the weight decay of the parameters that are not exempt.
        lr_factor_func: full parameter name -> learning-rate multiplier, e.g.
            ``partial(lr_factor, backbone_multiplier=1.0, layer_decay=0.8, num_layers=24)``.

    Returns:
        the parameter groups, merged by detectron2's ``reduce_param_groups``.
    """
    params = []
    for name, value in model.named_parameters():
        if not value.requires_grad:
            continue
        exempt = (
            value.dim() == 1
            or name.endswith(".bias")
            or any(key in name for key in _RELATIVE_POSITION_KEYS)
        )
        params.append(
            {
                "params": [value],
                "lr": base_lr * lr_factor_func(name),
                "weight_decay": 0.0 if exempt else weight_decay,
            }
        )
    return reduce_param_groups(params)


def add_gradient_clipping(
    optimizer: torch.optim.Optimizer, *, max_norm: float, norm_type: float = 2.0
) -> torch.optim.Optimizer:
    """
    Make ``optimizer.step()`` clip the norm of all its parameters' gradients together (one
    global norm, as the authors' ``grad_clip=dict(max_norm=0.1, norm_type=2)``) before
    updating. Clipping inside ``step`` means that under AMP it sees the unscaled gradients:
    ``GradScaler.step`` unscales before it calls ``optimizer.step``.

    Args:
        optimizer: an optimizer instance; its class is replaced in place by a subclass
            (detectron2's ``_generate_optimizer_class_with_gradient_clipping``), so its state
            and ``state_dict`` are unchanged.
        max_norm: the largest allowed global gradient norm; must be positive.
        norm_type: the p of the p-norm.

    Returns:
        the same optimizer object.
    """
    if not max_norm > 0:
        raise ValueError(f"add_gradient_clipping(max_norm=) must be positive, got {max_norm}")
    if type(optimizer).__name__.endswith(_CLIPPING_SUFFIX):
        raise ValueError(f"{type(optimizer).__name__} already clips its gradients")
    if "step" in vars(optimizer):
        # torch LR schedulers wrap the bound ``step`` of the class they see at creation.
        raise ValueError("add_gradient_clipping must be called before creating an LR scheduler")
    clipper = functools.partial(
        torch.nn.utils.clip_grad_norm_, max_norm=max_norm, norm_type=norm_type
    )
    optimizer.__class__ = _generate_optimizer_class_with_gradient_clipping(
        type(optimizer), global_clipper=clipper
    )
    return optimizer
