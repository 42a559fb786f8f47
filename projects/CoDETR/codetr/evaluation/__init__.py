"""Evaluation: detectron2's ``LVISEvaluator`` made to run with the PyPI release of ``lvis``."""

from .lvis import LVISEvaluator

__all__ = ["LVISEvaluator"]
