"""Renaming a published backbone state dict to our parameter names."""
from typing import Callable, Dict, Optional

from torch import Tensor

__all__ = ["rename_state_dict"]


def rename_state_dict(
    state_dict: Dict[str, Tensor],
    new_name: Callable[[str], Optional[str]],
    *,
    prefix: str,
    skip: Callable[[str], bool],
    naming: str,
) -> Dict[str, Tensor]:
    """
    Args:
        state_dict: the published tensors, unprefixed.
        new_name: our name of one published name, or None when it is not one of them.
        prefix: prepended to every output name (the backbone's name in the detector).
        skip: published names that are dropped (classifier, counters, masks).
        naming: what the names should be, for the error message ("torchvision ResNet").
    Raises:
        ValueError: naming every key that is neither skipped nor renamed.
    """
    converted, unknown = {}, []
    for key, value in state_dict.items():
        if skip(key):
            continue
        name = new_name(key)
        if name is None:
            unknown.append(key)
        else:
            converted[prefix + name] = value
    if unknown:
        raise ValueError(f"Not {naming} parameter names: {sorted(unknown)}")
    return converted
