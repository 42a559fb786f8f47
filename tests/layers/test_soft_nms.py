import numpy as np
import pytest
import torch

from codetr.layers import batched_soft_nms

SQUARE = [0.0, 0.0, 10.0, 10.0]
HALF_SQUARE = [0.0, 0.0, 10.0, 5.0]  # IoU 0.5 with SQUARE


def _run(boxes, scores, labels, **kwargs):
    kwargs.setdefault("max_keep", 100)
    return batched_soft_nms(
        torch.tensor(boxes, dtype=torch.float32),
        torch.tensor(scores, dtype=torch.float32),
        torch.tensor(labels),
        **kwargs,
    )


def _disjoint_boxes(count):
    return [[20.0 * i, 0.0, 20.0 * i + 10.0, 10.0] for i in range(count)]


@pytest.mark.parametrize(
    "iou_threshold, expected_second_score",
    [(0.4, 0.4), (0.5, 0.4), (0.6, 0.8)],  # decays from IoU >= threshold, by 1 - IoU
)
def test_overlapping_pair_same_class(iou_threshold, expected_second_score):
    keep, scores = _run([SQUARE, HALF_SQUARE], [0.9, 0.8], [0, 0], iou_threshold=iou_threshold)
    assert keep.tolist() == [0, 1]
    assert keep.dtype == torch.long
    torch.testing.assert_close(scores, torch.tensor([0.9, expected_second_score]))


def test_different_classes_never_interact():
    keep, scores = _run(
        [SQUARE, SQUARE, HALF_SQUARE], [0.9, 0.8, 0.7], [0, 1, 2], iou_threshold=0.1
    )
    assert keep.tolist() == [0, 1, 2]
    torch.testing.assert_close(scores, torch.tensor([0.9, 0.8, 0.7]))


def test_min_score_drops_boxes():
    boxes = [SQUARE, SQUARE, [50.0, 50.0, 60.0, 60.0], [80.0, 0.0, 90.0, 10.0]]
    # box 1 is decayed to 0 (IoU 1); box 2 starts below min_score; box 3 survives
    keep, scores = _run(
        boxes, [0.9, 0.8, 0.04, 0.3], [0, 0, 0, 0], iou_threshold=0.5, min_score=0.05
    )
    assert keep.tolist() == [0, 3]
    torch.testing.assert_close(scores, torch.tensor([0.9, 0.3]))
    # decayed exactly as mmcv: 0.8 * (1 - 0.5) = 0.4 is dropped with min_score 0.5
    keep, scores = _run([SQUARE, HALF_SQUARE], [0.9, 0.8], [0, 0], iou_threshold=0.5, min_score=0.5)
    assert keep.tolist() == [0]


def test_first_selected_box_is_never_dropped():
    # as in mmcv's kernel, min_score is only checked on the boxes remaining after a selection
    keep, scores = _run(
        [SQUARE, _disjoint_boxes(2)[1]], [0.01, 0.005], [0, 0], iou_threshold=0.5, min_score=0.1
    )
    assert keep.tolist() == [0]
    torch.testing.assert_close(scores, torch.tensor([0.01]))


def test_output_order_and_max_keep():
    boxes = [SQUARE, HALF_SQUARE, [50.0, 50.0, 60.0, 60.0]]
    keep, scores = _run(boxes, [0.9, 0.8, 0.5], [0, 0, 0], iou_threshold=0.3)
    assert keep.tolist() == [0, 2, 1]
    torch.testing.assert_close(scores, torch.tensor([0.9, 0.5, 0.4]))

    keep, scores = _run(
        _disjoint_boxes(5), [0.3, 0.9, 0.5, 0.7, 0.1], [0] * 5, iou_threshold=0.5, max_keep=3
    )
    assert keep.tolist() == [1, 3, 2]
    torch.testing.assert_close(scores, torch.tensor([0.9, 0.7, 0.5]))
    keep, scores = _run(_disjoint_boxes(5), [0.3] * 5, [0] * 5, iou_threshold=0.5, max_keep=0)
    assert keep.shape == (0,) and scores.shape == (0,)


def test_ties_follow_the_kernel_swaps():
    # selecting box 1 first swaps box 0 to its place; box 0 then comes before box 2
    keep, _ = _run(_disjoint_boxes(3), [0.5, 0.9, 0.5], [0, 0, 0], iou_threshold=0.5)
    assert keep.tolist() == [1, 0, 2]
    # box 1 is dropped and replaced by the last box (3), which then precedes box 2
    boxes = [SQUARE, SQUARE] + _disjoint_boxes(4)[2:]
    keep, _ = _run(boxes, [0.9, 0.5, 0.5, 0.5], [0, 0, 0, 0], iou_threshold=0.5)
    assert keep.tolist() == [0, 3, 2]


def test_empty_input():
    keep, scores = batched_soft_nms(
        torch.zeros(0, 4),
        torch.zeros(0),
        torch.zeros(0, dtype=torch.long),
        iou_threshold=0.5,
        max_keep=10,
    )
    assert keep.shape == (0,) and keep.dtype == torch.long
    assert scores.shape == (0,) and scores.dtype == torch.float32


def test_invalid_arguments():
    with pytest.raises(ValueError, match="boxes"):
        batched_soft_nms(
            torch.zeros(3, 5), torch.zeros(3), torch.zeros(3), iou_threshold=0.5, max_keep=1
        )
    with pytest.raises(ValueError, match="scores and labels"):
        batched_soft_nms(
            torch.zeros(3, 4), torch.zeros(2), torch.zeros(3), iou_threshold=0.5, max_keep=1
        )
    with pytest.raises(ValueError, match="max_keep"):
        batched_soft_nms(
            torch.zeros(3, 4), torch.zeros(3), torch.zeros(3), iou_threshold=0.5, max_keep=-1
        )


def _mmcv_soft_nms_reference(boxes, scores, labels, iou_threshold, min_score):
    """
    Per-box port of mmcv 1.5.0 ``batched_nms`` + CPU ``softnms`` (linear, offset 0) in float32
    arithmetic. Returns (kept input indices, decayed scores) in mmcv's output order.
    """
    boxes = boxes.numpy().astype(np.float32)
    offsets = labels.numpy().astype(np.float32) * (boxes.max() + np.float32(1))
    shifted = boxes + offsets[:, None]
    x1, y1, x2, y2 = (list(shifted[:, k]) for k in range(4))
    score = list(scores.numpy().astype(np.float32))
    area = [(x2[i] - x1[i]) * (y2[i] - y1[i]) for i in range(len(score))]
    index = list(range(len(score)))
    arrays = (x1, y1, x2, y2, score, area, index)
    threshold, min_score = np.float32(iou_threshold), np.float32(min_score)
    num_alive = len(score)
    kept_scores = []
    i = 0
    while i < num_alive:
        max_pos = i
        for pos in range(i + 1, num_alive):
            if score[max_pos] < score[pos]:
                max_pos = pos
        for array in arrays:
            array[i], array[max_pos] = array[max_pos], array[i]
        kept_scores.append(score[i])
        pos = i + 1
        while pos < num_alive:
            w = max(np.float32(0), min(x2[i], x2[pos]) - max(x1[i], x1[pos]))
            h = max(np.float32(0), min(y2[i], y2[pos]) - max(y1[i], y1[pos]))
            inter = w * h
            with np.errstate(divide="ignore", invalid="ignore"):
                overlap = inter / (area[i] + area[pos] - inter)
            if overlap >= threshold:
                score[pos] = score[pos] * (np.float32(1) - overlap)
            if score[pos] < min_score:
                for array in arrays:
                    array[pos] = array[num_alive - 1]
                num_alive -= 1
                pos -= 1
            pos += 1
        i += 1
    return index[:num_alive], kept_scores


@pytest.mark.parametrize("seed", range(6))
def test_matches_per_box_reference(seed):
    generator = torch.Generator().manual_seed(seed)
    num_boxes = 120
    centers = torch.rand(num_boxes, 2, generator=generator) * 60
    sizes = torch.rand(num_boxes, 2, generator=generator) * 30 + 5
    boxes = torch.cat([centers - sizes / 2, centers + sizes / 2], dim=1).clamp(min=0)
    boxes[10:20] = boxes[:10]  # exact duplicates
    boxes[20] = torch.tensor([3.0, 3.0, 3.0, 9.0])  # zero area
    # coarse scores create many ties
    scores = torch.randint(1, 20, (num_boxes,), generator=generator).float() / 20
    scores[::7] = torch.rand(len(scores[::7]), generator=generator)
    labels = torch.randint(0, 3, (num_boxes,), generator=generator)
    iou_threshold, min_score = [(0.3, 1e-3), (0.5, 0.05), (0.8, 1e-3)][seed % 3]
    expected_keep, expected_scores = _mmcv_soft_nms_reference(
        boxes, scores, labels, iou_threshold, min_score
    )
    assert len(expected_keep) > 20
    for max_keep in (num_boxes, 15):
        keep, kept_scores = batched_soft_nms(
            boxes,
            scores,
            labels,
            iou_threshold=iou_threshold,
            min_score=min_score,
            max_keep=max_keep,
        )
        assert keep.tolist() == expected_keep[:max_keep]
        assert kept_scores.tolist() == [float(s) for s in expected_scores[:max_keep]]


@pytest.mark.parametrize("seed", range(3))
def test_from_the_split_threshold_each_class_is_solved_alone(seed, monkeypatch):
    # mmcv's batched_nms from split_thr boxes on: one soft-NMS per class on the shifted boxes,
    # then all kept boxes by decayed score (ties here in input order)
    import codetr.layers.soft_nms as soft_nms_module

    monkeypatch.setattr(soft_nms_module, "SPLIT_THRESHOLD", 50)
    generator = torch.Generator().manual_seed(seed)
    num_boxes = 120
    centers = torch.rand(num_boxes, 2, generator=generator) * 60
    sizes = torch.rand(num_boxes, 2, generator=generator) * 30 + 5
    boxes = torch.cat([centers - sizes / 2, centers + sizes / 2], dim=1).clamp(min=0)
    boxes[10:20] = boxes[:10]  # exact duplicates
    scores = torch.randint(1, 20, (num_boxes,), generator=generator).float() / 20  # ties
    labels = torch.randint(0, 4, (num_boxes,), generator=generator)
    shifted = boxes + (labels.float() * (boxes.max() + 1))[:, None]
    expected = []
    for label in range(4):
        members = (labels == label).nonzero().squeeze(1)
        keep, kept = _mmcv_soft_nms_reference(
            shifted[members], scores[members], torch.zeros_like(members), 0.5, 1e-3
        )
        expected += [(float(s), int(members[k])) for k, s in zip(keep, kept)]
    expected.sort(key=lambda pair: (-pair[0], pair[1]))
    for max_keep in (num_boxes, 15):
        keep, kept_scores = batched_soft_nms(
            boxes, scores, labels, iou_threshold=0.5, max_keep=max_keep
        )
        assert keep.tolist() == [index for _, index in expected[:max_keep]]
        assert kept_scores.tolist() == [score for score, _ in expected[:max_keep]]
