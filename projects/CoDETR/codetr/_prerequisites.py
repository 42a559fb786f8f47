"""Checks that the prerequisites this package's own requirements leave out (torch, torchvision,
detectron2; tools/install_prerequisites.py installs them) are importable."""

import importlib

__all__ = ["check_prerequisites"]

_PREREQUISITES = ("torch", "torchvision", "detectron2")


def check_prerequisites() -> None:
    """Raises ImportError naming the missing prerequisite and how to install it."""
    for module in _PREREQUISITES:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ImportError(
                f"CoDETR-d2 needs '{module}', which cannot be imported ({e}). To fix: run "
                "`make install` (python tools/install_prerequisites.py) in the CoDETR-d2 "
                "repository; it installs what is missing (see README 'Installation')"
            ) from e
