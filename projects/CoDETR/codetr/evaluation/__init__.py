"""
Evaluation: detectron2's ``COCOEvaluator`` and ``LVISEvaluator`` (same arguments) that score the
bbox task with the predicted ``box_scores`` where there are any (the authors' protocol for
Co-DINO-Inst); the ``LVISEvaluator`` also runs with the PyPI release of ``lvis``.
"""

from .coco import COCOEvaluator
from .lvis import LVISEvaluator

__all__ = ["COCOEvaluator", "LVISEvaluator"]
