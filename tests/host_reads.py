"""A probe for the tests: which tensor data a computation reads back into Python."""

import torch

__all__ = ["record_host_reads"]


def record_host_reads(monkeypatch):
    """Names of the tensor-to-Python reads (a device-to-host sync on GPU) made from now on."""
    reads = []
    for name in ("tolist", "item", "__int__", "__float__", "__index__"):
        original = getattr(torch.Tensor, name)

        def recording(self, *args, _original=original, _name=name):
            reads.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, recording)
    return reads
