"""The small torch net that the fastadam.torch tests train (torch must be importable).

Conv weights (4-D), linear weights (2-D), biases and a LayerNorm (1-D), so it
has every parameter shape an optimizer (or ZeRO's sharding) has to handle.
Smooth on purpose (tanh, average pooling): with ReLU or max pooling, a one-ULP
difference in a weight can flip a kink or an argmax, and two trajectories then
part for reasons that have nothing to do with the optimizer.
"""

from __future__ import annotations

import torch
from torch import nn


class Net(nn.Module):
    """Input (batch, 1, 8, 8) images; output (batch, 5) logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)  # 4 x 8 x 8, pooled to 4 x 4 x 4
        self.conv2 = nn.Conv2d(4, 6, 3)  # 6 x 2 x 2
        self.norm = nn.LayerNorm(24)
        self.fc1 = nn.Linear(24, 16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.avg_pool2d(torch.tanh(self.conv1(x)), 2)
        x = torch.tanh(self.conv2(x)).flatten(1)
        return self.fc2(torch.tanh(self.fc1(self.norm(x))))
