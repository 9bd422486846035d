"""Synthetic stand-ins for the paper tracks' data, in the real file formats, so a rehearsal runs the exact code path.

`cifar10_archive` writes a `cifar-10-python.tar.gz` with the real layout (cifar-10-batches-py/ holding
data_batch_1..5 of 10,000 images each, test_batch, batches.meta; Python-2-style pickles with bytes keys and uint8
[n, 3072] rows of R, G and B planes) and the real sizes.  `imagenet_folder` writes an ImageNet-style tree
(one folder per WordNet-like class id, JPEG files of varied sizes) that `kind: image_folder` crops and resizes.
The pictures are smooth random colour fields whose mean colour depends on the class, so a classifier (FD-CNN) has
something to learn; they are deterministic in the seed.  Nothing here resembles the real data's statistics:
numbers from a rehearsal measure the plumbing, never quality.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

from .fsutil import atomic_write

CIFAR10_TRAIN_BATCHES, CIFAR10_BATCH = 5, 10_000
CIFAR10_LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def smooth_images(n: int, size: int, num_classes: int, rng: np.random.Generator,
                  labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [n, 3, size, size] colour fields (a 4 x 4 grid of colours, upsampled) and their int labels."""
    labels = rng.integers(0, num_classes, n) if labels is None else np.asarray(labels)
    class_colour = np.random.default_rng(12345).uniform(40, 215, (num_classes, 3, 1, 1))
    coarse = class_colour[labels] + rng.normal(0, 35, (n, 3, 4, 4))
    cell = -(-size // 4)
    fine = np.repeat(np.repeat(coarse, cell, axis=2), cell, axis=3)[:, :, :size, :size]
    fine += rng.normal(0, 6, fine.shape)
    return np.clip(np.rint(fine), 0, 255).astype(np.uint8), labels.astype(np.int64)


def _cifar_batch(images: np.ndarray, labels: np.ndarray, name: str, first: int) -> bytes:
    record = {b"batch_label": name.encode(), b"labels": [int(v) for v in labels],
              b"data": np.ascontiguousarray(images.reshape(len(images), -1)),
              b"filenames": [f"synthetic_{first + i:06d}.png".encode() for i in range(len(images))]}
    return pickle.dumps(record, protocol=2)


def cifar10_archive(path: str | Path, seed: int = 0, train_batches: int = CIFAR10_TRAIN_BATCHES,
                    batch: int = CIFAR10_BATCH) -> Path:
    """Write a synthetic `cifar-10-python.tar.gz` (by default the real 50,000 + 10,000 images); returns its path."""
    rng = np.random.default_rng(seed)
    members = {}
    for k in range(1, train_batches + 1):
        x, y = smooth_images(batch, 32, 10, rng)
        members[f"data_batch_{k}"] = _cifar_batch(x, y, f"training batch {k} of {train_batches}", (k - 1) * batch)
    x, y = smooth_images(batch, 32, 10, rng)
    members["test_batch"] = _cifar_batch(x, y, "testing batch 1 of 1", 0)
    members["batches.meta"] = pickle.dumps({b"label_names": [s.encode() for s in CIFAR10_LABELS],
                                            b"num_cases_per_batch": batch, b"num_vis": 3072}, protocol=2)
    members["readme.html"] = b"<p>Synthetic stand-in for CIFAR-10 written by cmbench (common/synthetic.py).</p>\n"

    def write(f):
        with tarfile.open(fileobj=f, mode="w:gz", compresslevel=1) as tar:
            for name, data in members.items():
                info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: the same bytes every time
                tar.addfile(info, io.BytesIO(data))

    atomic_write(path, write)
    return Path(path)


def imagenet_folder(root: str | Path, classes: int = 1000, per_class: int = 2, seed: int = 0) -> Path:
    """Write an ImageNet-style tree root/nXXXXXXXX/nXXXXXXXX_K.JPEG with images of varied sizes; returns root."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    root = Path(root)
    for c in range(classes):
        wnid = f"n{1440764 + 97 * c:08d}"
        (root / wnid).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            h, w = (int(v) for v in rng.integers(64, 112, 2))
            x, _ = smooth_images(1, max(h, w), classes, rng, labels=[c])
            pixels = x[0, :, :h, :w].transpose(1, 2, 0)
            Image.fromarray(pixels).save(root / wnid / f"{wnid}_{k}.JPEG", format="JPEG", quality=90)
    return root
