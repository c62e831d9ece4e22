"""ResNet-50 (torchvision's layout, written out here: no torchvision dependency), random weights.

`width` scales every layer's channels, so `width=0.5` is the hand-narrowed ResNet-50 that a
uniform 0.5 channel pruning of every prunable group would approach.
"""

from __future__ import annotations

import torch
from torch import nn


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, mid: int, stride: int, out: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, out, 1, bias=False), nn.BatchNorm2d(out)
        self.relu = nn.ReLU()
        self.down = None
        if stride != 1 or cin != out:
            self.down = nn.Sequential(nn.Conv2d(cin, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + (self.down(x) if self.down is not None else x))


class ResNet50(nn.Module):
    def __init__(self, width: float = 1.0, classes: int = 1000):
        super().__init__()
        w = lambda c: max(1, int(round(c * width)))  # noqa: E731
        self.stem = nn.Sequential(nn.Conv2d(3, w(64), 7, 2, 3, bias=False), nn.BatchNorm2d(w(64)), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        layers, cin = [], w(64)
        for mid, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for i in range(blocks):
                layers.append(Bottleneck(cin, w(mid), stride if i == 0 else 1, w(mid * 4)))
                cin = w(mid * 4)
        self.layers = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes))

    def forward(self, x):
        return self.head(self.layers(self.stem(x)))


def export_resnet50(path: str, *, width: float = 1.0, size: int = 224, seed: int = 0) -> None:
    """Export ResNet-50 (eval mode, random weights, BN statistics randomised) with a symbolic batch."""
    torch.manual_seed(seed)
    model = ResNet50(width).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):  # non-trivial BN so fold-bn and pruning have work
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    torch.onnx.export(model, (torch.randn(1, 3, size, size),), path, input_names=["images"],
                      output_names=["logits"], dynamic_axes={"images": {0: "N"}, "logits": {0: "N"}},
                      opset_version=17, dynamo=False)
