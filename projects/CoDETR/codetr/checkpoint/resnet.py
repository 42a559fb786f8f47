"""
ResNet parameter names: torchvision (also mmdet's ``ResNet``, which uses the same names) to
detectron2's ``ResNet`` as built by :func:`codetr.modeling.backbone.build_resnet`.

=======================================  ===========================================
torchvision                              detectron2
=======================================  ===========================================
``conv1.weight``                         ``stem.conv1.weight``
``bn1.*``                                ``stem.conv1.norm.*``
``layer{s}.{b}.conv{k}.weight``          ``res{s+1}.{b}.conv{k}.weight``
``layer{s}.{b}.bn{k}.*``                 ``res{s+1}.{b}.conv{k}.norm.*``
``layer{s}.{b}.downsample.0.weight``     ``res{s+1}.{b}.shortcut.weight``
``layer{s}.{b}.downsample.1.*``          ``res{s+1}.{b}.shortcut.norm.*``
``fc.*``                                 (dropped: the classifier)
=======================================  ===========================================

BatchNorm's ``num_batches_tracked`` counters carry no weights and detectron2's FrozenBN has
none; :func:`convert_torchvision_resnet` drops them.
"""
import re
from typing import Dict, Optional

from torch import Tensor

from .renaming import rename_state_dict

__all__ = ["torchvision_resnet_key", "is_torchvision_resnet_state_dict", "convert_torchvision_resnet"]

_BLOCK = r"layer(?P<stage>[1-4])\.(?P<block>\d+)\."
_RULES = [
    (r"conv1\.weight", "stem.conv1.weight"),
    (r"bn1\.(?P<name>\w+)", "stem.conv1.norm.{name}"),
    (_BLOCK + r"conv(?P<k>\d)\.weight", "res{stage}.{block}.conv{k}.weight"),
    (_BLOCK + r"bn(?P<k>\d)\.(?P<name>\w+)", "res{stage}.{block}.conv{k}.norm.{name}"),
    (_BLOCK + r"downsample\.0\.weight", "res{stage}.{block}.shortcut.weight"),
    (_BLOCK + r"downsample\.1\.(?P<name>\w+)", "res{stage}.{block}.shortcut.norm.{name}"),
]


def torchvision_resnet_key(key: str) -> Optional[str]:
    """
    The detectron2 name of one torchvision ResNet parameter or buffer (no prefix), or None
    for names that are not part of the feature extractor (``fc.*``) or not ResNet names.
    """
    for pattern, template in _RULES:
        match = re.fullmatch(pattern, key)
        if match:
            groups = match.groupdict()
            if "stage" in groups:  # torchvision's layer1 is detectron2's res2
                groups["stage"] = int(groups["stage"]) + 1
            return template.format(**groups)
    return None


def is_torchvision_resnet_state_dict(state_dict: Dict[str, Tensor]) -> bool:
    """Whether an unprefixed state dict is a torchvision ResNet (e.g. ImageNet weights)."""
    return "conv1.weight" in state_dict and "layer1.0.conv1.weight" in state_dict


def convert_torchvision_resnet(
    state_dict: Dict[str, Tensor], *, prefix: str = "backbone."
) -> Dict[str, Tensor]:
    """
    Renames a plain torchvision ResNet state dict (e.g. ``torchvision.models.resnet50``'s
    ImageNet weights) for our backbone (``train.init_checkpoint`` does it when loading).

    Args:
        state_dict: torchvision ResNet parameters and buffers, unprefixed.
        prefix: prepended to every output name (the backbone's name in the detector).
    Returns:
        the renamed tensors; ``fc.*`` and ``num_batches_tracked`` are dropped.
    Raises:
        ValueError: naming the keys that are not torchvision ResNet names.
    """
    return rename_state_dict(
        state_dict,
        torchvision_resnet_key,
        prefix=prefix,
        skip=lambda key: key.startswith("fc.") or key.endswith(".num_batches_tracked"),
        naming="torchvision ResNet",
    )
