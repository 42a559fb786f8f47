"""
The Co-Deformable-DETR query head and its positive-query builder: a training step of the tiny
model (the parity config at random initialisation, 5 classes), the encoder's binary labels,
mixed query selection, and the positive queries' features and per-head position embedding.
"""
import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.utils.events import EventStorage

from codetr.layers import box_sine_embedding
from codetr.modeling import DeformableDETRHead, DeformablePositiveQueryBuilder
from codetr.modeling.aux_heads.base import AssignedCoords

from .tiny_models import normalized_target, synthetic_batch
from ..parity.common import TINY_CO_DEFORMABLE_DETR_CONFIG

NUM_CLASSES = 5
LOSS_NAMES = ("loss_class", "loss_bbox", "loss_giou")
TWO_IMAGES_ONE_EMPTY = dict(
    image_sizes=[(64, 64), (48, 56)],
    boxes=[[[4, 4, 30, 40], [10, 12, 60, 58]], []],
    classes=[[1, 4], []],
)
# encoder positions of a 64 x 64 batch: strides 8, 16, 32, 64
NUM_POSITIONS = 8 * 8 + 4 * 4 + 2 * 2 + 1 * 1


def _tiny_config():
    model = LazyConfig.load(TINY_CO_DEFORMABLE_DETR_CONFIG).model
    model.query_head.num_classes = NUM_CLASSES
    return model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return instantiate(_tiny_config())


def _encode(model, batched_inputs):
    images = model.preprocess_image(batched_inputs)
    features = list(model.neck(model.backbone(images.tensor)).values())
    return model.query_head.encode(features, model.padding_mask(images))


# ------------------------------------------------------------------------------ training
def test_training_step_losses_names_and_gradients(model):
    head = model.query_head
    assert isinstance(head, DeformableDETRHead)
    recorded = []  # (logits shape, target labels) of every call of the detection loss
    loss_forward = head.loss.forward

    def spy(logits, boxes, target_labels, target_boxes, **kwargs):
        recorded.append((tuple(logits.shape), target_labels.clone()))
        return loss_forward(logits, boxes, target_labels, target_boxes, **kwargs)

    head.loss.forward = spy
    try:
        torch.manual_seed(0)
        model.train()
        model.zero_grad(set_to_none=True)
        with EventStorage():  # detectron2's RPN and RoI heads log to it
            losses = model(synthetic_batch(**TWO_IMAGES_ONE_EMPTY))
        sum(losses.values()).backward()
    finally:
        del head.loss.forward

    query_keys = {f"{p}{n}" for p in ("", "d0.", "enc_") for n in LOSS_NAMES}
    positive_keys = {f"{p}{n}_aux{k}" for p in ("", "d0.") for n in LOSS_NAMES for k in (0, 1)}
    rcnn_keys = {f"aux0.{n}" for n in ("loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg")}
    atss_keys = {f"aux1.{n}" for n in ("loss_cls", "loss_bbox", "loss_centerness")}
    assert set(losses) == query_keys | positive_keys | rcnn_keys | atss_keys
    for name, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), name
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name
    assert model.positive_queries.head_pos_embed.grad.abs().sum() > 0

    # decoder layers 0, 1 with the classes; then the encoder proposals of all positions with
    # the binary label 0 for the matched ones and background for the others
    (layer0, _), (layer1, labels), (encoder, binary) = recorded[:3]
    assert layer0 == layer1 == (2, 30, NUM_CLASSES)
    assert sorted(labels[labels < NUM_CLASSES].tolist()) == [1, 4]
    assert encoder == (2, NUM_POSITIONS, NUM_CLASSES)
    assert set(binary.unique().tolist()) == {0, NUM_CLASSES}
    assert (binary == 0).sum(1).tolist() == [2, 0]
    assert len(recorded) == 3 + 2 * 2  # + two decoder layers for each auxiliary head


def test_encoder_loss_is_the_set_loss_with_binary_labels(model):
    model.eval()
    inputs = synthetic_batch(**TWO_IMAGES_ONE_EMPTY)
    # the images' (w, h): 64 x 64 and 56 x 48
    targets = [
        normalized_target([1, 4], [[0.3, 0.3, 0.4, 0.5]] * 2, (64.0, 64.0)),
        normalized_target([], [], (56.0, 48.0)),
    ]
    binary = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
    with torch.no_grad():
        memory = _encode(model, inputs)
        losses = model.query_head.losses(memory, targets)
        logits, boxes = model.query_head.encoder_predictions(memory)
        expected = model.query_head._set_losses(logits, boxes, binary)
        with_classes = model.query_head._set_losses(logits, boxes, targets)
    for name in LOSS_NAMES:
        torch.testing.assert_close(losses[f"enc_{name}"], expected[name])
    assert not torch.allclose(losses["enc_loss_class"], with_classes["loss_class"])


# ------------------------------------------------------------------------------ decoding
def test_mixed_query_selection(model):
    """References: the encoder boxes of the top first-class logits (detached); content: the
    learned query embedding; position: first half of the projected box embedding."""
    model.eval()
    head = model.query_head
    calls = []
    decode_queries = head._decode_queries
    head._decode_queries = lambda *args, **kwargs: calls.append((args, kwargs)) or decode_queries(
        *args, **kwargs
    )
    try:
        with torch.no_grad():
            memory = _encode(model, synthetic_batch(**TWO_IMAGES_ONE_EMPTY))
            outputs = head.decode(memory)
    finally:
        del head._decode_queries
    ((_, content, reference), kwargs) = calls[0]
    top = outputs["enc_logits"][..., 0].topk(30, dim=1)[1]
    expected_reference = torch.stack([b[i] for b, i in zip(outputs["enc_boxes"], top)])
    torch.testing.assert_close(reference, expected_reference, rtol=0, atol=0)
    torch.testing.assert_close(content, head.query_embed.weight.expand(2, -1, -1))
    # the selected boxes as they are (no clamping through an inverse sigmoid)
    embedding = head.pos_trans_norm(
        head.pos_trans(box_sine_embedding(reference, num_pos_feats=32, yx_first=False))
    )
    torch.testing.assert_close(kwargs["query_pos"], embedding[..., :64])
    assert outputs["logits"].shape == (2, 2, 30, NUM_CLASSES)
    assert outputs["enc_boxes"].shape == (2, NUM_POSITIONS, 4)


def test_inference_top_detections(model):
    model.eval()
    inputs = synthetic_batch(**TWO_IMAGES_ONE_EMPTY)
    results = model(inputs)
    assert [len(r["instances"]) for r in results] == [100, 100]
    assert results[1]["instances"].image_size == (48, 56)


def test_head_rejects_a_decoder_with_its_own_query_pos():
    config = _tiny_config().query_head
    config.decoder.query_pos_from_boxes = True
    with pytest.raises(ValueError, match="query_pos_from_boxes=False"):
        instantiate(config)


def test_too_few_positions_for_the_queries(model):
    model.eval()
    memory = _encode(model, synthetic_batch([(24, 24)], [[]], [[]]))  # 9 + 4 + 1 + 1 positions
    with pytest.raises(ValueError, match="15 feature positions.*num_queries=30"):
        model.query_head.decode(memory)


# ------------------------------------------------------------------------------ positive queries
EMBED_DIM = 4
BUILDER_CLASSES = 3


def _builder(**kwargs):
    torch.manual_seed(0)
    args = dict(
        num_heads=2, embed_dim=EMBED_DIM, num_classes=BUILDER_CLASSES, min_queries=2,
        max_queries=2,
    )
    args.update(kwargs)
    return DeformablePositiveQueryBuilder(**args)


def _tiny_maps():
    """Two levels of one image: p3 (2 x 2) and p4 (1 x 1); location l has feature
    (10 l, 10 l + 1, 10 l + 2, 10 l + 3)."""
    values = 10.0 * torch.arange(5)[:, None] + torch.arange(4)[None]
    return {
        "p3": values[:4].t().reshape(1, 4, 2, 2),
        "p4": values[4:].t().reshape(1, 4, 1, 1),
    }


def _assignment(labels, features=None):
    n = len(labels)
    boxes = torch.tensor([[10.0, 10.0, 30.0, 40.0]]).repeat(n, 1) + torch.arange(n)[:, None]
    return AssignedCoords(
        boxes=boxes, labels=torch.tensor(labels), target_boxes=boxes + 1, features=features
    )


def _captured_features(builder, head_index, assignment, maps):
    captured = []
    queries = builder.queries
    builder.queries = lambda k, boxes, features: captured.append(features) or queries(
        k, boxes, features
    )
    builder(head_index, [assignment], torch.tensor([[100.0, 100.0, 100.0, 100.0]]), maps)
    return captured[0]


@pytest.mark.parametrize("anchors_per_location", [1, 3])
def test_dense_head_queries_use_the_memory_at_the_anchor_location(anchors_per_location):
    # positives at locations 1 (p3, row 0, column 1) and 4 (p4)
    labels = [BUILDER_CLASSES] * 5 * anchors_per_location
    labels[1 * anchors_per_location + anchors_per_location - 1] = 2
    labels[4 * anchors_per_location] = 0
    features = _captured_features(_builder(), 1, _assignment(labels), _tiny_maps())
    expected = torch.tensor([[10.0, 11.0, 12.0, 13.0], [40.0, 41.0, 42.0, 43.0]])
    torch.testing.assert_close(features, expected[None])


def test_two_stage_head_queries_use_their_roi_features():
    roi_features = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assignment = _assignment([BUILDER_CLASSES, 1, 0], features=roi_features)
    features = _captured_features(_builder(), 0, assignment, _tiny_maps())
    torch.testing.assert_close(features, roi_features[None, 1:])


@pytest.mark.parametrize("head_embed_dim", [1, EMBED_DIM])
def test_query_pos_and_content_of_positive_queries(head_embed_dim):
    builder = _builder(head_embed_dim=head_embed_dim)
    with torch.no_grad():
        builder.head_pos_embed.copy_(torch.randn(2, head_embed_dim) + 3.0)
    assert builder.head_pos_embed.shape == (2, head_embed_dim)
    assignment = _assignment([0, 1, BUILDER_CLASSES, BUILDER_CLASSES, BUILDER_CLASSES])
    maps = _tiny_maps()
    for k in (0, 1):
        queries = builder(k, [assignment], torch.tensor([[100.0] * 4]), maps)
        embedding = builder.norms[k](builder.projections[k](
            builder.box_embedding(queries.reference_boxes)
        ))
        assert embedding.shape == (1, 2, 2 * EMBED_DIM)
        features = torch.tensor([[[0.0, 1.0, 2.0, 3.0], [10.0, 11.0, 12.0, 13.0]]])
        content = embedding[..., EMBED_DIM:] + builder.feature_norms[k](
            builder.feature_projections[k](features)
        )
        torch.testing.assert_close(queries.content, content)
        # the position embedding includes the head's own embedding, broadcast over channels
        torch.testing.assert_close(
            queries.query_pos - embedding[..., :EMBED_DIM],
            builder.head_pos_embed[k].expand(1, 2, EMBED_DIM),
        )


def test_head_embed_dim_must_be_one_or_embed_dim():
    with pytest.raises(ValueError, match="head_embed_dim must be 1 or embed_dim=4, got 2"):
        _builder(head_embed_dim=2)
