"""Architectures. Inputs are always in [0, 1]; normalization is the model's first layer,
so any attack library can use our checkpoints without knowing the dataset's statistics.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bench.errors import BenchError, did_you_mean


class Normalize(nn.Module):
    mean: torch.Tensor  # buffers, registered in __init__
    std: torch.Tensor

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class TwoConvCNN(nn.Module):
    """Two conv layers, each followed by ReLU and 2x2 max pooling, and a two-layer head.

    One class for the three small CNNs of `ARCHS` (they differ only in widths, kernel
    size and the side of the pooled map); the layer names are those of their checkpoints.
    """

    def __init__(
        self, in_ch: int, num_classes: int, widths: tuple[int, int], kernel: int, pooled_side: int, hidden: int
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, widths[0], kernel, padding=kernel // 2)
        self.conv2 = nn.Conv2d(widths[0], widths[1], kernel, padding=kernel // 2)
        self.fc1 = nn.Linear(widths[1] * pooled_side * pooled_side, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def digits_cnn(in_ch: int, num_classes: int) -> TwoConvCNN:
    """A small CNN for 8x8 digits: 3x3 conv 16, pool, 3x3 conv 32, pool, fc 64.

    Kept small on purpose (about 0.2 MFLOP a forward pass) so a 1,000-step PGD over the
    whole digits test set takes seconds on two CPU cores.
    """
    return TwoConvCNN(in_ch, num_classes, (16, 32), 3, 2, 64)


def small_mnist(in_ch: int, num_classes: int) -> TwoConvCNN:
    """A two-conv CNN for 28x28 MNIST that a CPU trains and attacks in minutes: 3x3 conv
    8, pool, 3x3 conv 16, pool, fc 64 (about 0.33 M multiply-adds a forward pass, a
    tenth of Madry et al.'s CNN, whose 1024-wide layer alone costs 3.2 M)."""
    return TwoConvCNN(in_ch, num_classes, (8, 16), 3, 7, 64)


def madry_mnist(in_ch: int, num_classes: int) -> TwoConvCNN:
    """The MNIST CNN of Madry et al.: 5x5 conv 32, pool, 5x5 conv 64, pool, fc 1024."""
    return TwoConvCNN(in_ch, num_classes, (32, 64), 5, 7, 1024)


def digits_mlp(in_ch: int, num_classes: int) -> nn.Sequential:
    """A ReLU MLP for 8x8 digits small enough for complete verification (bench.verify):
    64 -> 32 -> 32 -> classes, no pooling. At eps 0.2 the MILP decides over 99% of the
    360 test images within 10 s each, naturally or PGD trained (benchmarks/verify_digits.py);
    natural training reaches about 96% clean accuracy."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(in_ch * 64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, num_classes)
    )


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stem, no max-pool, BasicBlocks, global average pooling.

    blocks=(2, 2, 2, 2), widths=(64, 128, 256, 512) is ResNet-18 as the seeds use it;
    blocks=(1, 1, 1), widths=(16, 32, 64) is the 8-layer ResNet for SVHN.
    """

    def __init__(self, in_ch: int, num_classes: int, blocks: tuple[int, ...], widths: tuple[int, ...]):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_ch, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        layers, cin = [], widths[0]
        for i, (n, w) in enumerate(zip(blocks, widths, strict=True)):
            for j in range(n):
                layers.append(BasicBlock(cin, w, 2 if (j == 0 and i > 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class WideBlock(nn.Module):
    """Pre-activation wide block (Zagoruyko & Komodakis)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if (cin == cout and stride == 1) else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        o = F.relu(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(F.relu(self.bn2(y)))
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    def __init__(self, in_ch: int, num_classes: int, depth: int, widen: int):
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_ch, widths[0], 3, 1, 1, bias=False)
        layers, cin = [], widths[0]
        for i, w in enumerate(widths[1:]):
            for j in range(n):
                layers.append(WideBlock(cin, w, 2 if (j == 0 and i > 0) else 1))
                cin = w
        self.blocks = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = F.relu(self.bn(self.blocks(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class PatchCNN(nn.Module):
    """A net small enough to train and attack at ImageNet's 224 pixels on a CPU in seconds:
    8x8 patches (a stride-8 convolution), one more convolution, global average pooling and
    a linear head. For smoke tests and tutorials of the ImageNet path, not for ranking."""

    def __init__(self, in_ch: int, num_classes: int, width: int = 16):
        super().__init__()
        self.patch = nn.Conv2d(in_ch, width, 8, stride=8)
        self.conv = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = F.relu(self.conv(F.relu(self.patch(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _torchvision(name: str, **settings) -> Callable[[int, int], nn.Module]:
    """An ImageNet architecture as torchvision defines it, freshly initialized (weights are
    never downloaded: `bench eval --weights` gives trained ones)."""

    def build(channels: int, num_classes: int) -> nn.Module:
        if channels != 3:
            raise BenchError(f"architecture {name!r} takes RGB images (3 channels), not {channels}; use it on imagenet")
        # torchvision's model zoo (a second to import) serves these architectures alone:
        # imported when one is built, so a command on the small datasets does not pay for it.
        from torchvision import models

        return getattr(models, name)(weights=None, num_classes=num_classes, **settings)

    return build


ARCHS: dict[str, Callable[[int, int], nn.Module]] = {
    "digits_cnn": digits_cnn,
    "digits_mlp": digits_mlp,
    "madry_mnist": madry_mnist,
    "mnist_small": small_mnist,
    "resnet18": lambda c, k: ResNet(c, k, (2, 2, 2, 2), (64, 128, 256, 512)),
    "resnet8": lambda c, k: ResNet(c, k, (1, 1, 1), (16, 32, 64)),
    "wrn28_10": lambda c, k: WideResNet(c, k, 28, 10),
    "wrn34_10": lambda c, k: WideResNet(c, k, 34, 10),
    # ImageNet: RobustBench's ResNet-50, Kannan et al.'s ResNet-101 and InceptionV3 (at the
    # evaluation crop of 224, not the 299 Kannan et al. fed it; without the auxiliary head).
    "imagenet_tiny": PatchCNN,
    "resnet50": _torchvision("resnet50"),
    "resnet101": _torchvision("resnet101"),
    "inception_v3": _torchvision("inception_v3", aux_logits=False, init_weights=True),
}


def build_model(arch: str, spec) -> nn.Module:
    """`spec` is a bench.core.data.DatasetSpec: channels, classes and normalization."""
    if arch not in ARCHS:
        raise BenchError(
            f"unknown architecture {arch!r}{did_you_mean(arch, ARCHS, n=2)} (architectures: {', '.join(ARCHS)})"
        )
    net = ARCHS[arch](spec.shape[0], spec.num_classes)
    return nn.Sequential(Normalize(spec.mean, spec.std), net)
