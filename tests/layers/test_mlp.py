import pytest
import torch
from torch import nn

from codetr.layers import MLP


def test_structure_and_state_dict_keys():
    mlp = MLP(input_dim=6, hidden_dim=5, output_dim=4, num_layers=3)
    assert [type(m) for m in mlp] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert list(mlp.state_dict().keys()) == [
        "0.weight",
        "0.bias",
        "2.weight",
        "2.bias",
        "4.weight",
        "4.bias",
    ]
    assert mlp[0].weight.shape == (5, 6)
    assert mlp[2].weight.shape == (5, 5)
    assert mlp[4].weight.shape == (4, 5)


def test_two_layers_forward():
    torch.manual_seed(0)
    mlp = MLP(input_dim=3, hidden_dim=7, output_dim=2, num_layers=2)
    assert len(mlp) == 3
    x = torch.randn(2, 5, 3)
    expected = mlp[2](torch.relu(mlp[0](x)))
    torch.testing.assert_close(mlp(x), expected)


def test_too_few_layers_raises():
    with pytest.raises(ValueError, match="num_layers"):
        MLP(input_dim=3, hidden_dim=3, output_dim=3, num_layers=1)
