"""
Optimizer helpers of the Co-DETR training recipe.

- :func:`lr_factor` gives the per-parameter learning-rate multiplier, for detectron2's
  ``get_default_optimizer_params(lr_factor_func=...)``.
- :func:`add_gradient_clipping` makes ``optimizer.step()`` clip the global gradient norm first.
"""

import functools
from typing import Tuple

import torch
from detectron2.solver.build import _generate_optimizer_class_with_gradient_clipping

__all__ = ["lr_factor", "add_gradient_clipping"]

# Parameter-name keys of the deformable attention's linear projections that the
# Co-Deformable-DETR recipe trains with a smaller learning rate. (The authors' recipe also
# names "reference_points", a layer only their one-stage Deformable DETR has: none of ours.)
_LINEAR_PROJECTION_KEYS: Tuple[str, ...] = ("sampling_offsets",)
# Name suffix of the classes made by ``_generate_optimizer_class_with_gradient_clipping``.
_CLIPPING_SUFFIX = "WithGradientClip"


def lr_factor(
    name: str, *, backbone_multiplier: float = 0.1, linear_projection_multiplier: float = 1.0
) -> float:
    """
    Learning-rate multiplier of one parameter, following the authors' ``paramwise_cfg``
    ``custom_keys``: a key matches when it is a substring of the full parameter name, and
    only the longest matching key applies (multipliers never compound).

    Args:
        name: full parameter name, e.g. ``"backbone.res2.0.conv1.weight"``.
        backbone_multiplier: multiplier of parameters whose name contains ``"backbone"``.
        linear_projection_multiplier: multiplier of parameters whose name contains
            ``"sampling_offsets"`` (0.1 for Co-Deformable-DETR).
            The default 1.0 means the recipe has no such keys (Co-DINO), so these
            parameters follow the other rules.

    Returns:
        the multiplier of the base learning rate.
    """
    if linear_projection_multiplier != 1.0 and any(k in name for k in _LINEAR_PROJECTION_KEYS):
        return linear_projection_multiplier
    if "backbone" in name:
        return backbone_multiplier
    return 1.0


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
