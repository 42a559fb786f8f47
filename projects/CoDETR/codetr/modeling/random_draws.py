"""
Where a training step takes its random numbers: the denoising noise and the positive-query
sampling ask the current :class:`RandomDraws` for them, by purpose. It is torch's global
generator unless a caller puts another source in its place with :func:`random_draws_from`
(the training-parity tests replay the draws of the authors' code this way).
"""

from contextlib import contextmanager
from typing import Iterator, Sequence, Union

import torch
from torch import Tensor

__all__ = ["RandomDraws", "random_draws", "random_draws_from"]

Device = Union[str, torch.device]


class RandomDraws:
    """
    The random numbers of training, from torch's global generator. ``purpose`` names what a
    draw is for (e.g. ``"denoising.label_flip"``); this source ignores it, a replaying one
    (a subclass) uses it to hand out recorded values.
    """

    def uniform(self, purpose: str, shape: Sequence[int], device: Device) -> Tensor:
        """float32 of ``shape``, uniform in [0, 1)."""
        return torch.rand(tuple(shape), device=device)

    def integers(self, purpose: str, high: int, shape: Sequence[int], device: Device) -> Tensor:
        """int64 of ``shape``, uniform in {0, ..., high - 1}."""
        return torch.randint(high, tuple(shape), device=device)

    def permutation(self, purpose: str, n: int, device: Device) -> Tensor:
        """A random permutation of 0, ..., n - 1 (int64)."""
        return torch.randperm(n, device=device)


_current = RandomDraws()


def random_draws() -> RandomDraws:
    """The source the model draws from now."""
    return _current


@contextmanager
def random_draws_from(source: RandomDraws) -> Iterator[RandomDraws]:
    """Draw from ``source`` inside the ``with`` block (on this process)."""
    global _current
    previous, _current = _current, source
    try:
        yield source
    finally:
        _current = previous
