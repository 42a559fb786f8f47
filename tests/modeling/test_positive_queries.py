import math

import pytest
import torch

from codetr.modeling import DINOPositiveQueryBuilder, QueryGroup
from codetr.modeling.aux_heads.base import AssignedCoords

NUM_CLASSES = 3
EMBED_DIM = 8
BACKGROUND = NUM_CLASSES


def _builder(**kwargs):
    torch.manual_seed(0)
    args = dict(
        num_heads=2, embed_dim=EMBED_DIM, num_classes=NUM_CLASSES, min_queries=3, max_queries=5
    )
    args.update(kwargs)
    return DINOPositiveQueryBuilder(**args)


def _assignment(labels, seed=0):
    """Entry i has box (i, i, i + 10, i + 20) and target (i, i, i + 12, i + 22) + 100, so
    that selected entries can be identified from their boxes."""
    labels = torch.tensor(labels, dtype=torch.int64)
    index = torch.arange(len(labels), dtype=torch.float32)[:, None]
    boxes = torch.cat([index, index, index + 10, index + 20], 1)
    targets = torch.cat([index, index, index + 12, index + 22], 1) + 100
    return AssignedCoords(boxes=boxes, labels=labels, target_boxes=targets)


def _entries(queries, image, normalizer):
    """Indices of the entries chosen for ``image`` (from the x1 of their normalised box)."""
    x1 = queries.reference_boxes[image, :, 0] - queries.reference_boxes[image, :, 2] / 2
    return (x1 * normalizer).round().long().tolist()


def _proposal_sine_embedding(boxes, num_feats):
    """The authors' two-stage proposal embedding of (..., 4) boxes, written out: the box
    through a clamped logit and back, times 2 pi, over temperature 10000; per coordinate
    interleaved sin / cos, order (x, y, w, h)."""
    x = boxes.clamp(0, 1)
    logit = torch.log(x.clamp(min=1e-5) / (1 - x).clamp(min=1e-5))
    scaled = logit.sigmoid() * 2 * math.pi
    dim_t = torch.arange(num_feats, dtype=torch.float32)
    dim_t = 10000 ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    pos = scaled[..., None] / dim_t
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), -1).flatten(-2).flatten(-2)


@pytest.mark.parametrize(
    "positives, expected",
    [
        ([1, 2], 3),  # below the minimum
        ([4, 2], 4),  # the batch maximum
        ([0, 7], 5),  # above the maximum
        ([0, 0], 3),  # no positive anywhere
    ],
)
def test_query_count_rule(positives, expected):
    builder = _builder()
    assignments = [_assignment([0] * n + [BACKGROUND] * 6) for n in positives]
    assert builder.query_count(assignments) == expected
    queries = builder(0, assignments, torch.full((2, 4), 100.0), {})
    assert queries.content.shape == (2, expected, EMBED_DIM)
    assert queries.reference_boxes.shape == (2, expected, 4)
    assert queries.target_labels.shape == (2, expected)
    assert queries.target_boxes.shape == (2, expected, 4)


def test_constructor_rejects_bad_bounds():
    with pytest.raises(ValueError, match="min_queries"):
        _builder(min_queries=0)
    with pytest.raises(ValueError, match="min_queries"):
        _builder(min_queries=6, max_queries=5)


def test_extra_positives_dropped_at_random():
    builder = _builder()
    labels = [0, BACKGROUND, 1, 2, BACKGROUND, 0, 1, BACKGROUND, 2, 0]
    positive_entries = {i for i, label in enumerate(labels) if label < NUM_CLASSES}
    assert len(positive_entries) == 7
    chosen_sets = set()
    for seed in range(8):
        torch.manual_seed(seed)
        queries = builder(0, [_assignment(labels)], torch.full((1, 4), 100.0), {})
        entries = _entries(queries, 0, 100.0)
        assert len(entries) == 5 and len(set(entries)) == 5
        assert set(entries) <= positive_entries
        assert all(queries.target_labels[0, k] == labels[e] for k, e in enumerate(entries))
        chosen_sets.add(frozenset(entries))
    assert len(chosen_sets) > 1  # a random subset, not always the same one


def test_padding_with_negatives_as_background():
    builder = _builder(min_queries=4)
    labels = [BACKGROUND, 2, BACKGROUND, BACKGROUND, BACKGROUND, BACKGROUND]
    for seed in range(4):
        torch.manual_seed(seed)
        queries = builder(1, [_assignment(labels)], torch.full((1, 4), 100.0), {})
        entries = _entries(queries, 0, 100.0)
        # the positive first, then 3 distinct negatives of the same head
        assert entries[0] == 1
        assert len(set(entries[1:])) == 3 and set(entries[1:]) <= {0, 2, 3, 4, 5}
        assert queries.target_labels[0].tolist() == [2, BACKGROUND, BACKGROUND, BACKGROUND]


def test_too_few_negatives_are_repeated():
    builder = _builder(min_queries=4)
    queries = builder(0, [_assignment([1, BACKGROUND])], torch.full((1, 4), 100.0), {})
    assert _entries(queries, 0, 100.0) == [0, 1, 1, 1]
    assert queries.target_labels[0].tolist() == [1, BACKGROUND, BACKGROUND, BACKGROUND]


def test_error_when_no_negative_to_pad_with():
    builder = _builder(min_queries=3)
    with pytest.raises(ValueError, match="no background"):
        builder(0, [_assignment([1, 2])], torch.full((1, 4), 100.0), {})


def test_normalisation_and_cxcywh_hand_case():
    builder = _builder(min_queries=1, max_queries=4)
    image0 = AssignedCoords(
        boxes=torch.tensor([[10.0, 5.0, 30.0, 25.0]]),
        labels=torch.tensor([2]),
        target_boxes=torch.tensor([[20.0, 10.0, 60.0, 40.0]]),
    )
    image1 = AssignedCoords(
        boxes=torch.tensor([[0.0, 0.0, 40.0, 20.0], [4.0, 8.0, 8.0, 16.0]]),
        labels=torch.tensor([BACKGROUND, 0]),
        target_boxes=torch.tensor([[0.0, 0.0, 0.0, 0.0], [2.0, 4.0, 10.0, 20.0]]),
    )
    # image 0 is 100 wide and 50 high, image 1 is 40 x 40
    normalizers = torch.tensor([[100.0, 50.0, 100.0, 50.0], [40.0, 40.0, 40.0, 40.0]])
    queries = builder(0, [image0, image1], normalizers, {})
    assert isinstance(queries, QueryGroup)
    # count 1: image 1 keeps its only positive
    expected_boxes = torch.tensor([[[0.2, 0.3, 0.2, 0.4]], [[0.15, 0.3, 0.1, 0.2]]])
    expected_targets = torch.tensor([[[0.4, 0.5, 0.4, 0.6]], [[0.15, 0.3, 0.2, 0.4]]])
    torch.testing.assert_close(queries.reference_boxes, expected_boxes)
    torch.testing.assert_close(queries.target_boxes, expected_targets)
    assert queries.target_labels.tolist() == [[2], [0]]
    assert queries.query_pos is None and queries.self_attn_mask is None
    torch.testing.assert_close(queries.box_normalizers, normalizers)


def test_content_is_the_projected_sine_embedding_of_the_box():
    builder = _builder(min_queries=2, max_queries=2)
    assignment = AssignedCoords(
        boxes=torch.tensor([[10.0, 20.0, 50.0, 60.0], [-10.0, 0.0, 30.0, 120.0]]),
        labels=torch.tensor([0, 1]),
        target_boxes=torch.zeros(2, 4),
    )
    normalizers = torch.tensor([[100.0, 100.0, 100.0, 100.0]])
    for head in (0, 1):
        queries = builder(head, [assignment], normalizers, {})
        embedding = _proposal_sine_embedding(queries.reference_boxes, EMBED_DIM // 2)
        assert embedding.shape == (1, 2, 2 * EMBED_DIM)
        expected = builder.norms[head](builder.projections[head](embedding))
        torch.testing.assert_close(queries.content, expected)
    # the boxes are detached, the content trains the projections
    assert not queries.reference_boxes.requires_grad
    queries.content.pow(2).sum().backward()
    assert builder.projections[1].weight.grad.abs().sum() > 0
    assert builder.projections[0].weight.grad is None


def test_query_group_takes_keywords_only():
    tensors = dict(
        content=torch.zeros(2, 3, EMBED_DIM),
        reference_boxes=torch.zeros(2, 3, 4),
        target_labels=torch.zeros(2, 3, dtype=torch.int64),
        target_boxes=torch.zeros(2, 3, 4),
        box_normalizers=torch.ones(2, 4),
    )
    group = QueryGroup(**tensors)
    assert group.num_queries == 3
    assert group.query_pos is None and group.self_attn_mask is None
    with pytest.raises(TypeError):
        QueryGroup(*tensors.values())
