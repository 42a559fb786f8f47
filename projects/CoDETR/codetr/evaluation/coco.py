"""
detectron2's ``COCOEvaluator`` scoring the bbox task with the predicted ``box_scores``.

Co-DINO-Inst (``codetr.modeling.mask_heads``) rescores its detections: ``scores`` is the query
head's box score times the predicted mask IoU (the mask score) and ``box_scores`` the box score.
The authors evaluate boxes with the box score and masks with the mask score; detectron2's
evaluators rank the detections of every task by the one ``scores``. :class:`BoxScoresForBbox`
(shared by this ``COCOEvaluator`` and ``codetr.evaluation.LVISEvaluator``) follows the authors:

- ``process`` keeps each detection's box score in its json record under ``"box_score"``;
- ``_eval_predictions`` evaluates "bbox" on copies of the records whose ``"score"`` is the box
  score, and the other tasks (segm, keypoints) on the records as they are, each through
  detectron2's own ``_eval_predictions`` (called once per group of tasks).

Predictions without ``box_scores`` are evaluated exactly as by detectron2. With them, the
results json (``coco_instances_results.json`` / ``lvis_instances_results.json`` under
``output_dir``) is written once, by the last evaluation: one record per detection with
``"score"`` the model's ``scores`` (the mask score) and ``"box_score"`` its ``box_scores``;
where bbox is the only task, ``"score"`` is the box score (the score bbox was evaluated with).
``instances_predictions.pth`` holds the records as ``process`` made them (``"box_score"``
included).
"""

import contextlib
from typing import Any, Dict, Iterator, List

from detectron2.evaluation import COCOEvaluator as _Detectron2COCOEvaluator

__all__ = ["BOX_SCORE_KEY", "BoxScoresForBbox", "COCOEvaluator"]

BOX_SCORE_KEY = "box_score"


@contextlib.contextmanager
def _attributes(obj: Any, **values: Any) -> Iterator[None]:
    """Within the block, ``obj`` has these attribute values; the former ones are restored."""
    former = {name: getattr(obj, name) for name in values}
    for name, value in values.items():
        setattr(obj, name, value)
    try:
        yield
    finally:
        for name, value in former.items():
            setattr(obj, name, value)


def _record_box_scores(predictions: List[Dict], outputs: List[Dict]) -> None:
    """Adds ``box_scores`` to the json records of the predictions ``process`` made of outputs."""
    predictions = [p for p in predictions if "instances" in p]
    instances = [output["instances"] for output in outputs if "instances" in output]
    if len(predictions) != len(instances):
        raise RuntimeError(
            f"{len(instances)} outputs with instances gave {len(predictions)} predictions"
        )
    for prediction, image_instances in zip(predictions, instances):
        if not image_instances.has("box_scores"):
            continue
        records, box_scores = prediction["instances"], image_instances.box_scores.tolist()
        if len(records) != len(box_scores):
            raise RuntimeError(f"{len(box_scores)} box scores for {len(records)} detections")
        for record, box_score in zip(records, box_scores):
            record[BOX_SCORE_KEY] = box_score


def _box_scored(record: Dict) -> Dict:
    """A copy of a json record whose ``"score"`` is its box score (where it has one)."""
    return dict(record, score=record.get(BOX_SCORE_KEY, record["score"]))


class BoxScoresForBbox:
    """
    Mixin for detectron2's ``COCOEvaluator`` / ``LVISEvaluator``: the bbox task ranks the
    detections by their ``box_scores`` where the predicted ``Instances`` have them, the other
    tasks by ``scores`` (see the module docstring).
    """

    def process(self, inputs, outputs):
        start = len(self._predictions)
        super().process(inputs, outputs)
        # detectron2 pairs inputs and outputs with zip: the outputs it made predictions of
        _record_box_scores(self._predictions[start:], [o for _, o in zip(inputs, outputs)])

    def _eval_predictions(self, predictions, **kwargs):
        records = [record for p in predictions for record in p["instances"]]
        tasks = self._tasks or self._tasks_from_predictions(records)
        if (
            not self._do_evaluation
            or "bbox" not in tasks
            or not any(BOX_SCORE_KEY in record for record in records)
        ):
            return super()._eval_predictions(predictions, **kwargs)
        # new records (detectron2 maps category ids in place): "score" is the box score
        box_predictions = [
            dict(p, instances=[_box_scored(record) for record in p["instances"]])
            for p in predictions
        ]
        other_tasks = tuple(task for task in tasks if task != "bbox")
        # bbox first, as detectron2 orders the tasks; the last evaluation writes the json
        output_dir = None if other_tasks else self._output_dir
        with _attributes(self, _tasks=("bbox",), _output_dir=output_dir):
            super()._eval_predictions(box_predictions, **kwargs)
        if other_tasks:
            with _attributes(self, _tasks=other_tasks):
                super()._eval_predictions(predictions, **kwargs)


class COCOEvaluator(BoxScoresForBbox, _Detectron2COCOEvaluator):
    """
    detectron2's :class:`detectron2.evaluation.COCOEvaluator` (same arguments) that evaluates
    the bbox task with the predicted ``box_scores`` where the ``Instances`` have them (the
    authors' protocol for Co-DINO-Inst, see the module docstring); the other tasks, and
    predictions without ``box_scores``, exactly as detectron2's.
    """
