import pytest
import torch

from torchvision.ops import box_convert
from codetr.modeling import QueryGroup
from codetr.modeling.random_draws import RandomDraws, random_draws_from
from codetr.modeling.transformer import ContrastiveDenoising

from .tiny_models import normalized_target

NUM_CLASSES = 5
EMBED_DIM = 8
NUM_MATCHING = 4


def _num_positives(queries):
    """Queries supervised with a class (the others are background)."""
    return int((queries.target_labels < NUM_CLASSES).sum())


def _denoising(**kwargs):
    torch.manual_seed(0)
    args = dict(num_classes=NUM_CLASSES, embed_dim=EMBED_DIM, num_dn_queries=6)
    args.update(kwargs)
    return ContrastiveDenoising(**args)


def _targets(counts, seed=0):
    """Per image ``counts[i]`` objects with distinct labels and small boxes well inside the
    image (so that noise never needs clamping)."""
    generator = torch.Generator().manual_seed(seed)
    targets = []
    for count in counts:
        centres = torch.rand(count, 2, generator=generator) * 0.4 + 0.3
        sizes = torch.rand(count, 2, generator=generator) * 0.05 + 0.05
        labels = torch.arange(count) % NUM_CLASSES
        targets.append(normalized_target(labels, torch.cat([centres, sizes], -1)))
    return targets


def _labels_from_content(denoising, content):
    """Recovers the (noised) label of every slot from its label embedding (-1: zero slot)."""
    weight = denoising.label_embedding.weight
    distances = (content[..., None, :] - weight).abs().sum(-1)  # (B, D, K)
    labels = distances.argmin(-1)
    assert torch.all(distances.min(-1)[0][content.abs().sum(-1) > 0] < 1e-6)
    return torch.where(content.abs().sum(-1) > 0, labels, torch.full_like(labels, -1))


@pytest.mark.parametrize(
    "counts, num_dn_queries, expected_groups",
    [
        ([2, 1], 6, 3),  # 6 // 2
        ([3, 1], 10, 3),  # 10 // 3
        ([4], 3, 1),  # 3 // 4 = 0 -> at least 1
        ([0, 0], 6, 1),  # no object in the batch
    ],
)
def test_group_count_rule(counts, num_dn_queries, expected_groups):
    denoising = _denoising(num_dn_queries=num_dn_queries)
    queries = denoising(_targets(counts), NUM_MATCHING)
    max_gts = max(counts)
    num_dn = expected_groups * 2 * max_gts
    assert queries.num_queries == num_dn
    assert queries.content.shape == (len(counts), num_dn, EMBED_DIM)
    assert queries.reference_boxes.shape == (len(counts), num_dn, 4)
    assert queries.target_labels.shape == (len(counts), num_dn)
    assert queries.target_boxes.shape == (len(counts), num_dn, 4)
    assert queries.self_attn_mask.shape == (num_dn + NUM_MATCHING,) * 2
    assert _num_positives(queries) == expected_groups * sum(counts)


def test_rejects_non_positive_num_dn_queries():
    with pytest.raises(ValueError, match="num_dn_queries"):
        _denoising(num_dn_queries=0)


def test_slot_layout_and_targets_without_noise():
    # image 0 has 2 objects, image 1 has 1: max_gts = 2, 3 groups of 4 slots
    denoising = _denoising(label_noise_ratio=0.0, box_noise_scale=0.0)
    targets = [
        normalized_target([3, 1], [[0.3, 0.4, 0.2, 0.2], [0.6, 0.5, 0.1, 0.3]]),
        normalized_target([4], [[0.5, 0.5, 0.4, 0.2]]),
    ]
    queries = denoising(targets, NUM_MATCHING)
    assert isinstance(queries, QueryGroup)
    assert queries.num_queries == 12
    assert queries.query_pos is None  # the decoder derives it from the reference boxes
    torch.testing.assert_close(
        queries.box_normalizers, torch.stack([t["box_normalizer"] for t in targets])
    )
    background = NUM_CLASSES
    # per group: positives (slots 0, 1) then negatives (slots 2, 3)
    assert queries.target_labels[0].tolist() == [3, 1, background, background] * 3
    assert queries.target_labels[1].tolist() == [4, background, background, background] * 3
    assert _labels_from_content(denoising, queries.content)[0].tolist() == [3, 1, 3, 1] * 3
    # image 1's second positive and second negative slots are padding: zero content
    assert _labels_from_content(denoising, queries.content)[1].tolist() == [4, -1, 4, -1] * 3

    for group in range(3):
        start = 4 * group
        torch.testing.assert_close(queries.target_boxes[0, start : start + 2], targets[0]["boxes"])
        torch.testing.assert_close(queries.target_boxes[1, start], targets[1]["boxes"][0])
        # without noise positives and negatives sit on the ground truth (through a logit
        # clamped at 1e-3)
        torch.testing.assert_close(
            queries.reference_boxes[0, start : start + 2], targets[0]["boxes"]
        )
        torch.testing.assert_close(
            queries.reference_boxes[0, start + 2 : start + 4], targets[0]["boxes"]
        )
        torch.testing.assert_close(queries.reference_boxes[1, start + 2], targets[1]["boxes"][0])
        # padding slots: zero logits, i.e. boxes at 0.5
        for slot in (start + 1, start + 3):
            torch.testing.assert_close(queries.reference_boxes[1, slot], torch.full((4,), 0.5))
    assert (queries.target_boxes[0, 2::4] == 0).all() and (queries.target_boxes[0, 3::4] == 0).all()
    assert (queries.target_boxes[1, 1::4] == 0).all()
    assert _num_positives(queries) == 9


def test_queries_from_query_boxes_targets_from_boxes():
    # the two differ by rounding only in the model (CoDETR.normalized_targets); here they
    # differ visibly, so that each output shows which one it was made from
    denoising = _denoising(label_noise_ratio=0.0, box_noise_scale=0.0)
    target = normalized_target([3, 1], [[0.3, 0.4, 0.2, 0.2], [0.6, 0.5, 0.1, 0.3]])
    target["query_boxes"] = target["boxes"] + torch.tensor([0.02, -0.01, 0.01, 0.02])
    queries = denoising([target], NUM_MATCHING)
    num_groups = 6 // 2
    reference = queries.reference_boxes[0].view(num_groups, 2, 2, 4)
    for group in range(num_groups):
        for kind in range(2):  # positives, negatives
            torch.testing.assert_close(reference[group, kind], target["query_boxes"])
    targets = queries.target_boxes[0].view(num_groups, 2, 2, 4)
    torch.testing.assert_close(targets[:, 0], target["boxes"].expand(num_groups, 2, 4))
    assert (targets[:, 1] == 0).all()


class _ScriptedDraws(RandomDraws):
    """Records every draw and answers with the values it was given, by purpose."""

    def __init__(self, values):
        self.values = values
        self.calls = []

    def uniform(self, purpose, shape, device):
        self.calls.append((purpose, tuple(shape)))
        return self.values[purpose].float().expand(tuple(shape)).clone()

    def integers(self, purpose, high, shape, device):
        self.calls.append((purpose, tuple(shape)))
        assert high == (NUM_CLASSES if purpose == "denoising.label" else 2), purpose
        return self.values[purpose].long().expand(tuple(shape)).clone()


def test_random_draws_labels_only_for_flipped_entries():
    # one image with 2 objects, 2 groups: 8 noised entries, ordered (group 0 positives,
    # group 0 negatives, group 1 positives, group 1 negatives), which is also the slot order
    denoising = _denoising(num_dn_queries=4, label_noise_ratio=0.5, box_noise_scale=1.0)
    boxes = torch.tensor([[0.3, 0.4, 0.2, 0.2], [0.6, 0.5, 0.1, 0.3]])
    target = normalized_target([3, 1], boxes)
    draws = _ScriptedDraws(
        {
            # flipped where < 0.5 / 2: entries 0, 3 and 6
            "denoising.label_flip": torch.tensor([0.0, 0.9, 0.9, 0.1, 0.9, 0.25, 0.2, 0.9]),
            "denoising.label": torch.tensor([4, 0, 2]),
            # x corners move right, y corners up, by 0.5 (positives) or 1.5 (negatives)
            # times the half size
            "denoising.box_sign": torch.tensor([[1, 0, 1, 0]]),
            "denoising.box_shift": torch.tensor([[0.5]]),
        }
    )
    with random_draws_from(draws):
        queries = denoising([target], NUM_MATCHING)
    assert draws.calls == [
        ("denoising.label_flip", (8,)),
        ("denoising.label", (3,)),
        ("denoising.box_sign", (8, 4)),
        ("denoising.box_shift", (8, 4)),
    ]
    assert _labels_from_content(denoising, queries.content)[0].tolist() == [4, 1, 3, 0, 3, 1, 2, 1]
    background = NUM_CLASSES
    assert queries.target_labels[0].tolist() == [3, 1, background, background] * 2

    shift = torch.stack([boxes[:, 2] / 2, -boxes[:, 3] / 2], -1)  # (cx, cy) per unit of noise
    for group in range(2):
        for kind, magnitude in ((0, 0.5), (1, 1.5)):
            start = 4 * group + 2 * kind
            expected = torch.cat([boxes[:, :2] + magnitude * shift, boxes[:, 2:]], -1)
            torch.testing.assert_close(queries.reference_boxes[0, start : start + 2], expected)


def test_attention_mask_structure():
    denoising = _denoising(num_dn_queries=6)
    queries = denoising(_targets([2, 1]), NUM_MATCHING)
    num_dn = queries.num_queries
    assert num_dn == 12
    expected = torch.zeros(16, 16, dtype=torch.bool)
    # groups of 4 denoising queries see only their own group
    for row in range(12):
        for col in range(12):
            expected[row, col] = row // 4 != col // 4
    # matching queries cannot see any denoising query; they see each other
    expected[12:, :12] = True
    assert torch.equal(queries.self_attn_mask, expected)
    assert queries.self_attn_mask.dtype == torch.bool
    # denoising queries may see the matching queries (as in the authors' generator)
    assert not queries.self_attn_mask[:12, 12:].any()


def test_batch_with_an_image_without_objects():
    denoising = _denoising(label_noise_ratio=0.0, box_noise_scale=0.0)
    targets = _targets([2, 0])
    queries = denoising(targets, NUM_MATCHING)
    assert queries.num_queries == 12
    assert (queries.target_labels[1] == NUM_CLASSES).all()
    assert (queries.content[1] == 0).all()
    torch.testing.assert_close(queries.reference_boxes[1], torch.full((12, 4), 0.5))
    assert _num_positives(queries) == 6
    assert queries.target_labels[0].tolist() == [0, 1, NUM_CLASSES, NUM_CLASSES] * 3


def test_batch_without_objects():
    denoising = _denoising()
    queries = denoising(_targets([0, 0]), NUM_MATCHING)
    assert queries.num_queries == 0
    assert queries.content.shape == (2, 0, EMBED_DIM)
    assert queries.reference_boxes.shape == (2, 0, 4)
    assert queries.target_labels.shape == (2, 0)
    assert _num_positives(queries) == 0
    assert torch.equal(
        queries.self_attn_mask, torch.zeros(NUM_MATCHING, NUM_MATCHING, dtype=torch.bool)
    )


def test_label_flip_rate():
    # a label is replaced with probability label_noise_ratio / 2 by a uniformly drawn class,
    # which differs from the true one with probability (K - 1) / K
    torch.manual_seed(123)
    denoising = _denoising(num_dn_queries=400, label_noise_ratio=0.5, box_noise_scale=0.0)
    targets = _targets([5, 5, 5])
    changed, total = 0, 0
    for _ in range(10):
        queries = denoising(targets, NUM_MATCHING)
        noised = _labels_from_content(denoising, queries.content)
        true = torch.stack([t["labels"] for t in targets]).repeat(1, 2 * 80)
        changed += int((noised != true).sum())
        total += true.numel()
    assert total == 10 * 3 * 800
    rate = changed / total
    assert abs(rate - 0.25 * 4 / 5) < 0.02, rate


def _corner_displacement(reference_boxes, targets, num_groups, max_gts):
    """
    |noised corner - true corner| / (half width or height), per (image, group, positive /
    negative, object, corner) of the real (non-padding) slots, relative to the boxes the
    queries are built from ("query_boxes"), with a validity mask: a negative whose corners
    crossed over along an axis (x1 > x2) has a negative size, which the logit of the reference
    boxes clamps to ~0 (as in the authors' code), so its corners on that axis are no longer the
    noised ones and are left out (as is a box noised thinner than that clamp).
    """
    corners = box_convert(reference_boxes, "cxcywh", "xyxy")
    results = []
    for image, target in enumerate(targets):
        count = len(target["labels"])
        slots = corners[image].view(num_groups, 2, max_gts, 4)[:, :, :count]
        sizes = reference_boxes[image].view(num_groups, 2, max_gts, 4)[:, :, :count, 2:]
        half_wh = target["query_boxes"][:, 2:].repeat(1, 2) / 2
        displacement = (
            (slots - box_convert(target["query_boxes"], "cxcywh", "xyxy")) / half_wh
        ).abs()
        valid = (sizes > 2e-3).repeat(1, 1, 1, 2)
        results.append(
            (
                displacement,
                valid,
                torch.sign(slots - box_convert(target["query_boxes"], "cxcywh", "xyxy")),
            )
        )
    return results


def test_box_noise_bounds():
    torch.manual_seed(7)
    denoising = _denoising(num_dn_queries=200, label_noise_ratio=0.0, box_noise_scale=1.0)
    targets = _targets([3, 2])
    queries = denoising(targets, NUM_MATCHING)
    num_groups = 200 // 3
    assert queries.num_queries == num_groups * 6
    tol = 1e-3
    for displacement, valid, signs in _corner_displacement(
        queries.reference_boxes, targets, num_groups, max_gts=3
    ):
        positives = displacement[:, 0][valid[:, 0]]
        negatives = displacement[:, 1][valid[:, 1]]
        # positives never cross over: every corner moved by U(0, 1) * half size. Where both
        # corners of an axis moved nearly half the size inwards (a chance of ~1e-3 per axis
        # for these sizes) the box is thinner than the logit clamp and is left out like a
        # crossed-over negative; requiring none of those made the test fail for ~1 seed in 8.
        assert valid[:, 0].float().mean() > 0.98
        assert positives.max() < 1 + tol and positives.min() >= 0
        # negatives moved by U(1, 2) * half size; about a quarter cross over per axis
        assert negatives.min() > 1 - tol and negatives.max() < 2 + tol
        assert 0.6 < valid[:, 1].float().mean() < 0.9
        # the noise fills its range and moves in both directions
        assert positives.max() > 0.9 and positives.min() < 0.1
        assert negatives.max() > 1.9 and negatives.min() < 1.1
        assert (signs[:, 0] > 0).any() and (signs[:, 0] < 0).any()


def test_box_noise_scale_and_clamping():
    torch.manual_seed(0)
    denoising = _denoising(num_dn_queries=100, label_noise_ratio=0.0, box_noise_scale=0.5)
    target = normalized_target([2], [[0.5, 0.5, 0.2, 0.2]])
    queries = denoising([target], NUM_MATCHING)
    ((displacement, valid, _),) = _corner_displacement(
        queries.reference_boxes, [target], num_groups=100, max_gts=1
    )
    assert displacement[:, 0].max() < 0.5 + 1e-3
    negatives = displacement[:, 1][valid[:, 1]]
    assert negatives.min() > 0.5 - 1e-3 and negatives.max() < 1 + 1e-3

    # a box touching the border: noised corners are clamped to [0, 1]
    border = normalized_target([0], [[0.1, 0.9, 0.2, 0.2]])
    queries = _denoising(num_dn_queries=100, label_noise_ratio=0.0)([border], NUM_MATCHING)
    corners = box_convert(queries.reference_boxes[0], "cxcywh", "xyxy")
    assert corners.min() > -1e-3 and corners.max() < 1 + 1e-3
    assert (corners[:, 0] < 1e-2).any() and (corners[:, 3] > 1 - 1e-2).any()


def test_label_embedding_receives_gradient():
    denoising = _denoising()
    queries = denoising(_targets([2, 1]), NUM_MATCHING)
    queries.content.sum().backward()
    grad = denoising.label_embedding.weight.grad
    assert grad is not None and grad.abs().sum() > 0
