"""Checks that the prerequisites the project does not install itself are importable."""
import importlib

__all__ = ["check_prerequisites"]

_INSTALL = {
    "torch": "install PyTorch for your platform: https://pytorch.org/get-started/locally/",
    "torchvision": "install the torchvision matching your PyTorch: "
    "https://pytorch.org/get-started/locally/",
    "detectron2": "install detectron2 from source: python -m pip install --no-build-isolation "
    "'git+https://github.com/facebookresearch/detectron2.git' "
    "(see https://detectron2.readthedocs.io/en/latest/tutorials/install.html)",
}


def check_prerequisites() -> None:
    """Raises ImportError naming the missing prerequisite and how to install it."""
    for module, how in _INSTALL.items():
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ImportError(
                f"CoDETR-d2 needs '{module}', which cannot be imported ({e}). To fix: {how}"
            ) from e
