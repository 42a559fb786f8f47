import math

import pytest
import torch
import torch.nn.functional as F

from codetr.modeling.query_heads import DINOHead, detr_detections
from codetr.modeling.transformer import encoder_proposals

from .tiny_models import (
    EMBED_DIM,
    MAX_DETECTIONS,
    NUM_CLASSES,
    NUM_QUERIES,
    build_tiny_dino,
    expected_detection_losses,
    hungarian_targets_by_hand,
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


ONE_IMAGE_WITHOUT_OBJECTS = dict(
    image_sizes=[(64, 64), (64, 64)], boxes=[[[8, 8, 40, 30]], []], classes=[[3], []]
)
NO_OBJECT = dict(image_sizes=[(64, 64), (48, 64)], boxes=[[], []], classes=[[], []])
BATCH_OF_ONE = dict(image_sizes=[(64, 48)], boxes=[[[8, 8, 40, 30]]], classes=[[3]])
# float32 losses against their float64 recomputation: sums of a few hundred float32 terms
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def model():
    return build_tiny_dino(seed=0)


@pytest.fixture(scope="module")
def refining_model():
    """The tiny model with small random last box-prediction layers: they start at zero, so
    that every decoder layer predicts its reference box and all layers' box losses agree."""
    model = build_tiny_dino(seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for head in model.query_head.box_heads:
            head[-1].weight.copy_(torch.randn(head[-1].weight.shape, generator=generator) * 0.02)
            head[-1].bias.copy_(torch.randn(head[-1].bias.shape, generator=generator) * 0.1)
    return model


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
    # frozen backbone stages stay frozen
    assert not any(p.requires_grad for p in model.backbone.stem.parameters())


def test_training_step_batch_size_one(model):
    losses = _training_step(model, synthetic_batch(**BATCH_OF_ONE))
    _assert_finite_with_gradients(model, losses)


def test_training_step_with_an_image_without_objects(model):
    losses = _training_step(model, synthetic_batch(**ONE_IMAGE_WITHOUT_OBJECTS))
    _assert_finite_with_gradients(model, losses)


def test_training_step_without_any_object(model):
    record = {}
    losses = _recorded_training_step(model, synthetic_batch(**NO_OBJECT), record)
    _assert_finite_with_gradients(model, losses)
    for prefix in ("", "d0.", "enc_", "dn_", "d0.dn_"):
        assert losses[f"{prefix}loss_bbox"] == 0 and losses[f"{prefix}loss_giou"] == 0
    # every query is pushed towards background: softplus(x) sigmoid(x)^2 over all queries and
    # classes, divided by 1 (no positive)
    outputs = record["outputs"]
    for name, logits in [
        ("loss_class", outputs["logits"][-1]),
        ("d0.loss_class", outputs["logits"][0]),
        ("enc_loss_class", outputs["enc_logits"]),
    ]:
        x = logits.detach().double()
        expected = (F.softplus(x) * x.sigmoid() ** 2).sum()
        torch.testing.assert_close(losses[name].double(), expected, rtol=RTOL, atol=ATOL)


def _recorded_training_step(model, batched_inputs, record, seed=0):
    """:func:`_training_step`, keeping in ``record`` the query head's decoder outputs
    ("outputs", the dict of ``decode``) and its denoising queries ("denoising")."""
    head = model.query_head
    decode = head.decode

    def recording_decode(*args, **kwargs):
        record["outputs"] = decode(*args, **kwargs)
        return record["outputs"]

    def keep_denoising(module, inputs, output):
        record["denoising"] = output

    handle = head.denoising.register_forward_hook(keep_denoising)
    head.decode = recording_decode
    try:
        return _training_step(model, batched_inputs, seed)
    finally:
        del head.decode
        handle.remove()


def _expected_losses(batched_inputs, record):
    """
    Every loss of the query head from its recorded predictions, computed here: each decoder
    layer's and the encoder proposals' predictions matched to the ground truth
    (:func:`hungarian_targets_by_hand`, per image) and normalised by the ground truths of the
    batch (at least 1); the denoising queries against their own targets, normalised by their
    positives (:func:`expected_detection_losses`).
    """
    labels, boxes = [], []
    for item in batched_inputs:
        instances = item["instances"]
        height, width = instances.image_size
        xyxy = instances.gt_boxes.tensor.double() / torch.tensor([width, height] * 2).double()
        boxes.append(torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], 1))
        labels.append(instances.gt_classes)
    num_gt = max(sum(len(l) for l in labels), 1)

    def matched(prefix, logits, predicted):
        target_labels, target_boxes = zip(
            *[
                hungarian_targets_by_hand(l, b, gl, gb, num_classes=NUM_CLASSES)
                for l, b, gl, gb in zip(logits, predicted, labels, boxes)
            ]
        )
        losses = expected_detection_losses(
            logits.flatten(0, 1),
            predicted.flatten(0, 1),
            torch.cat(target_labels),
            torch.cat(target_boxes),
            num_classes=NUM_CLASSES,
            num_positives=num_gt,
        )
        return {prefix + k: v for k, v in losses.items()}

    outputs, group = record["outputs"], record["denoising"]
    num_layers = len(outputs["logits"])
    expected = matched("enc_", outputs["enc_logits"], outputs["enc_boxes"])
    for layer in range(num_layers):
        prefix = "" if layer == num_layers - 1 else f"d{layer}."
        expected.update(matched(prefix, outputs["logits"][layer], outputs["boxes"][layer]))
        dn = expected_detection_losses(
            outputs["dn_logits"][layer].flatten(0, 1),
            outputs["dn_boxes"][layer].flatten(0, 1),
            group.target_labels.flatten(),
            group.target_boxes.flatten(0, 1),
            num_classes=NUM_CLASSES,
        )
        expected.update({f"{prefix}dn_{k}": v for k, v in dn.items()})
    return expected


@pytest.mark.parametrize(
    "batch",
    [TWO_IMAGES, BATCH_OF_ONE, ONE_IMAGE_WITHOUT_OBJECTS, NO_OBJECT],
    ids=["two_images", "batch_of_one", "one_image_without_objects", "no_object"],
)
def test_losses_recomputed_from_the_predictions(refining_model, batch):
    inputs = synthetic_batch(**batch)
    record = {}
    losses = _recorded_training_step(refining_model, inputs, record)
    expected = _expected_losses(inputs, record)
    assert set(expected) == set(losses) == EXPECTED_KEYS
    for name, value in expected.items():
        torch.testing.assert_close(losses[name].double(), value, rtol=RTOL, atol=ATOL, msg=name)
    # the decoder layers refine the boxes: their box losses differ
    if batch is TWO_IMAGES:
        assert losses["loss_bbox"] != losses["d0.loss_bbox"]


def test_denoising_targets_are_the_ground_truth(refining_model):
    # positive denoising queries reconstruct their ground truth; negatives are background
    inputs = synthetic_batch(**TWO_IMAGES)
    record = {}
    _recorded_training_step(refining_model, inputs, record)
    group = record["denoising"]
    # 2 ground truths at most per image: 20 // 2 = 10 groups of 2 x 2 queries
    assert group.target_labels.shape == (2, 40)
    for image, item in enumerate(inputs):
        instances = item["instances"]
        height, width = instances.image_size
        normalizer = torch.tensor([width, height] * 2, dtype=torch.float32)
        xyxy = instances.gt_boxes.tensor / normalizer
        cxcywh = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], 1)
        labels = group.target_labels[image]
        positive = labels < NUM_CLASSES
        num_gt = len(instances)
        # per group: num_gt positives, then (padding and) negatives
        assert int(positive.sum()) == 10 * num_gt
        assert sorted(labels[positive].tolist()) == sorted(instances.gt_classes.tolist() * 10)
        for box, label in zip(group.target_boxes[image][positive], labels[positive]):
            matches = [
                i
                for i in range(num_gt)
                if int(instances.gt_classes[i]) == int(label)
                and torch.allclose(box, cxcywh[i], atol=1e-6)
            ]
            assert matches, (box, label)


def _encode(model, batched_inputs):
    return model.encode(model.preprocess_image(batched_inputs))


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
        assert len(instances) == MAX_DETECTIONS  # soft-NMS keeps 20 of the 30 candidates
        boxes = instances.pred_boxes.tensor
        assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= item["width"]).all()
        assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= item["height"]).all()
        scores = instances.scores
        assert ((scores > 0) & (scores <= 1)).all()
        assert (scores[:-1] >= scores[1:]).all()
        classes = instances.pred_classes
        assert classes.dtype == torch.int64
        assert ((classes >= 0) & (classes < NUM_CLASSES)).all()


def test_inference_top_detection_and_rescaling(model):
    model.eval()
    inputs = synthetic_batch(
        [(64, 64), (48, 40)],
        [[[4, 4, 30, 40]], [[0, 0, 20, 20]]],
        [[1], [4]],
        output_sizes=[(128, 128), (120, 60)],
    )
    with torch.no_grad():
        images = model.preprocess_image(inputs)
        outputs = model.query_head.decode(model.encode(images))
        raw = model.inference(inputs, do_postprocess=False)
        final = model(inputs)
    logits, boxes = outputs["logits"][-1], outputs["boxes"][-1]
    for image, ((height, width), item) in enumerate(zip(images.image_sizes, inputs)):
        # the best (query, class) sigmoid score of the last decoder layer comes first (soft-NMS
        # never lowers the best score), with its box in input pixels, clamped to the image
        scores = logits[image].sigmoid()
        query, label = divmod(int(scores.flatten().argmax()), NUM_CLASSES)
        assert raw[image].image_size == (height, width)
        assert raw[image].scores[0].item() == scores.max().item()
        assert raw[image].pred_classes[0].item() == label
        cx, cy, w, h = boxes[image, query].tolist()
        expected = torch.tensor(
            [
                min(max((cx - w / 2) * width, 0), width),
                min(max((cy - h / 2) * height, 0), height),
                min(max((cx + w / 2) * width, 0), width),
                min(max((cy + h / 2) * height, 0), height),
            ]
        )
        torch.testing.assert_close(raw[image].pred_boxes.tensor[0], expected)
        # the requested output size scales x and y separately
        scale_x, scale_y = item["width"] / width, item["height"] / height
        instances = final[image]["instances"]
        assert instances.image_size == (item["height"], item["width"])
        assert len(instances) == len(raw[image]) == MAX_DETECTIONS
        torch.testing.assert_close(
            instances.pred_boxes.tensor,
            raw[image].pred_boxes.tensor * torch.tensor([scale_x, scale_y, scale_x, scale_y]),
        )
        assert torch.equal(instances.scores, raw[image].scores)
        assert torch.equal(instances.pred_classes, raw[image].pred_classes)


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
