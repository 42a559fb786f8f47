import math

import torch

from codetr.layers import inverse_sigmoid


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
