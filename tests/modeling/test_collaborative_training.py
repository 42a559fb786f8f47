"""The collaborative branch of Co-DINO in a training step: what it adds, with which weights, and
where its gradient goes.

The losses of a step are checked against numbers computed apart from the model's loss code:

* the query head's own losses against the same model without the collaborative branch;
* each auxiliary head's losses against the head called on its own (same inputs, same random
  state) times lambda_2 x the number of decoder layers (``model.lambda_2``: the paper adds the
  auxiliary losses once per decoder layer);
* the positive queries' losses against quality focal, L1 and GIoU losses written out here in
  float64 from the decoder's output for those queries, times lambda_1 (``model.lambda_1``).
"""

import os
from typing import Dict, List

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import LazyConfig
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from .tiny_models import build_tiny_dino, expected_detection_losses

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "parity", "tiny_co_dino_r50.py")

NUM_CLASSES = 80  # of the tiny Co-DINO config
NUM_HEADS = 2
# DetectionLoss weights of the query head in configs/models/dino_r50.py: class 1, L1 5, GIoU 2
CLASS_WEIGHT, L1_WEIGHT, GIOU_WEIGHT = 1.0, 5.0, 2.0
# float32 losses against their float64 recomputation: sums of a few hundred float32 terms
RTOL, ATOL = 1e-5, 1e-6


def _batch():
    generator = torch.Generator().manual_seed(0)
    first = Instances((96, 112))
    first.gt_boxes = Boxes(torch.tensor([[10.0, 12.0, 60.0, 70.0], [50.0, 20.0, 100.0, 90.0]]))
    first.gt_classes = torch.tensor([3, 17])
    empty = Instances((80, 96))
    empty.gt_boxes = Boxes(torch.zeros((0, 4)))
    empty.gt_classes = torch.zeros((0,), dtype=torch.long)
    return [
        {
            "image": torch.randint(0, 256, (3, 96, 112), dtype=torch.uint8, generator=generator),
            "instances": first,
        },
        {
            "image": torch.randint(0, 256, (3, 80, 96), dtype=torch.uint8, generator=generator),
            "instances": empty,
        },
    ]


def _empty_batch():
    """Two 96 x 96 images without objects (same size: every anchor of the padded batch is
    inside both images)."""
    generator = torch.Generator().manual_seed(1)
    batch = []
    for _ in range(2):
        instances = Instances((96, 96))
        instances.gt_boxes = Boxes(torch.zeros((0, 4)))
        instances.gt_classes = torch.zeros((0,), dtype=torch.long)
        image = torch.randint(0, 256, (3, 96, 96), dtype=torch.uint8, generator=generator)
        batch.append({"image": image, "instances": instances})
    return batch


def _build(*overrides: str, seed: int = 0):
    """The tiny Co-DINO with LazyConfig ``overrides`` ("model.lambda_2=12.0"), its last
    box-prediction layers set to small random values (they start at zero, which makes every
    decoder layer predict its reference box and every layer's losses equal)."""
    cfg = LazyConfig.load(CONFIG)
    cfg = LazyConfig.apply_overrides(cfg, list(overrides))
    model = build_tiny_dino(seed=seed, cfg=cfg)
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for head in model.query_head.box_heads:
            head[-1].weight.copy_(torch.randn(head[-1].weight.shape, generator=generator) * 0.02)
            head[-1].bias.copy_(torch.randn(head[-1].bias.shape, generator=generator) * 0.1)
    return model.train()


class _Record:
    """What a training step passed through the collaborative branch."""

    def __init__(self):
        self.aux_inputs: List[tuple] = []  # per head: (features, images, gt_instances)
        self.aux_rng: List[torch.Tensor] = []  # per head: torch's RNG state before its call
        self.aux_losses: List[Dict[str, torch.Tensor]] = []  # per head: its own losses
        self.queries: List = []  # per head: the query group of its positives
        self.decoder_calls: List[tuple] = []  # (query content, (hidden, boxes))
        self.atss_logits: List[torch.Tensor] = []  # per level (B, K, H, W)
        self.roi_logits: List[torch.Tensor] = []  # (R, K + 1)

    def decoded(self, queries):
        """(hidden, boxes) of the decoder call that decoded ``queries``."""
        (output,) = [out for content, out in self.decoder_calls if content is queries.content]
        return output


def _run(model, batch, seed: int = 0):
    """One training step's losses (no backward) and its :class:`_Record`."""
    record = _Record()

    def before_aux_head(module, inputs):
        record.aux_rng.append(torch.get_rng_state())

    def after_aux_head(module, inputs, output):
        record.aux_inputs.append(inputs)
        record.aux_losses.append(output[0])

    def after_positive_queries(module, inputs, output):
        record.queries.append(output)

    def after_decoder(module, inputs, output):
        record.decoder_calls.append((inputs[0], output))

    def keep_in(outputs):
        return lambda module, inputs, output: outputs.append(output.detach())

    hooks = [(model.query_head.decoder, after_decoder)]
    if model.positive_queries is not None:
        hooks.append((model.positive_queries, after_positive_queries))
    handles = []
    for head in model.aux_heads:
        handles.append(head.register_forward_pre_hook(before_aux_head))
        hooks.append((head, after_aux_head))
        if hasattr(head, "cls_score"):  # the ATSS head
            hooks.append((head.cls_score, keep_in(record.atss_logits)))
        if hasattr(head, "roi_heads"):  # the Faster R-CNN head
            hooks.append((head.roi_heads.box_predictor.cls_score, keep_in(record.roi_logits)))
    # (a forward hook that returns something replaces the module's output: these return None)
    handles += [module.register_forward_hook(hook) for module, hook in hooks]
    torch.manual_seed(seed)
    try:
        with EventStorage():
            losses = model(batch)
    finally:
        for handle in handles:
            handle.remove()
    return losses, record


def _is_collaborative(name: str) -> bool:
    return name.startswith("aux") or "_aux" in name


def _is_positive_query_loss(name: str) -> bool:
    return "_aux" in name


def _expected_positive_query_losses(model, queries, decoded, weight: float, suffix: str):
    """
    The losses of a group of positive queries from the decoder's hidden states and boxes for
    it: per decoder layer, quality focal, L1 and GIoU losses against the group's targets
    written out in float64 (:func:`expected_detection_losses`, normalised by the positive
    queries of the batch, at least 1), times the head's weights (1, 5, 2) and ``weight``
    (lambda_1).
    """
    hidden, boxes = decoded
    num_layers = len(hidden)
    expected = {}
    for layer in range(num_layers):
        class_head = model.query_head.class_heads[layer]
        logits = F.linear(hidden[layer], class_head.weight, class_head.bias)
        losses = expected_detection_losses(
            logits.flatten(0, 1),
            boxes[layer].flatten(0, 1),
            queries.target_labels.flatten(),
            queries.target_boxes.flatten(0, 1),
            num_classes=NUM_CLASSES,
            weights=(CLASS_WEIGHT, L1_WEIGHT, GIOU_WEIGHT),
        )
        prefix = "" if layer == num_layers - 1 else f"d{layer}."
        expected.update({f"{prefix}{k}{suffix}": v * weight for k, v in losses.items()})
    return expected


def _head_losses_called_alone(head, record, index):
    """The head's own losses, from a call of the head alone on the inputs and with the random
    state it had in the training step."""
    saved = torch.get_rng_state()
    torch.set_rng_state(record.aux_rng[index])
    try:
        with EventStorage():
            losses, _ = head(*record.aux_inputs[index])
    finally:
        torch.set_rng_state(saved)
    return losses


@pytest.fixture(scope="module")
def model():
    return _build()


@pytest.fixture(scope="module")
def step(model):
    return _run(model, _batch())


def test_collaborative_losses_are_finite_and_named_per_head(step):
    losses, _ = step
    collaborative = sorted(k for k in losses if _is_collaborative(k))
    assert {k for k in collaborative if k.startswith("aux0.")} == {
        "aux0.loss_rpn_cls",
        "aux0.loss_rpn_loc",
        "aux0.loss_cls",
        "aux0.loss_box_reg",
    }
    assert {k for k in collaborative if k.startswith("aux1.")} == {
        "aux1.loss_cls",
        "aux1.loss_bbox",
        "aux1.loss_centerness",
    }
    assert {k for k in collaborative if _is_positive_query_loss(k)} == {
        f"{layer}{loss}_aux{head}"
        for layer in ("", "d0.")
        for loss in ("loss_class", "loss_bbox", "loss_giou")
        for head in (0, 1)
    }
    assert all(torch.isfinite(losses[k]) for k in collaborative)


def _ablation(model, *overrides: str):
    """The model of the config with ``overrides``, holding ``model``'s parameters (a model
    without positive queries draws its extra level's initial weights from another random
    state)."""
    ablated = _build(*overrides)
    incompatible = ablated.load_state_dict(model.state_dict(), strict=False)
    assert not incompatible.missing_keys
    assert all(k.startswith(("aux_", "positive_queries.")) for k in incompatible.unexpected_keys)
    return ablated


def test_query_head_losses_do_not_depend_on_the_collaborative_branch(model, step):
    losses, _ = step
    # the DINO-only ablation of the config: the query head's random draws (denoising) are made
    # before the auxiliary heads run, so they are the same
    dino = _ablation(model, "model.aux_heads=[]", "model.positive_queries=null")
    assert not dino.aux_heads and dino.positive_queries is None
    dino_losses, _ = _run(dino, _batch())
    assert set(dino_losses) == {k for k in losses if not _is_collaborative(k)}
    for name, value in dino_losses.items():
        assert torch.equal(value, losses[name]), name


def test_auxiliary_head_losses_do_not_depend_on_the_positive_queries(model, step):
    losses, _ = step
    # the positive queries of head 0 draw random numbers before head 1 runs, but head 1 (ATSS)
    # draws none
    no_queries = _ablation(model, "model.positive_queries=null")
    assert no_queries.positive_queries is None and len(no_queries.aux_heads) == NUM_HEADS
    ablated, _ = _run(no_queries, _batch())
    assert set(ablated) == {k for k in losses if not _is_positive_query_loss(k)}
    for name, value in ablated.items():
        assert torch.equal(value, losses[name]), name


def _auxiliary_multiplier(cfg) -> float:
    """lambda_2 x the number of decoder layers, from the config."""
    return cfg.model.lambda_2 * cfg.model.query_head.decoder.num_layers


def test_auxiliary_losses_are_the_heads_losses_times_lambda_2(model, step):
    losses, record = step
    multiplier = _auxiliary_multiplier(LazyConfig.load(CONFIG))
    # the authors' tiny model keeps the R50 model's 12 (2 x 6 layers): 6 x 2 layers
    assert multiplier == 12.0
    assert len(record.aux_losses) == NUM_HEADS
    for index, head in enumerate(model.aux_heads):
        alone = _head_losses_called_alone(head, record, index)
        assert {f"aux{index}.{k}" for k in alone} == {
            k for k in losses if k.startswith(f"aux{index}.")
        }
        for name, value in alone.items():
            # a product by the same float32 number: bitwise
            assert torch.equal(losses[f"aux{index}.{name}"], value * multiplier), name


def test_positive_query_losses_recomputed(model, step):
    losses, record = step
    lambda_1 = LazyConfig.load(CONFIG).model.lambda_1
    assert lambda_1 == 1.0
    assert len(record.queries) == NUM_HEADS
    for index, queries in enumerate(record.queries):
        # image 0 has positives, image 1 has no object: all its queries are background
        assert (queries.target_labels[0] < NUM_CLASSES).any()
        assert (queries.target_labels[1] == NUM_CLASSES).all()
        expected = _expected_positive_query_losses(
            model, queries, record.decoded(queries), lambda_1, f"_aux{index}"
        )
        assert set(expected) == {k for k in losses if k.endswith(f"_aux{index}")}
        for name, value in expected.items():
            torch.testing.assert_close(losses[name].double(), value, rtol=RTOL, atol=ATOL, msg=name)


def test_total_loss_is_the_weighted_sum_of_its_parts():
    lambda_1, lambda_2 = 3.0, 2.5
    model = _build(f"model.lambda_1={lambda_1}", f"model.lambda_2={lambda_2}")
    num_layers = model.query_head.decoder.num_layers
    assert num_layers == 2
    losses, record = _run(model, _batch())
    total = sum(losses.values())

    dino = _ablation(model, "model.aux_heads=[]", "model.positive_queries=null")
    dino_losses, _ = _run(dino, _batch())
    query_head = sum(v.double() for v in dino_losses.values())
    auxiliary = sum(
        v.double()
        for index, head in enumerate(model.aux_heads)
        for v in _head_losses_called_alone(head, record, index).values()
    )
    positive_queries = sum(
        v
        for index, queries in enumerate(record.queries)
        for v in _expected_positive_query_losses(
            model, queries, record.decoded(queries), 1.0, f"_aux{index}"
        ).values()
    )
    expected = query_head + lambda_2 * num_layers * auxiliary + lambda_1 * positive_queries
    torch.testing.assert_close(total.double(), expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    "override, is_scaled",
    [
        ("model.lambda_1=2.0", _is_positive_query_loss),
        ("model.lambda_2=12.0", lambda name: name.startswith("aux")),
    ],
)
def test_doubling_a_weight_doubles_only_its_terms(step, override, is_scaled):
    losses, _ = step
    doubled, _ = _run(_build(override), _batch())
    assert set(doubled) == set(losses)
    scaled = [name for name in losses if is_scaled(name)]
    assert len(scaled) in (7, 12)  # 4 + 3 auxiliary-head losses, 2 x 2 x 3 positive-query ones
    for name, value in losses.items():
        # x 2 is exact in floating point: bitwise
        assert torch.equal(doubled[name], 2 * value if name in scaled else value), name


def test_batch_without_objects():
    model = _build()
    losses, record = _run(model, _empty_batch())
    multiplier = _auxiliary_multiplier(LazyConfig.load(CONFIG))
    # nothing to regress: every box loss of every group is exactly zero
    for name in losses:
        if "bbox" in name or "giou" in name or "box_reg" in name or "rpn_loc" in name:
            assert losses[name].item() == 0.0, name
    assert losses["aux1.loss_centerness"].item() == 0.0

    # positive queries: min_queries (9) per image, all background; N = max(0, 1)
    for index, queries in enumerate(record.queries):
        assert queries.target_labels.shape == (2, 9)
        assert (queries.target_labels == NUM_CLASSES).all()
        expected = _expected_positive_query_losses(
            model, queries, record.decoded(queries), 1.0, f"_aux{index}"
        )
        for name, value in expected.items():
            torch.testing.assert_close(losses[name].double(), value, rtol=RTOL, atol=ATOL, msg=name)

    # ATSS: focal loss with target 0, (1 - alpha) p^2 softplus(x), over every anchor and
    # class, / 2 (each image counts 1 positive), x its weight 1 and lambda_2 x 2 layers
    logits = torch.cat([level.double().flatten(2) for level in record.atss_logits], 2)
    assert logits.shape[:2] == (2, NUM_CLASSES)
    focal = (0.75 * logits.sigmoid() ** 2 * F.softplus(logits)).sum() / 2
    torch.testing.assert_close(
        losses["aux1.loss_cls"].double(), focal * 1.0 * multiplier, rtol=RTOL, atol=ATOL
    )
    # Faster R-CNN box branch: mean cross-entropy of the sampled RoIs, all background (label
    # K), x its weight 1 and lambda_2 x 2 layers
    (roi_logits,) = record.roi_logits
    assert roi_logits.shape[1] == NUM_CLASSES + 1
    cross_entropy = -roi_logits.double().log_softmax(1)[:, NUM_CLASSES].mean()
    torch.testing.assert_close(
        losses["aux0.loss_cls"].double(),
        cross_entropy * 1.0 * multiplier,
        rtol=RTOL,
        atol=ATOL,
    )


def test_collaborative_losses_train_the_encoder_and_backbone(model):
    losses, _ = _run(model, _batch())
    model.zero_grad(set_to_none=True)
    sum(v for k, v in losses.items() if _is_collaborative(k)).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for prefix in ("query_head.encoder.", "neck.", "backbone.res3.", "aux_extra_level."):
        prefixed = [g for n, g in grads.items() if n.startswith(prefix)]
        assert prefixed and any(g is not None and g.abs().sum() > 0 for g in prefixed), prefix
    # the positive queries go through the shared decoder and prediction heads
    decoder_grads = [g for n, g in grads.items() if n.startswith("query_head.decoder.")]
    assert any(g is not None and g.abs().sum() > 0 for g in decoder_grads)
    # ... but not through what only the one-to-one branch uses: the matching queries' content,
    # the denoising label embedding, the encoder-proposal projection and its prediction heads
    num_layers = model.query_head.decoder.num_layers
    one_to_one_only = (
        "query_head.query_embed.",
        "query_head.denoising.",
        "query_head.enc_output.",
        "query_head.enc_output_norm.",
        f"query_head.class_heads.{num_layers}.",
        f"query_head.box_heads.{num_layers}.",
    )
    for prefix in one_to_one_only:
        assert any(name.startswith(prefix) for name in grads), prefix
    for name, grad in grads.items():
        if name.startswith(one_to_one_only):
            assert grad is None or not grad.any(), name
    model.zero_grad(set_to_none=True)


def test_one_to_one_losses_do_not_train_the_collaborative_modules(model):
    losses, _ = _run(model, _batch())
    model.zero_grad(set_to_none=True)
    sum(v for k, v in losses.items() if not _is_collaborative(k)).backward()
    for prefix in ("aux_heads.", "positive_queries.", "aux_extra_level."):
        params = [(n, p) for n, p in model.named_parameters() if n.startswith(prefix)]
        assert params, prefix
        for name, param in params:
            assert param.grad is None or not param.grad.any(), name
    model.zero_grad(set_to_none=True)
