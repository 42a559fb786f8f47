"""
CoDETR-d2: Co-DETR (DETRs with Collaborative Hybrid Assignments Training) for detectron2.

Importing the package does nothing else: the entry points (``train_net.py``, ``demo.py``, the
tools) check the prerequisites first with ``codetr.check_prerequisites``, which imports
nothing but the standard library, so it can explain a missing torch or detectron2.
"""

from ._prerequisites import check_prerequisites

__all__ = ["check_prerequisites"]
