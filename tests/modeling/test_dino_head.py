import math

import pytest
import torch

from codetr.modeling.query_heads import DINOHead, detr_detections
from codetr.modeling.transformer import encoder_proposals

from .tiny_models import (
    EMBED_DIM,
    MAX_DETECTIONS,
    NUM_CLASSES,
    NUM_QUERIES,
    build_tiny_dino,
    normalized_target,
    synthetic_batch,
)

LOSS_NAMES = {"loss_class", "loss_bbox", "loss_giou"}
# 2 decoder layers: the last one unprefixed, the first one "d0."
EXPECTED_KEYS = {
    f"{prefix}{name}" for prefix in ("", "d0.", "enc_", "dn_", "d0.dn_") for name in LOSS_NAMES
}

TWO_IMAGES = dict(
    image_sizes=[(64, 64), (48, 56)],
    boxes=[[[4, 4, 30, 40], [10, 12, 60, 58]], [[0, 0, 20, 20]]],
    classes=[[1, 2], [4]],
)


@pytest.fixture(scope="module")
def model():
    return build_tiny_dino(seed=0)


def _training_step(model, batched_inputs, seed=0):
    torch.manual_seed(seed)
    model.train()
    model.zero_grad(set_to_none=True)
    losses = model(batched_inputs)
    sum(losses.values()).backward()
    return losses


def _assert_finite_with_gradients(model, losses):
    assert set(losses) == EXPECTED_KEYS
    for name, value in losses.items():
        assert value.dim() == 0, name
        assert torch.isfinite(value), name
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name


def test_tiny_model_structure(model):
    head = model.query_head
    assert isinstance(head, DINOHead)
    assert head.num_classes == NUM_CLASSES and head.num_queries == NUM_QUERIES
    assert head.decoder.num_layers == 2 and len(head.encoder.layers) == 2
    # one class / box head per decoder layer plus the encoder proposal head
    assert len(head.class_heads) == len(head.box_heads) == 3
    assert head.query_embed.weight.shape == (NUM_QUERIES, EMBED_DIM)
    assert head.denoising.label_embedding.weight.shape == (NUM_CLASSES, EMBED_DIM)
    assert head.level_embeds.shape == (5, EMBED_DIM)
    # prediction heads start at the focal prior and with zero box deltas
    for class_head in head.class_heads:
        torch.testing.assert_close(class_head.bias, torch.full((NUM_CLASSES,), -math.log(99.0)))
    for box_head in head.box_heads:
        assert (box_head[-1].weight == 0).all() and (box_head[-1].bias == 0).all()


def test_training_step_losses_and_gradients(model):
    losses = _training_step(model, synthetic_batch(**TWO_IMAGES))
    _assert_finite_with_gradients(model, losses)
    # there are objects: every box loss is positive
    for name, value in losses.items():
        assert value > 0, name
    # frozen backbone stages stay frozen
    assert not any(p.requires_grad for p in model.backbone.stem.parameters())


def test_training_step_batch_size_one(model):
    inputs = synthetic_batch([(64, 48)], [[[8, 8, 40, 30]]], [[3]])
    losses = _training_step(model, inputs)
    _assert_finite_with_gradients(model, losses)


def test_training_step_with_an_image_without_objects(model):
    inputs = synthetic_batch([(64, 64), (64, 64)], [[[8, 8, 40, 30]], []], [[3], []])
    losses = _training_step(model, inputs)
    _assert_finite_with_gradients(model, losses)
    assert losses["dn_loss_bbox"] > 0


def test_training_step_without_any_object(model):
    inputs = synthetic_batch([(64, 64), (48, 64)], [[], []], [[], []])
    losses = _training_step(model, inputs)
    _assert_finite_with_gradients(model, losses)
    for prefix in ("", "d0.", "enc_", "dn_", "d0.dn_"):
        assert losses[f"{prefix}loss_bbox"] == 0 and losses[f"{prefix}loss_giou"] == 0
        assert losses[f"{prefix}loss_class"] >= 0
    assert losses["loss_class"] > 0  # every query is pushed towards background


def _encode(model, batched_inputs):
    images = model.preprocess_image(batched_inputs)
    features = model.neck(model.backbone(images.tensor))
    return model.query_head.encode(features, model.padding_mask(images))


def test_proposals_ranked_by_best_class_logit(model):
    model.eval()
    head = model.query_head
    with torch.no_grad():
        memory = _encode(model, synthetic_batch(**TWO_IMAGES))
        logits, boxes = head.select_proposals(memory)
        tokens, proposals = encoder_proposals(memory)
        tokens = head.enc_output_norm(head.enc_output(tokens))
        all_logits = head.class_heads[-1](tokens)
        all_boxes = (head.box_heads[-1](tokens) + proposals).sigmoid()
    assert logits.shape == (2, NUM_QUERIES, NUM_CLASSES) and boxes.shape == (2, NUM_QUERIES, 4)
    best = all_logits.max(-1)[0]
    for image in range(2):
        # the kept proposals are the NUM_QUERIES best by their best class, best first
        order = best[image].argsort(descending=True)[:NUM_QUERIES]
        torch.testing.assert_close(logits[image], all_logits[image, order])
        torch.testing.assert_close(boxes[image], all_boxes[image, order])


def test_matching_queries_do_not_depend_on_denoising_queries(model):
    model.eval()
    head = model.query_head
    # the images' (w, h): 64 x 64 and 56 x 48
    targets = [
        normalized_target([1, 2], [[0.3, 0.3, 0.2, 0.4], [0.6, 0.5, 0.3, 0.3]], (64.0, 64.0)),
        normalized_target([4], [[0.2, 0.2, 0.3, 0.3]], (56.0, 48.0)),
    ]
    with torch.no_grad():
        memory = _encode(model, synthetic_batch(**TWO_IMAGES))
        denoising = head.denoising(targets, NUM_QUERIES)
        with_dn = head.decode(memory, denoising)
        without_dn = head.decode(memory)
    num_dn = denoising.num_queries
    assert num_dn == 2 * 2 * (20 // 2)
    assert with_dn["dn_logits"].shape == (2, 2, num_dn, NUM_CLASSES)
    assert with_dn["dn_boxes"].shape == (2, 2, num_dn, 4)
    assert "dn_logits" not in without_dn
    assert with_dn["logits"].shape == (2, 2, NUM_QUERIES, NUM_CLASSES)
    for key in ("logits", "boxes", "enc_logits", "enc_boxes"):
        torch.testing.assert_close(with_dn[key], without_dn[key], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------ inference
def test_inference_output_contract(model):
    model.eval()
    inputs = synthetic_batch(
        [(64, 64), (48, 40)],
        [[[4, 4, 30, 40]], [[0, 0, 20, 20]]],
        [[1], [4]],
        output_sizes=[(128, 128), (96, 80)],
    )
    for item in inputs:
        del item["instances"]
    outputs = model(inputs)
    assert isinstance(outputs, list) and len(outputs) == 2
    for output, item in zip(outputs, inputs):
        assert set(output) == {"instances"}
        instances = output["instances"]
        assert instances.image_size == (item["height"], item["width"])
        assert set(instances.get_fields()) == {"pred_boxes", "scores", "pred_classes"}
        assert 0 < len(instances) <= MAX_DETECTIONS
        boxes = instances.pred_boxes.tensor
        assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= item["width"]).all()
        assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= item["height"]).all()
        scores = instances.scores
        assert ((scores > 0) & (scores <= 1)).all()
        assert (scores[:-1] >= scores[1:]).all()
        classes = instances.pred_classes
        assert classes.dtype == torch.int64
        assert ((classes >= 0) & (classes < NUM_CLASSES)).all()


def test_inference_needs_enough_positions_for_the_queries(model):
    model.eval()
    # a 16x16 input has 4*4 + 2*2 + 1 + 1 + 1 = 23 positions over 5 levels, fewer than 30
    inputs = synthetic_batch([(16, 16)], [[]], [[]])
    with pytest.raises(ValueError, match="num_queries=30"):
        model(inputs)
    model.train()
    with pytest.raises(ValueError, match="num_queries=30"):
        model(inputs)


def _logits_for(scores):
    probabilities = torch.tensor(scores, dtype=torch.float64)
    return torch.log(probabilities / (1 - probabilities)).float()


def _cxcywh(x1, y1, x2, y2, width, height):
    return [(x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height]


def test_detr_detections_top_k_over_query_and_class():
    # image 0: 100 wide, 50 high; 3 queries x 2 classes
    logits = _logits_for([[[0.9, 0.1], [0.3, 0.8], [0.05, 0.6]]])
    boxes = torch.tensor(
        [
            [
                _cxcywh(10, 5, 30, 25, 100, 50),
                [0.95, 0.5, 0.2, 0.4],  # x from 85 to 105: clamped at 100
                [0.0, 0.1, 0.2, 0.4],  # x from -10, y from -5: clamped at 0
            ]
        ]
    )
    normalizers = torch.tensor([[100.0, 50.0, 100.0, 50.0]])
    (result,) = detr_detections(
        logits, boxes, normalizers, [(50, 100)], num_candidates=4, max_detections=3
    )
    assert result.image_size == (50, 100)
    # scores in order: (q0, c0) .9, (q1, c1) .8, (q2, c1) .6, (q1, c0) .3
    torch.testing.assert_close(result.scores, torch.tensor([0.9, 0.8, 0.6]))
    assert result.pred_classes.tolist() == [0, 1, 1]
    expected = torch.tensor(
        [[10.0, 5.0, 30.0, 25.0], [85.0, 15.0, 100.0, 35.0], [0.0, 0.0, 10.0, 15.0]]
    )
    torch.testing.assert_close(result.pred_boxes.tensor, expected)

    # fewer candidates than detections: the candidates bound the output
    (result,) = detr_detections(
        logits, boxes, normalizers, [(50, 100)], num_candidates=2, max_detections=3
    )
    assert result.pred_classes.tolist() == [0, 1]
    # more candidates than query x class pairs: all of them
    (result,) = detr_detections(
        logits, boxes, normalizers, [(50, 100)], num_candidates=100, max_detections=100
    )
    assert len(result) == 6
    assert result.pred_classes.tolist() == [0, 1, 1, 0, 1, 0]


def test_detr_detections_per_image_normalizers():
    logits = _logits_for([[[0.9]], [[0.7]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.5, 0.5]], [[0.5, 0.5, 0.5, 0.5]]])
    normalizers = torch.tensor([[100.0, 50.0, 100.0, 50.0], [40.0, 80.0, 40.0, 80.0]])
    results = detr_detections(
        logits, boxes, normalizers, [(50, 100), (80, 40)], num_candidates=1, max_detections=1
    )
    torch.testing.assert_close(
        results[0].pred_boxes.tensor, torch.tensor([[25.0, 12.5, 75.0, 37.5]])
    )
    torch.testing.assert_close(
        results[1].pred_boxes.tensor, torch.tensor([[10.0, 20.0, 30.0, 60.0]])
    )
    assert [r.image_size for r in results] == [(50, 100), (80, 40)]


def test_detr_detections_with_soft_nms():
    # q0 and q2 share a box, q1's box has IoU 0.9 with it
    sigmoid = torch.sigmoid
    logits = torch.tensor([[[2.0, -5.0], [1.0, -6.0], [-7.0, 0.5]]])
    box_a = _cxcywh(10, 10, 50, 50, 100, 100)
    box_b = _cxcywh(10, 10, 50, 46, 100, 100)
    boxes = torch.tensor([[box_a, box_b, box_a]])
    normalizers = torch.tensor([[100.0, 100.0, 100.0, 100.0]])
    (result,) = detr_detections(
        logits,
        boxes,
        normalizers,
        [(100, 100)],
        num_candidates=6,
        max_detections=10,
        soft_nms_iou_threshold=0.8,
    )
    # (q0, c0) kept; (q1, c0) decays by 1 - 0.9; (q2, c0) decays to 0 and is dropped;
    # class 1: (q2, c1) kept, (q0, c1) and (q1, c1) decay below 1e-3 and are dropped
    expected_scores = torch.stack(
        [sigmoid(torch.tensor(2.0)), sigmoid(torch.tensor(0.5)), sigmoid(torch.tensor(1.0)) * 0.1]
    )
    torch.testing.assert_close(result.scores, expected_scores, rtol=1e-4, atol=1e-6)
    assert result.pred_classes.tolist() == [0, 1, 0]
    expected_boxes = torch.tensor(
        [[10.0, 10.0, 50.0, 50.0], [10.0, 10.0, 50.0, 50.0], [10.0, 10.0, 50.0, 46.0]]
    )
    torch.testing.assert_close(result.pred_boxes.tensor, expected_boxes)

    (result,) = detr_detections(
        logits,
        boxes,
        normalizers,
        [(100, 100)],
        num_candidates=6,
        max_detections=2,
        soft_nms_iou_threshold=0.8,
    )
    assert result.pred_classes.tolist() == [0, 1]
