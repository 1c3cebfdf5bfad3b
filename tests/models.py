"""Small test networks that exercise everything ncnn int8 QAT must handle."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MixedNet(nn.Module):
    """Conv+BN+ReLU, depthwise, grouped conv, residual add, one conv output read by two convs,
    functional-style wiring in forward(), and a Linear head."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        c = width
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True))
        # depthwise + pointwise
        self.dw = nn.Conv2d(c, c, 3, stride=2, padding=1, groups=c, bias=False)
        self.dw_bn = nn.BatchNorm2d(c)
        self.pw = nn.Conv2d(c, 2 * c, 1, bias=False)
        self.pw_bn = nn.BatchNorm2d(2 * c)
        # two branches read the same tensor (the pw output after ReLU)
        self.branch_a = nn.Conv2d(2 * c, 2 * c, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(2 * c)
        self.branch_b = nn.Conv2d(2 * c, 2 * c, 1)
        # grouped conv (kept in float by default)
        self.grouped = nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=4, bias=False)
        self.grouped_bn = nn.BatchNorm2d(2 * c)
        # a conv whose output also feeds the residual add: its BN must not be folded wrongly
        self.down = nn.Conv2d(2 * c, 4 * c, 3, stride=2, padding=1, bias=False)
        self.down_bn = nn.BatchNorm2d(4 * c)
        self.fc = nn.Linear(4 * c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = F.relu(self.dw_bn(self.dw(x)))
        x = F.relu(self.pw_bn(self.pw(x)))
        a = self.bn_a(self.branch_a(x))
        b = self.branch_b(x)
        x = F.relu(a + b) + x  # residual add
        x = F.relu(self.grouped_bn(self.grouped(x)))
        x = F.relu(self.down_bn(self.down(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


class SharedOutputNet(nn.Module):
    """A conv (with BN) whose output is read by BN and by another op: BN must not be folded."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        z = self.bn(y) + y  # y feeds BN and the add
        return self.head(F.adaptive_avg_pool2d(F.relu(z), 1).flatten(1))
