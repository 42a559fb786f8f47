"""Multi-layer perceptron with ReLU between its linear layers."""

from torch import nn

__all__ = ["MLP"]


class MLP(nn.Sequential):
    """
    ``Linear, ReLU, Linear, ..., ReLU, Linear`` with ``num_layers`` linear layers, as a flat
    ``nn.Sequential`` so that the linear layers' parameters are named ``0.*``, ``2.*``, ``4.*``.
    Maps (..., input_dim) to (..., output_dim).
    """

    def __init__(self, *, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        """
        Args:
            input_dim: input channels.
            hidden_dim: output channels of every linear layer but the last.
            output_dim: output channels.
            num_layers: number of linear layers, at least 2.
        """
        if num_layers < 2:
            raise ValueError(f"num_layers must be at least 2, got {num_layers}")
        in_dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        out_dims = [hidden_dim] * (num_layers - 1) + [output_dim]
        layers = []
        for in_dim, out_dim in zip(in_dims, out_dims):
            layers += [nn.Linear(in_dim, out_dim), nn.ReLU()]
        super().__init__(*layers[:-1])
