"""
``codetr.evaluation.LVISEvaluator`` scores a 3-image LVIS-format dataset with the installed
``lvis`` (0.5.3 from PyPI reads ``np.float``, which numpy >= 1.24 lacks) to hand-computed APs.

LVIS's AP (like COCO's) is the mean, over IoU thresholds 0.50:0.95 and the 101 recall levels
0, 0.01, ..., 1, of the precision made monotone (the best precision at that recall or above);
its precision is tp / (tp + fp + eps), eps = np.spacing(1), hence ``pytest.approx``.
"""

import json
import subprocess
import sys
import uuid
from pathlib import Path

import lvis.eval  # in the test extras: a missing lvis (or detectron2) fails, never skips
import numpy as np
import pytest
import torch
from detectron2.config import LazyConfig
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_lvis_instances
from detectron2.evaluation import LVISEvaluator as Detectron2LVISEvaluator
from detectron2.structures import Boxes, Instances

from codetr.evaluation import LVISEvaluator
from codetr.evaluation.lvis import _lvis_eval_needs_np_float, _numpy_float_in_lvis_eval

SIZE = 200
# contiguous class k is LVIS category k + 1 (detectron2 adds 1 when the metadata has no
# thing_dataset_id_to_contiguous_id); one category per frequency group
CATEGORIES = [(1, "apple", "r"), (2, "banana", "c"), (3, "cherry", "f")]
# (image id, category id, XYWH box); every box is "medium" (32² < area < 96²)
ANNOTATIONS = [
    (1, 1, [10, 10, 40, 40]),
    (1, 3, [100, 100, 50, 50]),
    (2, 2, [20, 30, 60, 40]),
    (2, 3, [120, 20, 40, 60]),
    (3, 2, [30, 30, 50, 50]),
]
# image 3 is verified to have no cherry: a cherry detected there is a false positive
NEGATIVE_CATEGORIES = {1: [], 2: [], 3: [3]}
METRICS = ["AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf"]
# no small or large ground truth: LVIS gives -1, which detectron2 reports as -100
NO_GROUND_TRUTH = {"APs": -100.0, "APl": -100.0}


@pytest.fixture(scope="module")
def dataset_name(tmp_path_factory):
    categories = [
        {
            "id": cid,
            "name": name,
            "synset": f"{name}.n.01",
            "synonyms": [name],
            "def": f"a {name}",
            "frequency": frequency,
            "image_count": len({a[0] for a in ANNOTATIONS if a[1] == cid}),
            "instance_count": sum(a[1] == cid for a in ANNOTATIONS),
        }
        for cid, name, frequency in CATEGORIES
    ]
    images = [
        {
            "id": image_id,
            "height": SIZE,
            "width": SIZE,
            "coco_url": f"http://images.cocodataset.org/val2017/{image_id:012d}.jpg",
            "neg_category_ids": negative,
            "not_exhaustive_category_ids": [],
        }
        for image_id, negative in NEGATIVE_CATEGORIES.items()
    ]
    annotations = [
        {"id": i, "image_id": image_id, "category_id": cid, "bbox": box, "area": box[2] * box[3]}
        for i, (image_id, cid, box) in enumerate(ANNOTATIONS, start=1)
    ]
    root = tmp_path_factory.mktemp("lvis")
    json_file = root / "lvis_val.json"
    json_file.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    name = f"codetr_test_lvis_{uuid.uuid4().hex}"
    register_lvis_instances(
        name, {"thing_classes": [c[1] for c in CATEGORIES]}, str(json_file), str(root)
    )
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def _instances(detections):
    """detections: (category id, XYWH box, score) for one image."""
    instances = Instances((SIZE, SIZE))
    xywh = torch.tensor([box for _, box, _ in detections], dtype=torch.float32).reshape(-1, 4)
    instances.pred_boxes = Boxes(torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1))
    instances.scores = torch.tensor([score for _, _, score in detections])
    instances.pred_classes = torch.tensor([cid - 1 for cid, _, _ in detections])
    return instances


def _evaluate(evaluator_class, dataset_name, detections, box_scores=None):
    """detections: image id -> (category id, XYWH box, score)s; box_scores: image id -> the
    detections' ``box_scores`` (none by default); the bbox metrics."""
    evaluator = evaluator_class(dataset_name, max_dets_per_image=1000)
    evaluator.reset()
    for image_id, image_detections in detections.items():
        instances = _instances(image_detections)
        if box_scores is not None:
            instances.box_scores = torch.tensor(box_scores[image_id])
        evaluator.process(
            [{"image_id": image_id, "height": SIZE, "width": SIZE}], [{"instances": instances}]
        )
    results = evaluator.evaluate()
    assert list(results) == ["bbox"]
    return results["bbox"]


def _perfect_detections():
    detections = {image_id: [] for image_id in NEGATIVE_CATEGORIES}
    for image_id, cid, box in ANNOTATIONS:
        detections[image_id].append((cid, box, 0.9))
    return detections


def test_perfect_detections_score_100(dataset_name):
    results = _evaluate(LVISEvaluator, dataset_name, _perfect_detections())
    assert list(results) == METRICS
    expected = {metric: 100.0 for metric in METRICS} | NO_GROUND_TRUTH
    assert results == pytest.approx(expected, abs=1e-9)


def test_a_false_positive_above_a_true_positive_lowers_the_ap_by_hand(dataset_name):
    detections = _perfect_detections()
    # cherry (f, 2 ground truths): hit (0.9, image 1), miss (0.8, image 3, where cherry is a
    # verified negative), hit (0.7, image 2); no IoU threshold changes that
    detections[1] = [(1, [10, 10, 40, 40], 0.9), (3, [100, 100, 50, 50], 0.9)]
    detections[2] = [(2, [20, 30, 60, 40], 0.9), (3, [120, 20, 40, 60], 0.7)]
    detections[3] = [(2, [30, 30, 50, 50], 0.9), (3, [100, 100, 40, 40], 0.8)]
    # an apple in image 2, neither annotated nor a verified negative there: LVIS ignores it
    detections[2].append((1, [60, 100, 40, 40], 0.95))
    results = _evaluate(LVISEvaluator, dataset_name, detections)
    # recall 1/2, 1/2, 1 at precision 1, 1/2, 2/3; monotone: 1, 2/3, 2/3. The 51 recall
    # levels 0..0.50 take precision 1, the 50 levels 0.51..1 take 2/3
    cherry_ap = (51 * 1 + 50 * 2 / 3) / 101 * 100  # 83.498...
    assert cherry_ap == pytest.approx(83.4983498, abs=1e-6)
    mean_ap = (100 + 100 + cherry_ap) / 3  # 94.499...
    expected = {
        "AP": mean_ap,
        "AP50": mean_ap,
        "AP75": mean_ap,
        "APm": mean_ap,
        "APr": 100.0,
        "APc": 100.0,
        "APf": cherry_ap,
    } | NO_GROUND_TRUTH
    assert results == pytest.approx(expected, abs=1e-9)


def test_bbox_is_scored_with_box_scores(dataset_name):
    """Co-DINO-Inst's ``scores`` (mask scores) rank the cherry miss above a hit, as in the test
    above (cherry AP 83.5); its ``box_scores`` rank it last: bbox is scored with those, 100."""
    detections = _perfect_detections()
    detections[2] = [(2, [20, 30, 60, 40], 0.9), (3, [120, 20, 40, 60], 0.7)]
    detections[3] = [(2, [30, 30, 50, 50], 0.9), (3, [100, 100, 40, 40], 0.8)]
    by_score = _evaluate(LVISEvaluator, dataset_name, detections)
    assert by_score["APf"] == pytest.approx((51 * 1 + 50 * 2 / 3) / 101 * 100, abs=1e-9)
    box_scores = {1: [0.9, 0.9], 2: [0.9, 0.7], 3: [0.9, 0.1]}
    results = _evaluate(LVISEvaluator, dataset_name, detections, box_scores=box_scores)
    expected = {metric: 100.0 for metric in METRICS} | NO_GROUND_TRUTH
    assert results == pytest.approx(expected, abs=1e-9)


def test_plain_detectron2_evaluator_needs_the_fix(dataset_name):
    np_had_float = hasattr(np, "float")
    if _lvis_eval_needs_np_float(lvis.eval):
        # lvis 0.5.3 with numpy >= 1.24: detectron2's evaluator stops in LVISEval.accumulate
        assert not np_had_float
        with pytest.raises(AttributeError, match="np.float"):
            _evaluate(Detectron2LVISEvaluator, dataset_name, _perfect_detections())
    else:
        # an lvis or numpy without the problem: the fix does nothing
        with _numpy_float_in_lvis_eval():
            assert lvis.eval.np is np
    # numpy itself is never changed, and lvis.eval gets numpy back
    assert hasattr(np, "float") == np_had_float
    assert lvis.eval.np is np


def test_the_fix_is_scoped_to_lvis_eval_and_undone_on_error():
    needed = _lvis_eval_needs_np_float(lvis.eval)
    with pytest.raises(RuntimeError, match="inside"):
        with _numpy_float_in_lvis_eval():
            if needed:
                assert lvis.eval.np is not np
                assert lvis.eval.np.float is float
                assert lvis.eval.np.cumsum is np.cumsum
                assert not hasattr(np, "float")
            else:
                assert lvis.eval.np is np
            raise RuntimeError("inside")
    assert lvis.eval.np is np


def test_a_missing_lvis_names_the_fix(dataset_name, monkeypatch):
    monkeypatch.setitem(sys.modules, "lvis", None)
    with pytest.raises(ImportError, match=r"pip install -e \.\[lvis\]"):
        LVISEvaluator(dataset_name)


def test_importing_codetr_evaluation_does_not_import_lvis():
    code = "import sys, codetr.evaluation; assert 'lvis' not in sys.modules, sorted(sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_lvis_config_uses_this_evaluator():
    cfg = LazyConfig.load(str(Path(__file__).parents[2] / "configs/common/data/lvis.py"))
    assert cfg.dataloader.evaluator._target_ is LVISEvaluator
    assert cfg.dataloader.evaluator.max_dets_per_image == 1000
