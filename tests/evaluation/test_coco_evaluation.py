"""
``codetr.evaluation.COCOEvaluator`` scores the bbox task with ``box_scores`` (the query head's box
score of Co-DINO-Inst) and the segm task with ``scores`` (box score x predicted mask IoU), as
the authors; without ``box_scores`` it is detectron2's. A 2-image COCO-format dataset with
polygon masks, scored to hand-computed APs.

COCO's AP is the mean, over IoU thresholds 0.50:0.95 and the 101 recall levels 0, 0.01, ..., 1,
of the precision made monotone (the best precision at that recall or above); its precision is
tp / (tp + fp + eps), eps = np.spacing(1), hence ``pytest.approx``.
"""

import json
import math
import uuid
from pathlib import Path

import pytest
import torch
from detectron2.config import LazyConfig
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.evaluation import COCOEvaluator as Detectron2COCOEvaluator
from detectron2.structures import Boxes, Instances

from codetr.evaluation import COCOEvaluator

SIZE = 100
# dataset category ids that are not the contiguous ids: the evaluator maps them back
CATEGORIES = [(3, "square"), (7, "bar")]
# (image id, category id, XYWH box); the masks are the boxes; every box is "medium"
ANNOTATIONS = [(1, 3, [10, 10, 40, 40]), (2, 3, [20, 20, 40, 40]), (2, 7, [65, 10, 30, 60])]
METRICS = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
# no small or large ground truth: COCO gives -1, which detectron2 reports as NaN
NO_GROUND_TRUTH = {"APs": math.nan, "APl": math.nan}

# (image id, category id, XYWH box, box score, score): the square is found in both images and
# falsely in image 1 (no square there); the bar is found. By box score the false square comes
# last; by score (the mask score) it comes between the two true squares.
DETECTIONS = [
    (1, 3, [10, 10, 40, 40], 0.9, 0.8),
    (1, 3, [55, 55, 40, 40], 0.5, 0.7),
    (2, 3, [20, 20, 40, 40], 0.8, 0.6),
    (2, 7, [65, 10, 30, 60], 0.95, 0.9),
]
# squares by score: hit, miss, hit at every IoU threshold (exact masks, no overlap); recall
# 1/2, 1/2, 1 at precision 1, 1/2, 2/3, monotone 1, 2/3, 2/3: the 51 recall levels 0..0.50 take
# precision 1, the 50 levels 0.51..1 take 2/3. By box score: hit, hit, miss: precision 1.
SQUARE_AP_BY_SCORE = (51 * 1 + 50 * 2 / 3) / 101 * 100  # 83.498...


def _expected(square_ap):
    mean_ap = (square_ap + 100) / 2
    results = {"AP": mean_ap, "AP50": mean_ap, "AP75": mean_ap, "APm": mean_ap}
    return results | NO_GROUND_TRUTH | {"AP-square": square_ap, "AP-bar": 100.0}


@pytest.fixture(scope="module")
def dataset_name(tmp_path_factory):
    images = [{"id": i, "height": SIZE, "width": SIZE, "file_name": f"{i}.jpg"} for i in (1, 2)]
    annotations = [
        {
            "id": i,
            "image_id": image_id,
            "category_id": cid,
            "bbox": [x, y, w, h],
            "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
            "area": w * h,
            "iscrowd": 0,
        }
        for i, (image_id, cid, (x, y, w, h)) in enumerate(ANNOTATIONS, start=1)
    ]
    categories = [{"id": cid, "name": name} for cid, name in CATEGORIES]
    root = tmp_path_factory.mktemp("coco")
    json_file = root / "instances.json"
    json_file.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    name = f"codetr_test_coco_{uuid.uuid4().hex}"
    metadata = {
        "thing_classes": [name for _, name in CATEGORIES],
        "thing_dataset_id_to_contiguous_id": {cid: k for k, (cid, _) in enumerate(CATEGORIES)},
    }
    register_coco_instances(name, metadata, str(json_file), str(root))
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def _instances(image_id, with_box_scores, box_scores_equal_scores=False):
    detections = [d for d in DETECTIONS if d[0] == image_id]
    contiguous_id = {cid: k for k, (cid, _) in enumerate(CATEGORIES)}
    instances = Instances((SIZE, SIZE))
    xywh = torch.tensor([box for _, _, box, _, _ in detections], dtype=torch.float32)
    instances.pred_boxes = Boxes(torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1))
    instances.scores = torch.tensor([score for *_, score in detections])
    instances.pred_classes = torch.tensor([contiguous_id[d[1]] for d in detections])
    masks = torch.zeros((len(detections), SIZE, SIZE), dtype=torch.bool)
    for mask, (_, _, (x, y, w, h), _, _) in zip(masks, detections):
        mask[y : y + h, x : x + w] = True
    instances.pred_masks = masks
    if box_scores_equal_scores:
        instances.box_scores = instances.scores.clone()
    elif with_box_scores:
        instances.box_scores = torch.tensor([box_score for *_, box_score, _ in detections])
    return instances


def _evaluate(evaluator_class, dataset_name, with_box_scores, output_dir=None, **kwargs):
    evaluator = evaluator_class(dataset_name, distributed=False, output_dir=output_dir)
    evaluator.reset()
    for image_id in (1, 2):
        evaluator.process(
            [{"image_id": image_id, "height": SIZE, "width": SIZE}],
            [{"instances": _instances(image_id, with_box_scores, **kwargs)}],
        )
    return evaluator.evaluate()


def _assert_same(results, expected):
    assert list(results) == list(expected)
    for task in results:
        assert list(results[task]) == list(expected[task])
        assert results[task] == pytest.approx(expected[task], rel=0, abs=0, nan_ok=True)


def test_bbox_is_scored_with_box_scores_and_segm_with_scores(dataset_name):
    results = _evaluate(COCOEvaluator, dataset_name, with_box_scores=True)
    assert list(results) == ["bbox", "segm"]
    assert SQUARE_AP_BY_SCORE == pytest.approx(83.4983498, abs=1e-6)
    assert results["bbox"] == pytest.approx(_expected(100.0), abs=1e-9, nan_ok=True)
    assert results["segm"] == pytest.approx(_expected(SQUARE_AP_BY_SCORE), abs=1e-9, nan_ok=True)
    assert results["bbox"]["AP"] == pytest.approx(100.0, abs=1e-9)
    assert results["segm"]["AP"] == pytest.approx(91.7491749, abs=1e-6)


def test_without_box_scores_both_tasks_use_scores_as_detectron2(dataset_name):
    results = _evaluate(COCOEvaluator, dataset_name, with_box_scores=False)
    assert results["bbox"] == pytest.approx(_expected(SQUARE_AP_BY_SCORE), abs=1e-9, nan_ok=True)
    assert results["segm"] == pytest.approx(_expected(SQUARE_AP_BY_SCORE), abs=1e-9, nan_ok=True)
    _assert_same(results, _evaluate(Detectron2COCOEvaluator, dataset_name, with_box_scores=False))


def test_box_scores_equal_to_scores_give_detectron2_results(dataset_name):
    """bbox and segm evaluated apart (category ids mapped back once each) change nothing."""
    results = _evaluate(
        COCOEvaluator, dataset_name, with_box_scores=True, box_scores_equal_scores=True
    )
    _assert_same(results, _evaluate(Detectron2COCOEvaluator, dataset_name, with_box_scores=False))


@pytest.mark.parametrize("tasks", [None, ("bbox",), ("segm",)])
def test_results_json_keeps_both_scores(dataset_name, tmp_path, tasks):
    evaluator = COCOEvaluator(
        dataset_name, tasks=tasks, distributed=False, output_dir=str(tmp_path)
    )
    evaluator.reset()
    for image_id in (1, 2):
        evaluator.process(
            [{"image_id": image_id, "height": SIZE, "width": SIZE}],
            [{"instances": _instances(image_id, with_box_scores=True)}],
        )
    results = evaluator.evaluate()
    assert list(results) == list(tasks or ("bbox", "segm"))
    if "bbox" in results:
        assert results["bbox"]["AP"] == pytest.approx(100.0, abs=1e-9)
    if "segm" in results:
        assert results["segm"]["AP"] == pytest.approx(91.7491749, abs=1e-6)
    records = json.loads((tmp_path / "coco_instances_results.json").read_text())
    # one record per detection, dataset category ids; "score" is the model's scores unless
    # bbox (scored with the box scores) is the only task
    got = [(r["image_id"], r["category_id"], r["bbox"]) for r in records]
    assert got == [(image_id, cid, box) for image_id, cid, box, _, _ in DETECTIONS]
    assert [r["box_score"] for r in records] == pytest.approx([d[3] for d in DETECTIONS])
    score_index = 3 if tasks == ("bbox",) else 4
    assert [r["score"] for r in records] == pytest.approx([d[score_index] for d in DETECTIONS])
    assert all("segmentation" in r for r in records)
    assert (tmp_path / "instances_predictions.pth").is_file()


def test_the_coco_config_uses_this_evaluator():
    cfg = LazyConfig.load(str(Path(__file__).parents[2] / "configs/common/data/coco.py"))
    assert cfg.dataloader.evaluator._target_ is COCOEvaluator
    assert issubclass(COCOEvaluator, Detectron2COCOEvaluator)
