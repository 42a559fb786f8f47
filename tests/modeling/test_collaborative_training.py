"""The collaborative branch of Co-DINO in a training step: what it adds and where its
gradient goes."""

import os

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "parity", "tiny_co_dino_r50.py")


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


@pytest.fixture(scope="module")
def losses_and_model():
    torch.manual_seed(0)
    model = instantiate(LazyConfig.load(CONFIG).model).train()
    with EventStorage():
        losses = model(_batch())
    return losses, model


def _is_collaborative(name: str) -> bool:
    return name.startswith("aux") or "_aux" in name


def test_collaborative_losses_are_finite_and_named_per_head(losses_and_model):
    losses, _ = losses_and_model
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
    for head in (0, 1):
        for loss in ("loss_class", "loss_bbox", "loss_giou"):
            assert f"{loss}_aux{head}" in losses and f"d0.{loss}_aux{head}" in losses
    assert all(torch.isfinite(losses[k]) for k in collaborative)


def test_collaborative_losses_train_the_encoder_and_backbone(losses_and_model):
    losses, model = losses_and_model
    model.zero_grad()
    sum(v for k, v in losses.items() if _is_collaborative(k)).backward(retain_graph=True)
    for prefix in ("query_head.encoder.", "neck.", "backbone.res3.", "aux_extra_level."):
        grads = [
            p.grad for n, p in model.named_parameters() if n.startswith(prefix) and p.requires_grad
        ]
        assert grads and any(g is not None and g.abs().sum() > 0 for g in grads), prefix
    # the positive queries go through the shared decoder and prediction heads
    decoder_grads = [
        p.grad for n, p in model.named_parameters() if n.startswith("query_head.decoder.")
    ]
    assert any(g is not None and g.abs().sum() > 0 for g in decoder_grads)
