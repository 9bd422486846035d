"""The synthetic stand-ins are read by the real loaders exactly as the real files would be (layout, splits, labels),
and the same seed writes the same bytes."""

import hashlib

from common.config import DataSpec
from common.data import load_dataset
from common.synthetic import cifar10_archive, imagenet_folder


def test_cifar10_archive_reads_as_cifar10(tmp_path):
    path = cifar10_archive(tmp_path / "cifar-10-python.tar.gz", train_batches=2, batch=30)
    train = load_dataset(DataSpec(kind="cifar10", path=str(path)))
    test = load_dataset(DataSpec(kind="cifar10", path=str(tmp_path), split="test"))
    assert (len(train), len(test), train.item_shape, train.num_classes) == (60, 30, (3, 32, 32), 10)
    assert 3 <= len(set(train.labels.tolist())) <= 10 and train.x.min() >= -1 and train.x.max() <= 1
    again = cifar10_archive(tmp_path / "again.tar.gz", train_batches=2, batch=30)
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (path, again)]
    assert digest[0] == digest[1]


def test_imagenet_folder_reads_as_an_image_folder_with_one_label_per_class(tmp_path):
    root = imagenet_folder(tmp_path / "imagenet64", classes=5, per_class=2)
    ds = load_dataset(DataSpec(kind="image_folder", path=str(root), resolution=64))
    assert (len(ds), ds.num_classes, ds.item_shape) == (10, 5, (3, 64, 64))
    assert ds.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
