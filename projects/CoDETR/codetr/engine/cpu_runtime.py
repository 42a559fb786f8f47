"""
Process-wide settings that make PyTorch faster on a CPU, used by the entry points
(``train_net.py``, ``demo.py``, ``tools/benchmark*.py``).
"""

import contextlib
import ctypes
import sys
from typing import Iterator

import torch

__all__ = ["flush_denormals", "reuse_freed_memory"]


# glibc's mallopt parameters (malloc.h) and their documented defaults
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_MMAP_THRESHOLD: 128 * 1024, _M_MMAP_MAX: 65536}
# keep up to 2 GiB (mallopt takes an int) of free memory above the heap's last live block
_REUSE = {_M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: 2**31 - 1}


def flush_denormals() -> None:
    """
    Treat denormal floats as zero on the CPU. As a model trains, more and more weights and
    gradients become tiny; CPU arithmetic on denormal numbers is many times slower, and a
    toy Co-DINO run slowed from 1.2 to over 3 s per iteration within 80 iterations without
    this. Values below ~1e-38 are irrelevant to the model. Called by the entry points.
    """
    torch.set_flush_denormal(True)


def _mallopt(settings) -> bool:
    """Applies glibc ``mallopt`` settings; False where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in settings.items())


@contextlib.contextmanager
def reuse_freed_memory() -> Iterator[bool]:
    """
    Within this context, glibc's allocator keeps freed memory for reuse instead of returning it
    to the system. Yields whether it could (False where the C library is not glibc).

    By default glibc serves every allocation above a few MiB with a fresh ``mmap`` and unmaps
    it when freed, so every large activation of a detector is faulted in page by page and
    zeroed by the kernel again, in every layer of every image: a Co-Deformable-DETR R50
    inference at 800 x 1333 on 2 cores took 2.7 to 4.3 million page faults and 5 to 10 s of
    system time over 4 images. Here large blocks come from the heap and are reused (25 thousand
    faults, 0.1 s), about 25% faster inference with a few hundred MiB more peak memory.

    Meant for inference (``demo.py``, ``train_net.py --eval-only``, the inference phase of the
    benchmarks): training's allocation pattern fragments such a heap (a Co-DINO R50 training
    step outgrew 24 GB instead of 14 GB), so training keeps the default; see README "Speed" for
    an allocator that helps training. On exit, glibc's documented defaults are restored (its
    automatic threshold adjustment stays off); memory the heap grew by stays for reuse.
    """
    configured = _mallopt(_REUSE)
    try:
        yield configured
    finally:
        if configured:
            _mallopt(_DEFAULTS)
