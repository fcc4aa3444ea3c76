"""Datasets: the embedded digits, deterministic batch order, and clear errors for missing data."""

import os

import pytest
import torch
from paper.data import DatasetMissingError, load_data


def test_mnist5k_split_and_normalization():
    data = load_data("mnist5k", batch_size=128, seed=0)
    assert (data.train_size, data.test_size, data.in_shape, data.num_classes) == (4000, 1000, (1, 28, 28), 10)
    x_train, y_train = data._train
    x_test, y_test = data._test
    assert torch.bincount(y_test, minlength=10).min() > 60  # shuffled: every digit in the test split
    assert abs(x_train.mean().item()) < 0.1 and abs(x_train.std().item() - 1) < 0.1
    # The split does not depend on the run's seed; the test set is the same for every run.
    assert torch.equal(load_data("mnist5k", batch_size=64, seed=5)._test[1], y_test)


def test_batch_order_is_a_function_of_seed_and_epoch():
    data = load_data("mnist5k", batch_size=500, seed=3)
    first = [y for _, y in data.train_batches(epoch=2)]
    again = [y for _, y in data.train_batches(epoch=2)]
    other = [y for _, y in data.train_batches(epoch=3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])
    assert sum(len(y) for y in first) == 4000 and data.num_train_batches() == 8


@pytest.mark.parametrize(
    "name,folder",
    [
        ("mnist", os.path.join("MNIST", "raw")),
        ("fashion-mnist", os.path.join("FashionMNIST", "raw")),
        ("cifar10", "cifar-10-batches-py"),
        ("cifar100", "cifar-100-python"),
        ("tiny-imagenet", "tiny-imagenet-200"),
    ],
)
def test_missing_dataset_says_what_to_put_where(tmp_path, name, folder):
    with pytest.raises(DatasetMissingError) as info:
        load_data(name, batch_size=8, seed=0, data_root=str(tmp_path))
    message = str(info.value)
    assert name in message and os.path.join(str(tmp_path), folder) in message
    assert not any(tmp_path.iterdir()) or name != "tiny-imagenet"  # nothing was downloaded


def test_unknown_dataset():
    with pytest.raises(ValueError, match="dataset must be one of"):
        load_data("imagenet", batch_size=8, seed=0)


def test_tiny_imagenet_layout(tmp_path):
    """The ImageFolder train split and the val split read from val_annotations.txt."""
    from PIL import Image

    base = tmp_path / "tiny-imagenet-200"
    wnids = ["n01443537", "n01629819"]
    for k, wnid in enumerate(wnids):
        folder = base / "train" / wnid / "images"
        folder.mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (64, 64), color=(40 * k, 10 * i, 0)).save(folder / f"{wnid}_{i}.JPEG")
    (base / "val" / "images").mkdir(parents=True)
    rows = []
    for i, wnid in enumerate([wnids[1], wnids[0]]):
        Image.new("RGB", (64, 64)).save(base / "val" / "images" / f"val_{i}.JPEG")
        rows.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(rows) + "\n")
    data = load_data("tiny-imagenet", batch_size=4, seed=0, data_root=str(tmp_path))
    assert (data.train_size, data.test_size, data.in_shape, data.num_classes) == (6, 2, (3, 64, 64), 200)
    x, y = next(iter(data.test_batches()))
    assert x.shape == (2, 3, 64, 64) and y.tolist() == [1, 0]
    assert sum(len(y) for _, y in data.train_batches(0)) == 6
