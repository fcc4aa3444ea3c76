"""The paper's architectures, in the CIFAR-size variants where it uses CIFAR.

  lenet300   LeNet-300-100: MLP 784-300-100-10 (266,610 parameters on MNIST)
  lenet5     LeNet-5 in the Caffe variant of the pruning literature: conv 20 / conv 50 (5x5,
             max-pooled), fc 500, fc 10 (431,080 parameters on MNIST)
  vgg16      VGG-16 with BatchNorm, CIFAR variant (3x3 convs, one linear classifier; 14,728,266 on CIFAR-10)
  vgg19      VGG-19 likewise (20,040,522 on CIFAR-10)
  resnet18   ResNet-18, CIFAR variant (3x3 stem, no max-pool; 11,173,962 on CIFAR-10)

All are plain torch.nn models; dwf_kernels.factorize turns their Linear/Conv layers into DWF layers.
"""

from __future__ import annotations

import math

from torch import nn

MODELS = ("lenet300", "lenet5", "vgg16", "vgg19", "resnet18")

_VGG_CFG = {
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


def lenet300(in_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(in_shape), 300),
        nn.ReLU(),
        nn.Linear(300, 100),
        nn.ReLU(),
        nn.Linear(100, num_classes),
    )


def lenet5(in_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    channels, height, width = in_shape
    h, w = ((height - 4) // 2 - 4) // 2, ((width - 4) // 2 - 4) // 2
    return nn.Sequential(
        nn.Conv2d(channels, 20, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(20, 50, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(50 * h * w, 500),
        nn.ReLU(),
        nn.Linear(500, num_classes),
    )


def vgg(name: str, in_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    layers: list[nn.Module] = []
    channels = in_shape[0]
    pools = 0
    for v in _VGG_CFG[name]:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
            pools += 1
        else:
            layers += [nn.Conv2d(channels, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            channels = v
    spatial = (in_shape[1] >> pools) * (in_shape[2] >> pools)
    if spatial != 1:  # e.g. 64x64 Tiny ImageNet: average what is left
        layers.append(nn.AdaptiveAvgPool2d(1))
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(512, num_classes))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = nn.functional.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return nn.functional.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        blocks, in_planes = [], 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1)]
            in_planes = planes
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        out = nn.functional.relu(self.bn1(self.conv1(x)))
        return self.fc(self.pool(self.layers(out)).flatten(1))


def build_model(name: str, in_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """The dense torch.nn model `name` for inputs of shape in_shape (C, H, W)."""
    if name == "lenet300":
        return lenet300(in_shape, num_classes)
    if name == "lenet5":
        return lenet5(in_shape, num_classes)
    if name in _VGG_CFG:
        return vgg(name, in_shape, num_classes)
    if name == "resnet18":
        return ResNet18(in_shape[0], num_classes)
    raise ValueError(f"model must be one of {list(MODELS)}; got {name!r}")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
