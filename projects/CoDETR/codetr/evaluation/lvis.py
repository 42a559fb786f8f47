"""
detectron2's ``LVISEvaluator``, runnable with the LVIS API's PyPI release: ``lvis`` 0.5.3 (the
latest release) uses ``np.float`` in ``LVISEval.accumulate``, an alias numpy 1.24 removed
(lvis-dataset/lvis-api#37, fixed on its main branch only), so the evaluation stops there.
During ``evaluate`` this evaluator gives the module ``lvis.eval`` alone a ``np`` that is numpy
plus ``float`` (the builtin, which the alias stood for); numpy itself is left as it is.

Like ``codetr.evaluation.COCOEvaluator`` it evaluates the bbox task with the predicted
``box_scores`` where the ``Instances`` have them, segm with ``scores`` (the authors' protocol for
Co-DINO-Inst: ``codetr.evaluation.coco.BoxScoresForBbox``).
"""

import contextlib
import importlib
import inspect
import re
from types import ModuleType
from typing import Iterator

from detectron2.evaluation import LVISEvaluator as _Detectron2LVISEvaluator

from .coco import BoxScoresForBbox

__all__ = ["LVISEvaluator"]

_NP_FLOAT = re.compile(r"\bnp\.float\b")


class _NumpyWithFloat:
    """The numpy module, plus the alias ``float`` for the builtin that numpy 1.24 removed."""

    float = float

    def __init__(self, numpy: ModuleType):
        self._numpy = numpy

    def __getattr__(self, name: str):
        return getattr(self._numpy, name)


def _lvis_eval_needs_np_float(lvis_eval: ModuleType) -> bool:
    """Whether ``lvis_eval`` reads ``np.float`` and its numpy no longer has it."""
    numpy = getattr(lvis_eval, "np", None)
    if numpy is None or hasattr(numpy, "float"):
        return False
    try:
        source = inspect.getsource(lvis_eval)
    except (OSError, TypeError):  # no source to read: the proxy is harmless anyway
        return True
    return _NP_FLOAT.search(source) is not None


@contextlib.contextmanager
def _numpy_float_in_lvis_eval() -> Iterator[None]:
    """Within the block, ``np.float`` in ``lvis.eval`` is ``float``; a no-op where not needed."""
    lvis_eval = importlib.import_module("lvis.eval")
    if not _lvis_eval_needs_np_float(lvis_eval):
        yield
        return
    numpy = lvis_eval.np
    # lvis <= 0.5.3 (PyPI) reads np.float, gone from numpy >= 1.24 (lvis-dataset/lvis-api#37)
    lvis_eval.np = _NumpyWithFloat(numpy)
    try:
        yield
    finally:
        lvis_eval.np = numpy


class LVISEvaluator(BoxScoresForBbox, _Detectron2LVISEvaluator):
    """
    detectron2's :class:`detectron2.evaluation.LVISEvaluator` (same arguments), whose
    ``evaluate`` also runs with ``lvis`` 0.5.3 and numpy >= 1.24, and which evaluates the bbox
    task with the predicted ``box_scores`` where the ``Instances`` have them (see the module
    docstring).
    """

    def __init__(
        self,
        dataset_name,
        tasks=None,
        distributed=True,
        output_dir=None,
        *,
        max_dets_per_image=None,
    ):
        try:
            importlib.import_module("lvis")
        except ImportError as e:
            raise ImportError(
                f"LVISEvaluator needs the LVIS API, package 'lvis', which cannot be imported "
                f"({e}). To fix: run `pip install -e .[lvis]` in the CoDETR-d2 repository"
            ) from e
        super().__init__(
            dataset_name,
            tasks=tasks,
            distributed=distributed,
            output_dir=output_dir,
            max_dets_per_image=max_dets_per_image,
        )

    def evaluate(self):
        with _numpy_float_in_lvis_eval():
            return super().evaluate()
