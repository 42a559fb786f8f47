import functools
import os

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.structures import Boxes, ImageList, Instances
from omegaconf import OmegaConf
from torch import nn

from codetr.modeling import CoDETR, DINOHead, DINOPositiveQueryBuilder
from codetr.modeling.aux_heads.base import AssignedCoords

from .tiny_models import (
    EMBED_DIM,
    NUM_CLASSES,
    build_tiny_dino,
    full_dino_config,
    make_instances,
    synthetic_batch,
    tiny_dino_config,
)

LOSS_NAMES = ("loss_class", "loss_bbox", "loss_giou")


class FakeAuxHead(nn.Module):
    """
    Stands in for an auxiliary head: records its calls and inputs, returns a loss that depends
    on every feature level and the given per-image assignments; at test time one box covering
    the top-left quarter of each image.
    """

    def __init__(self, kind, assignments=None):
        super().__init__()
        self.kind = kind
        self.scale = nn.Parameter(torch.tensor(0.5))
        self.assignments = assignments
        self.calls = 0
        self.inference_calls = 0
        self.features = None

    def forward(self, features, images, gt_instances):
        self.calls += 1
        self.features = features
        loss = self.scale * sum(f.pow(2).mean() for f in features.values())
        return {"loss_fake": loss}, self.assignments

    def inference(self, features, images):
        self.inference_calls += 1
        self.features = features
        results = []
        for height, width in images.image_sizes:
            result = Instances((height, width))
            result.pred_boxes = Boxes(torch.tensor([[0.0, 0.0, width / 2, height / 2]]))
            result.scores = torch.tensor([0.5])
            result.pred_classes = torch.tensor([1])
            results.append(result)
        return results


def given(*heads):
    """Builders of ``heads`` as ``CoDETR`` takes them (it builds its auxiliary heads itself,
    giving their input shapes and class count)."""
    return [lambda head=head, **derived: head for head in heads]


@pytest.fixture(scope="module")
def parts():
    """Backbone, neck and query head of the tiny model, shared by the CoDETR instances of the
    tests that only look at the meta-architecture's own logic."""
    cfg = tiny_dino_config().model
    torch.manual_seed(0)
    return {key: instantiate(cfg[key]) for key in ("backbone", "neck", "query_head")}


# ------------------------------------------------------------------------------ eval_module
@pytest.mark.parametrize(
    "eval_module, expected",
    [
        ("detr", None),
        ("one-stage", 0),
        ("one-stage:0", 0),
        ("one-stage:1", 2),
        ("two-stage", 1),
        ("two-stage:0", 1),
    ],
)
def test_eval_module_selects_the_head(parts, eval_module, expected):
    heads = [FakeAuxHead("one-stage"), FakeAuxHead("two-stage"), FakeAuxHead("one-stage")]
    model = CoDETR(**parts, aux_heads=given(*heads), eval_module=eval_module).eval()
    assert model.eval_module == eval_module
    (output,) = model(synthetic_batch([(64, 64)], [[]], [[]]))
    assert [h.inference_calls for h in heads] == [int(i == expected) for i in range(3)]
    assert all(h.calls == 0 for h in heads)
    # the selected head's detections, or the query head's
    assert (len(output["instances"]) == 1) == (expected is not None)


def test_eval_module_can_change_on_a_built_model(parts):
    heads = [FakeAuxHead("one-stage"), FakeAuxHead("two-stage")]
    model = CoDETR(**parts, aux_heads=given(*heads)).eval()
    model.eval_module = "two-stage"
    model(synthetic_batch([(64, 64)], [[]], [[]]))
    assert [h.inference_calls for h in heads] == [0, 1]
    with pytest.raises(ValueError, match="eval_module"):
        model.eval_module = "three-stage"
    assert model.eval_module == "two-stage"


@pytest.mark.parametrize(
    "eval_module", ["three-stage", "two-stage:1", "one-stage:2", "detr:0", "", "DETR"]
)
def test_eval_module_errors(parts, eval_module):
    heads = [FakeAuxHead("one-stage"), FakeAuxHead("two-stage"), FakeAuxHead("one-stage")]
    with pytest.raises(ValueError, match="eval_module"):
        CoDETR(**parts, aux_heads=given(*heads), eval_module=eval_module)


def test_eval_module_needs_a_head_of_that_kind(parts):
    with pytest.raises(ValueError, match="eval_module"):
        CoDETR(**parts, eval_module="one-stage")
    with pytest.raises(ValueError, match="eval_module"):
        CoDETR(**parts, aux_heads=given(FakeAuxHead("two-stage")), eval_module="one-stage")


def test_eval_module_rejects_negative_index(parts):
    heads = [FakeAuxHead("one-stage"), FakeAuxHead("one-stage")]
    with pytest.raises(ValueError, match="eval_module"):
        CoDETR(**parts, aux_heads=given(*heads), eval_module="one-stage:-1")


def test_eval_module_rejects_non_integer_index_clearly(parts):
    with pytest.raises(ValueError, match="eval_module"):
        CoDETR(**parts, aux_heads=given(FakeAuxHead("one-stage")), eval_module="one-stage:first")


def test_parts_are_built_from_what_the_model_derives(parts):
    """The auxiliary heads get the encoder memory's shapes (the neck's levels plus one
    stride-2 level) and the query head's class count; the positive queries one projection
    per auxiliary head; the auxiliary losses lambda_2 x the decoder layers."""
    received = []

    def build_head(**derived):
        received.append(derived)
        return FakeAuxHead("one-stage")

    model = CoDETR(
        **parts,
        aux_heads=[build_head, build_head, build_head],
        positive_queries=functools.partial(DINOPositiveQueryBuilder, min_queries=3),
        lambda_1=0.5,
        lambda_2=3.0,
    )
    assert len(received) == 3 and all(r == received[0] for r in received)
    assert sorted(received[0]) == ["input_shape", "num_classes"]
    assert received[0]["num_classes"] == NUM_CLASSES
    shapes = received[0]["input_shape"]
    assert list(shapes) == ["p2", "p3", "p4", "p5", "p6", "p7"]
    assert [s.stride for s in shapes.values()] == [4, 8, 16, 32, 64, 128]
    assert {s.channels for s in shapes.values()} == {EMBED_DIM}
    queries = model.positive_queries
    assert (queries.num_heads, queries.embed_dim, queries.num_classes) == (3, EMBED_DIM, 5)
    assert len(queries.projections) == 3 and queries.min_queries == 3
    assert model.lambda_1 == 0.5 and model.aux_loss_weight == 3.0 * 2
    # without auxiliary heads there are no positive queries to build
    builder = functools.partial(DINOPositiveQueryBuilder)
    assert CoDETR(**parts, positive_queries=builder).positive_queries is None


def test_built_auxiliary_heads_are_refused_with_the_fix(parts):
    # a config of the old form, L(ATSSHead)(...): a module where a builder is expected
    with pytest.raises(TypeError, match=r"\['FakeAuxHead'\]: write them .* LazyPartial"):
        CoDETR(**parts, aux_heads=[FakeAuxHead("one-stage")])


def test_neck_and_query_head_must_agree(parts):
    # one more neck level than the encoder and decoder attend to: refused when built
    cfg = tiny_dino_config().model
    cfg.neck.num_extra_levels = 2
    neck = instantiate(cfg.neck)
    with pytest.raises(ValueError, match=r"6 levels of 64 channels .* expects \(5, 64\)"):
        CoDETR(**dict(parts, neck=neck))


# ------------------------------------------------------------------------------ inputs
def _images():
    return ImageList.from_tensors([torch.zeros(3, 40, 30), torch.zeros(3, 32, 48)])


def test_padding_mask_and_box_normalizers(parts):
    model = CoDETR(**parts)
    images = _images()
    assert images.tensor.shape[-2:] == (40, 48)
    mask = model.padding_mask(images)
    expected = torch.ones(2, 40, 48, dtype=torch.bool)
    expected[0, :40, :30] = False
    expected[1, :32, :48] = False
    assert torch.equal(mask, expected)
    # (w, h, w, h) of each unpadded image
    torch.testing.assert_close(
        model.box_normalizers(images),
        torch.tensor([[30.0, 40.0, 30.0, 40.0], [48.0, 32.0, 48.0, 32.0]]),
    )


def test_fixed_square_inputs_have_no_padding(parts):
    # LSJ: the dataset mapper pads every image to the square, which is then the image size
    model = CoDETR(**parts)
    inputs = [{"image": torch.zeros(3, 64, 64)}, {"image": torch.zeros(3, 64, 64)}]
    images = model.preprocess_image(inputs)
    assert not model.padding_mask(images).any()
    torch.testing.assert_close(
        model.box_normalizers(images), torch.tensor([[64.0, 64.0, 64.0, 64.0]] * 2)
    )


def test_preprocess_normalises_and_pads_to_size_divisibility(parts):
    model = CoDETR(**parts, size_divisibility=16)
    inputs = [{"image": torch.full((3, 40, 30), 123.675)}, {"image": torch.zeros(3, 20, 50)}]
    images = model.preprocess_image(inputs)
    assert images.tensor.shape == (2, 3, 48, 64)
    assert images.image_sizes == [(40, 30), (20, 50)]
    assert images.tensor[0, 0, :40, :30].abs().max() < 1e-6  # (x - mean) / std, red channel
    torch.testing.assert_close(
        images.tensor[1, :, 0, 0], -model.pixel_mean[:, 0, 0] / model.pixel_std[:, 0, 0]
    )


def test_normalized_targets_hand_case():
    gt = [
        make_instances((50, 100), [[10, 5, 30, 25], [0, 0, 100, 50]], [3, 0]),
        make_instances((40, 40), [], []),
    ]
    normalizers = torch.tensor([[100.0, 50.0, 100.0, 50.0], [40.0, 40.0, 40.0, 40.0]])
    targets = CoDETR.normalized_targets(gt, normalizers)
    assert [set(t) for t in targets] == [{"labels", "boxes", "query_boxes", "box_normalizer"}] * 2
    assert targets[0]["labels"].tolist() == [3, 0]
    expected = torch.tensor([[0.2, 0.3, 0.2, 0.4], [0.5, 0.5, 1.0, 1.0]])
    torch.testing.assert_close(targets[0]["boxes"], expected)
    torch.testing.assert_close(targets[0]["query_boxes"], expected)
    # the same boxes, rounded in two orders: the loss targets are normalised, then converted
    # to cxcywh; the denoising queries' boxes converted, then normalised. In float32 the two
    # differ here (the first box's width: 30 / 100 - 10 / 100 is not 20 / 100)
    xyxy = gt[0].gt_boxes.tensor
    cx, cy = (xyxy[:, 0] + xyxy[:, 2]) / 2, (xyxy[:, 1] + xyxy[:, 3]) / 2
    w, h = xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1]
    n = normalizers[0]
    normalised_first = torch.stack(
        [
            (xyxy[:, 0] / n[0] + xyxy[:, 2] / n[2]) / 2,
            (xyxy[:, 1] / n[1] + xyxy[:, 3] / n[3]) / 2,
            xyxy[:, 2] / n[2] - xyxy[:, 0] / n[0],
            xyxy[:, 3] / n[3] - xyxy[:, 1] / n[1],
        ],
        -1,
    )
    assert torch.equal(targets[0]["boxes"], normalised_first)
    assert torch.equal(targets[0]["query_boxes"], torch.stack([cx, cy, w, h], -1) / n)
    assert not torch.equal(targets[0]["boxes"], targets[0]["query_boxes"])
    for target, normalizer in zip(targets, normalizers):
        assert torch.equal(target["box_normalizer"], normalizer)
    assert targets[1]["labels"].shape == (0,) and targets[1]["boxes"].shape == (0, 4)
    assert targets[1]["query_boxes"].shape == (0, 4)


# ------------------------------------------------------------------------------ auxiliary heads
def test_auxiliary_heads_unused_at_detr_inference():
    head = FakeAuxHead("one-stage")
    model = build_tiny_dino(aux_heads=given(head), eval_module="detr").eval()
    inputs = synthetic_batch([(64, 64)], [[[4, 4, 30, 30]]], [[1]])
    outputs = model(inputs)
    assert head.calls == 0 and head.inference_calls == 0
    assert len(outputs) == 1 and len(outputs[0]["instances"]) > 0


def test_auxiliary_head_produces_output_with_its_eval_module():
    heads = [FakeAuxHead("two-stage"), FakeAuxHead("one-stage")]
    model = build_tiny_dino(aux_heads=given(*heads), eval_module="one-stage").eval()
    inputs = synthetic_batch([(64, 64)], [[]], [[]], output_sizes=[(128, 64)])
    (output,) = model(inputs)
    assert heads[1].inference_calls == 1
    assert heads[0].inference_calls == 0 and heads[0].calls == heads[1].calls == 0
    instances = output["instances"]
    assert instances.image_size == (128, 64)
    # rescaled from the 64 x 64 input to 128 x 64
    torch.testing.assert_close(instances.pred_boxes.tensor, torch.tensor([[0.0, 0.0, 32.0, 64.0]]))
    assert sorted(heads[1].features) == ["p2", "p3", "p4", "p5", "p6", "p7"]


def _assignments():
    """Hand-made one-to-many assignments of two images (64 x 64 and 48 x 56): 3 positives each,
    plus negatives."""
    image0 = AssignedCoords(
        boxes=torch.tensor(
            [[0, 0, 16, 16], [4, 4, 30, 40], [8, 8, 32, 44], [40, 40, 60, 60], [10, 12, 60, 58]],
            dtype=torch.float32,
        ),
        labels=torch.tensor([NUM_CLASSES, 1, 1, NUM_CLASSES, 2]),
        target_boxes=torch.tensor(
            [[0, 0, 0, 0], [4, 4, 30, 40], [4, 4, 30, 40], [0, 0, 0, 0], [10, 12, 60, 58]],
            dtype=torch.float32,
        ),
    )
    image1 = AssignedCoords(
        boxes=torch.tensor(
            [[0, 0, 20, 20], [2, 2, 18, 22], [20, 20, 40, 40], [1, 0, 21, 19]], dtype=torch.float32
        ),
        labels=torch.tensor([4, 4, NUM_CLASSES, 4]),
        target_boxes=torch.tensor(
            [[0, 0, 20, 20], [0, 0, 20, 20], [0, 0, 0, 0], [0, 0, 20, 20]], dtype=torch.float32
        ),
    )
    return [image0, image1]


def test_training_step_with_auxiliary_heads_and_positive_queries():
    torch.manual_seed(0)
    heads = [FakeAuxHead("one-stage", _assignments()), FakeAuxHead("two-stage", _assignments())]
    model = build_tiny_dino(
        aux_heads=given(*heads),
        positive_queries=functools.partial(DINOPositiveQueryBuilder, min_queries=3),
        lambda_1=2.0,
        lambda_2=6.0,
    ).train()
    builder = model.positive_queries
    inputs = synthetic_batch(
        [(64, 64), (48, 56)],
        [[[4, 4, 30, 40], [10, 12, 60, 58]], [[0, 0, 20, 20]]],
        [[1, 2], [4]],
    )
    encoded = []
    encode = model.query_head.encode
    model.query_head.encode = lambda *args: encoded.append(encode(*args)) or encoded[-1]

    losses = model(inputs)
    sum(losses.values()).backward()

    head_keys = {"aux0.loss_fake", "aux1.loss_fake"}
    positive_keys = {
        f"{prefix}{name}_aux{k}" for prefix in ("", "d0.") for name in LOSS_NAMES for k in (0, 1)
    }
    dino_keys = {
        f"{prefix}{name}" for prefix in ("", "d0.", "enc_", "dn_", "d0.dn_") for name in LOSS_NAMES
    }
    assert set(losses) == head_keys | positive_keys | dino_keys
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(v > 0 for k, v in losses.items() if k in positive_keys)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    assert heads[0].calls == heads[1].calls == 1
    # every auxiliary-head loss is scaled by lambda_2 x 2 decoder layers
    for k, head in enumerate(heads):
        own_loss = head.scale * sum(f.pow(2).mean() for f in head.features.values())
        torch.testing.assert_close(losses[f"aux{k}.loss_fake"], 12.0 * own_loss)

    # the heads see the encoder memory as maps, plus one stride-2 level
    (memory,) = encoded
    features = heads[0].features
    assert list(features) == ["p2", "p3", "p4", "p5", "p6", "p7"]
    sizes = [tuple(f.shape[-2:]) for f in features.values()]
    assert sizes == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]
    for level, expected in zip(features.values(), memory.to_maps()):
        torch.testing.assert_close(level, expected, rtol=0, atol=0)
    torch.testing.assert_close(features["p7"], model.aux_extra_level(features["p6"]))

    # positive-query losses: the head's queries decoded on that memory with fixed targets
    normalizers = torch.tensor([[64.0, 64.0, 64.0, 64.0], [56.0, 48.0, 56.0, 48.0]])
    with torch.no_grad():
        for k in (0, 1):
            queries = builder(k, _assignments(), normalizers, {})
            assert queries.target_labels.tolist() == [[1, 1, 2], [4, 4, 4]]
            expected = model.query_head.extra_query_losses(
                memory, queries, weight=2.0, suffix=f"_aux{k}"
            )
            assert len(expected) == 6
            for name, value in expected.items():
                torch.testing.assert_close(losses[name].detach(), value, rtol=1e-5, atol=1e-6)


def test_training_step_without_positive_queries():
    head = FakeAuxHead("one-stage", _assignments())
    model = build_tiny_dino(aux_heads=given(head)).train()
    inputs = synthetic_batch([(64, 64), (48, 56)], [[[4, 4, 30, 40]], []], [[1], []])
    losses = model(inputs)
    assert "aux0.loss_fake" in losses
    assert not any(k.endswith("_aux0") for k in losses)


# ------------------------------------------------------------------------------ config
def test_full_size_config_instantiates():
    cfg = full_dino_config()
    model = instantiate(cfg.model)
    assert isinstance(model, CoDETR)
    head = model.query_head
    assert isinstance(head, DINOHead)
    assert head.num_classes == 80 and head.num_queries == 900
    assert head.num_candidates == 900 and head.max_detections == 300
    assert head.soft_nms_iou_threshold == 0.8
    assert len(head.encoder.layers) == 6 and head.decoder.num_layers == 6
    assert head.level_embeds.shape == (5, 256)
    assert head.query_embed.weight.shape == (900, 256)
    assert head.denoising.label_embedding.weight.shape == (80, 256)
    assert head.denoising.num_dn_queries == 100
    assert head.loss.num_classes == 80
    assert head.encoder.layers[0].ffn.linear1.out_features == 2048
    assert head.position_embedding.temperature == 20 and head.position_embedding.normalize
    shapes = model.neck.output_shape()
    assert list(shapes) == ["p2", "p3", "p4", "p5", "p6"]
    assert [s.stride for s in shapes.values()] == [4, 8, 16, 32, 64]
    backbone_shapes = model.backbone.output_shape()
    assert [backbone_shapes[f"res{i}"].channels for i in range(2, 6)] == [256, 512, 1024, 2048]
    assert model.input_format == "RGB" and model.eval_module == "detr"
    torch.testing.assert_close(model.pixel_mean.flatten(), torch.tensor([123.675, 116.28, 103.53]))
    torch.testing.assert_close(model.pixel_std.flatten(), torch.tensor([58.395, 57.12, 57.375]))
    assert len(model.aux_heads) == 0 and model.positive_queries is None


def test_config_round_trips_lazyconfig_save(tmp_path):
    cfg = full_dino_config()
    cfg.model.query_head.num_classes = 7
    path = str(tmp_path / "dino.yaml")
    LazyConfig.save(cfg, path)
    assert not os.path.exists(path + ".pkl")
    reloaded = LazyConfig.load(path)
    # the class count stays a single setting
    container = OmegaConf.to_container(reloaded, resolve=False)
    assert container["model"]["query_head"]["denoising"]["num_classes"] == (
        "${model.query_head.num_classes}"
    )
    reloaded.model.query_head.num_classes = 3
    torch.manual_seed(0)
    original_model = instantiate(cfg.model)
    reloaded_model = instantiate(reloaded.model)
    assert reloaded_model.query_head.denoising.label_embedding.num_embeddings == 3
    assert original_model.query_head.denoising.label_embedding.num_embeddings == 7
    original = {k: v.shape for k, v in original_model.state_dict().items()}
    restored = {k: v.shape for k, v in reloaded_model.state_dict().items()}
    assert original.keys() == restored.keys()
    for key, shape in original.items():
        if "class_heads" in key or "label_embedding" in key:
            continue
        assert restored[key] == shape, key
