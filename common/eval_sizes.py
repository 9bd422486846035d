"""Which real images each Frechet distance uses, and whether the data hold that many, checked from the config.

`inception_plan` turns an InceptionSpec and the sizes of the train and test splits into the reference set and
the real-vs-real floor (docs/evaluation.md); `check_config` runs it, and the FD-CNN and sample-count checks,
on every dataset of a config with the split sizes known without reading any data, so a reference N larger than
the data fails before any job runs.  Image folders have no known size: `cmbench inception-ref` runs the same
plan on the loaded data before any features are computed.  No torch here: the workflow calls it at parse time.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.errors import ConfigError

from .config import Config, DataSpec, InceptionSpec, resolve_run

# Split sizes as common/data.py reads them (MNIST: the 50,000-image train part of the 50k/10k/10k pickle)
SPLIT_SIZES = {
    "cifar10": {"train": 50_000, "test": 10_000},
    "mnist": {"train": 50_000, "test": 10_000},
    "fashion_mnist": {"train": 60_000, "test": 10_000},
    "digits": {"train": 1_797},
}
TEST_SPLIT_KINDS = ("cifar10", "mnist", "fashion_mnist")  # kinds whose loader reads a separate test split


def split_size(data: DataSpec, split: str) -> int | None:
    """Images in a split as the loader reads it (after data.max_items); None when only the data can tell."""
    if data.kind == "gmm":
        n = data.n_train
    elif data.kind in SPLIT_SIZES and split in SPLIT_SIZES[data.kind]:
        n = SPLIT_SIZES[data.kind][split]
    else:
        return None
    return min(n, data.max_items) if data.max_items is not None else n


@dataclass(frozen=True)
class InceptionPlan:
    """The real images of one dataset's Inception FID: reference set and real-vs-real floor."""

    n: int  # samples per row
    n_reference: int
    reference_is_split: bool  # the whole train split, in its own order
    baseline: str  # 'test_split' or 'disjoint'
    n_baseline: int
    baseline_is_split: bool  # the whole test split, in its own order

    def reference_text(self, kind: str, seed: int) -> str:
        if self.reference_is_split:
            return f"all {self.n_reference} images of the {kind} train split"
        return f"{self.n_reference} images of the {kind} train split (seed {seed})"

    def baseline_text(self, kind: str, seed: int) -> str:
        if self.baseline == "disjoint":
            where = f"{self.n_baseline} images of the {kind} train split outside the reference (seed {seed})"
        elif self.baseline_is_split:
            where = f"all {self.n_baseline} images of the {kind} test split"
        else:
            where = f"{self.n_baseline} images of the {kind} test split (seed {seed})"
        return f"real-vs-real FID of {where} against the reference, at N = {self.n_baseline}"


def baseline_kind(spec: InceptionSpec, kind: str) -> str:
    """`spec.baseline`, or its default: 'test_split' where the kind has a test split, else 'disjoint'."""
    return spec.baseline or ("test_split" if kind in TEST_SPLIT_KINDS else "disjoint")


def inception_plan(spec: InceptionSpec, kind: str, n_train: int | None, n_test: int | None,
                   option: str) -> InceptionPlan | None:
    """The plan for splits of these sizes; a size None is unknown (an image folder before it is read), and the
    plan is then None once every check that needs no size has passed.  Errors name the key under `option`."""
    if kind == "gmm":
        raise ConfigError(f"{option}.enabled: the gmm data hold points; Inception FID is for images")
    baseline = baseline_kind(spec, kind)
    if baseline == "test_split" and kind not in TEST_SPLIT_KINDS:
        raise ConfigError(f"{option}.baseline: {kind} data have no test split here; set it to 'disjoint' (training "
                          f"images outside the reference) with {option}.n_reference")
    if n_train is None or (baseline == "test_split" and n_test is None):
        return None
    if spec.n_reference is not None and spec.n_reference > n_train:
        raise ConfigError(f"{option}.n_reference = {spec.n_reference} but the {kind} train split has {n_train} "
                          f"images; lower it, or set it to null for the whole split")
    if baseline == "test_split":
        n_baseline = spec.n_baseline if spec.n_baseline is not None else min(spec.n, n_test)
        if n_baseline > n_test:
            raise ConfigError(f"{option}.n_baseline = {n_baseline} but the {kind} test split has {n_test} images; "
                              f"lower it, or set it to null for min(n, {n_test})")
        n_reference = n_train if spec.n_reference is None else spec.n_reference
    else:
        n_baseline = spec.n_baseline if spec.n_baseline is not None else spec.n
        n_reference = n_train - n_baseline if spec.n_reference is None else spec.n_reference
        if n_reference < 2 or n_reference + n_baseline > n_train:
            key = "n_baseline" if spec.n_baseline is not None or spec.n_reference is None else "n_reference"
            raise ConfigError(f"{option}.{key}: the disjoint baseline needs {n_baseline} {kind} training images "
                              f"outside a reference of {max(n_reference, 2)}, the train split has {n_train}; lower "
                              f"{option}.n_baseline or {option}.n_reference" +
                              (", or set baseline: test_split" if kind in TEST_SPLIT_KINDS else ""))
    return InceptionPlan(n=spec.n, n_reference=n_reference, reference_is_split=n_reference == n_train,
                         baseline=baseline, n_baseline=n_baseline,
                         baseline_is_split=baseline == "test_split" and n_baseline == n_test)


def check_config(config: Config, source: str = "<config>", datasets: list[str] | None = None) -> None:
    """Every dataset's (or those named) evaluation sizes against the known sizes of its data: a one-line
    ConfigError naming the key.  Image folders pass here and are checked when read."""
    for name, entry in config.datasets.items():
        if datasets is not None and name not in datasets:
            continue
        where = f"{source}: datasets.{name}"
        n_train = split_size(entry.data, "train")
        n_ref = entry.eval.n_reference
        if n_ref is not None and n_train is not None and n_ref > n_train:
            raise ConfigError(f"{where}.eval.n_reference = {n_ref} but the {entry.data.kind} train split has "
                              f"{n_train} images; lower it, or set it to null for the whole split")
        if not entry.inception.enabled:
            continue
        inception_plan(entry.inception, entry.data.kind, n_train, split_size(entry.data, "test"),
                       f"{where}.inception")
        for method in config.methods:
            n_samples = resolve_run(config, name, method, 0, source).eval.n_samples
            if n_samples < entry.inception.n:
                raise ConfigError(f"{where}.inception.n = {entry.inception.n} but method {method} draws "
                                  f"eval.n_samples = {n_samples}; lower inception.n or raise n_samples")
