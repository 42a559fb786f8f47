"""
Loss normalisers shared by the distributed workers: the count a loss is divided by, averaged
over the workers, as the authors' ``reduce_mean`` (every worker then divides by the same value).
"""

import torch
import torch.distributed as dist
from detectron2.utils import comm

__all__ = ["average_across_workers"]


def average_across_workers(value: float, device: torch.device) -> float:
    """
    Mean of ``value`` over the distributed workers, clamped to >= 1.

    Args:
        value: this worker's count (e.g. its number of positive queries).
        device: device of the tensor used for the all-reduce (must suit the backend).

    Returns:
        max(mean over workers, 1.0); ``max(value, 1.0)`` when not distributed.
    """
    world_size = comm.get_world_size()
    if world_size > 1:
        tensor = torch.tensor([value / world_size], dtype=torch.float32, device=device)
        dist.all_reduce(tensor)
        value = tensor.item()
    return max(float(value), 1.0)
