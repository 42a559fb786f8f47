import math

import pytest
import torch

from codetr.layers import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, inverse_sigmoid


def test_cxcywh_to_xyxy_hand_case():
    boxes = torch.tensor([[5.0, 6.0, 4.0, 2.0], [0.5, 0.5, 1.0, 1.0]])
    expected = torch.tensor([[3.0, 5.0, 7.0, 7.0], [0.0, 0.0, 1.0, 1.0]])
    assert torch.equal(box_cxcywh_to_xyxy(boxes), expected)


def test_xyxy_to_cxcywh_hand_case():
    boxes = torch.tensor([[3.0, 5.0, 7.0, 7.0], [0.0, 0.0, 1.0, 1.0]])
    expected = torch.tensor([[5.0, 6.0, 4.0, 2.0], [0.5, 0.5, 1.0, 1.0]])
    assert torch.equal(box_xyxy_to_cxcywh(boxes), expected)


def test_round_trip_with_leading_dims():
    torch.manual_seed(0)
    boxes = torch.cat([torch.rand(2, 3, 5, 2), torch.rand(2, 3, 5, 2) + 0.1], dim=-1)
    converted = box_cxcywh_to_xyxy(boxes)
    assert converted.shape == (2, 3, 5, 4)
    torch.testing.assert_close(box_xyxy_to_cxcywh(converted), boxes)
    torch.testing.assert_close(box_cxcywh_to_xyxy(box_xyxy_to_cxcywh(converted)), converted)


def test_empty_boxes():
    assert box_cxcywh_to_xyxy(torch.zeros(0, 4)).shape == (0, 4)
    assert box_xyxy_to_cxcywh(torch.zeros(0, 4)).shape == (0, 4)


def test_bad_last_dim_raises():
    with pytest.raises(ValueError, match="last dimension"):
        box_cxcywh_to_xyxy(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="last dimension"):
        box_xyxy_to_cxcywh(torch.zeros(3))


def test_inverse_sigmoid_inverts_sigmoid():
    logits = torch.tensor([-3.0, -0.5, 0.0, 0.7, 4.0], dtype=torch.float64)
    torch.testing.assert_close(inverse_sigmoid(logits.sigmoid()), logits)


def test_inverse_sigmoid_clamps():
    x = torch.tensor([-1.0, 0.0, 1e-7, 1.0, 2.0], dtype=torch.float64)
    out = inverse_sigmoid(x, eps=1e-3)
    # values outside [0, 1] are clamped into it; each side of the ratio is clamped by eps
    expected = torch.tensor(
        [
            math.log(1e-3 / 1.0),
            math.log(1e-3 / 1.0),
            math.log(1e-3 / (1 - 1e-7)),
            math.log(1.0 / 1e-3),
            math.log(1.0 / 1e-3),
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(out, expected)
    # default eps is 1e-5
    torch.testing.assert_close(
        inverse_sigmoid(torch.tensor([0.0, 1.0], dtype=torch.float64)),
        torch.tensor([math.log(1e-5), -math.log(1e-5)], dtype=torch.float64),
    )
