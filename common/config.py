"""Configs are data: YAML -> typed, validated dataclasses; the resolved run config dumps to JSON.

A config file names datasets and methods; `resolve_run` picks one (dataset, method, seed) and merges the
dataset's defaults with the method's overrides into a `RunConfig`, the exact record written into every run
folder.  Unknown keys and bad values raise ConfigError naming the file and the dotted key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

from core.errors import BadValue, ConfigError, require
from methods.registry import get_method_class

from .records import RunDir

# ---------------------------------------------------------------------------------------------------
# Generic typed loading


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _convert(tp: Any, value: Any, where: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where, source)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{source}: {where}: bad value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: {where}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{source}: {where}: expected a list, got {value!r}")
        return [_convert(args[0], v, f"{where}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {where}: expected a mapping, got {value!r}")
        return {str(k): _convert(args[1], v, _join(where, str(k)), source) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where, source)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads '1e-4' as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{source}: {where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"config type {tp} is not supported")  # a bug in a dataclass, not in the user's file


def from_dict(cls: type, data: Any, where: str = "", source: str = "<config>"):
    """Build dataclass `cls` from a mapping; unknown keys, missing keys and bad values are ConfigErrors."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where or 'top level'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = _join(where, str(unknown[0]))
        raise ConfigError(f"{source}: unknown key '{key}' (allowed here: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], _join(where, name), source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: missing key '{_join(where, name)}'")
    try:
        return cls(**kwargs)
    except BadValue as e:
        raise ConfigError(f"{source}: {_join(where, e.key)}: {e}") from None


def to_dict(obj) -> Any:
    """Plain JSON-able data from (nested) dataclasses."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not (f.metadata.get("omit_if_default") and getattr(obj, f.name) == f.default)}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def with_overrides(obj, overrides: dict, where: str, source: str):
    """A copy of dataclass `obj` with `overrides` applied, validated like a file."""
    merged = _deep_merge(to_dict(obj), overrides)
    return from_dict(type(obj), merged, where, source)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ---------------------------------------------------------------------------------------------------
# The schema

DataKind = Literal["gmm", "digits", "mnist", "fashion_mnist", "cifar10", "image_folder"]


@dataclass(kw_only=True)
class GMMSpec:
    """A Gaussian mixture: component k is N(means[k], stds[k]^2 I) (isotropic) or N(means[k], covs[k]) (full
    covariance, e.g. from core.mixture_suite) with weight weights[k]; exactly one of stds and covs is given.
    Unset, they are left out of the run record, so isotropic records read as before."""

    means: list[list[float]]
    stds: list[float] | None = field(default=None, metadata={"omit_if_default": True})
    covs: list[list[list[float]]] | None = field(default=None, metadata={"omit_if_default": True})
    weights: list[float]

    def __post_init__(self):
        k = len(self.means)
        require(k >= 1, "means", "needs at least one component")
        require(len({len(m) for m in self.means}) == 1 and len(self.means[0]) >= 1, "means",
                "every mean needs the same dimension (>= 1)")
        require((self.stds is None) != (self.covs is None), "stds",
                "give exactly one of stds (isotropic) and covs (full covariance)")
        if self.stds is not None:
            require(len(self.stds) == k, "stds", f"needs {k} entries, one per mean")
            require(all(s > 0 for s in self.stds), "stds", "must all be > 0")
        else:
            d = len(self.means[0])
            require(len(self.covs) == k and all(len(c) == d and all(len(r) == d for r in c) for c in self.covs),
                    "covs", f"needs {k} matrices of {d} x {d}, one per mean")
            c = np.asarray(self.covs, dtype=np.float64)
            asym = np.abs(c - c.transpose(0, 2, 1)).max(axis=(1, 2)) / np.abs(c).max(axis=(1, 2)).clip(1e-300)
            require(bool(np.all(asym <= 1e-10)), "covs", "must be symmetric matrices")
            require(bool(np.all(np.linalg.eigvalsh(c)[:, 0] > 0)), "covs", "must be positive definite")
        require(len(self.weights) == k, "weights", f"needs {k} entries, one per mean")
        require(all(w > 0 for w in self.weights), "weights", "must all be > 0")
        require(abs(sum(self.weights) - 1.0) < 1e-6, "weights", f"must sum to 1 (they sum to {sum(self.weights)})")


@dataclass
class DataSpec:
    """Where a dataset comes from.  Images come out in [-1, 1], NCHW; points as [N, D]."""

    kind: DataKind
    path: str | None = None  # archive / folder for the file-based kinds (defaults documented in common.data)
    split: Literal["train", "test"] = "train"
    resolution: int | None = None  # image_folder: resize to this size; others: must match if given
    max_items: int | None = None  # keep the first N items (tests, budgets)
    gmm: GMMSpec | None = None
    # gmm: the mixture core.mixture_suite draws from this seed, in place of an explicit `gmm` (config/mixtures.yaml)
    mixture: int | None = field(default=None, metadata={"omit_if_default": True})
    n_train: int = 50_000  # gmm: how many points the prepared training set holds
    seed: int = 0  # gmm: seed of the prepared training set

    def __post_init__(self):
        if self.mixture is not None:
            from core.mixture_suite import mixture_spec

            require(self.kind == "gmm", "mixture", "is only allowed for kind 'gmm'")
            drawn = GMMSpec(**mixture_spec(self.mixture))
            require(self.gmm is None or self.gmm == drawn, "gmm",
                    f"differs from the mixture drawn from seed {self.mixture}: give one of gmm and mixture")
            self.gmm = drawn
        require((self.gmm is not None) == (self.kind == "gmm"), "gmm",
                "is required for kind 'gmm' (or a `mixture` seed) and not allowed for other kinds")
        require(self.kind != "image_folder" or self.path is not None, "path", "is required for kind 'image_folder'")
        require(self.max_items is None or self.max_items > 0, "max_items", "must be > 0")
        require(self.n_train > 0, "n_train", "must be > 0")


@dataclass
class NetworkSpec:
    """The shared backbone: an EDM/DDPM++-style UNet for images, an MLP for points."""

    kind: Literal["unet", "mlp"] = "unet"
    model_channels: int = 64
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2])
    num_blocks: int = 2
    attn_resolutions: list[int] = field(default_factory=list)
    hidden: int = 256  # mlp width
    depth: int = 3  # mlp hidden layers
    dropout: float = 0.0
    embedding_type: Literal["positional", "fourier"] = "positional"
    fourier_scale: float = 16.0
    adaptive_norm: Literal["scale_shift", "double", "add"] = "scale_shift"  # add: DDPM++ (paper tracks)
    # Backbone features a method declares (methods/base.py); null: as the method declares (resolve_run fills them).
    second_time_input: bool | None = None
    logvar_head: bool | None = None
    label_dim: int = 0  # > 0: class-conditional
    # The papers' exact UNets (config/cifar10.yaml: DDPM++; config/imagenet64.yaml: ADM); left out of config.json
    # at their defaults, so runs made before these keys existed stay valid.
    attn_decoder: Literal["last", "all"] = field(default="last", metadata={"omit_if_default": True})
    attn_bottleneck: bool = field(default=False, metadata={"omit_if_default": True})
    resample_proj: bool = field(default=True, metadata={"omit_if_default": True})

    def __post_init__(self):
        require(self.model_channels > 0, "model_channels", "must be > 0")
        require(len(self.channel_mult) >= 1 and all(m > 0 for m in self.channel_mult), "channel_mult",
                "needs at least one positive multiplier")
        require(self.num_blocks >= 1, "num_blocks", "must be >= 1")
        require(self.hidden > 0 and self.depth >= 1, "hidden", "mlp needs hidden > 0 and depth >= 1")
        require(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        require(self.label_dim >= 0, "label_dim", "must be >= 0")


@dataclass
class TrainSpec:
    """Optimization and bookkeeping of the one training loop."""

    iterations: int = 1000
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: Literal["adam", "radam"] = "adam"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    lr_warmup: int = 0  # iterations of linear warm-up
    grad_clip: float | None = None
    ema_halflife_kimg: float = 50.0  # EDM: EMA half-life in thousands of training samples
    ema_rampup_ratio: float | None = 0.05  # EDM: half-life <= ratio * samples seen so far
    log_every: int = 100
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    max_nonfinite: int = 10  # consecutive non-finite losses before the run stops
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: Literal["none", "bf16"] = "none"
    compile: bool = False
    init: Literal["random", "teacher"] | None = None  # None: the method's paper default
    # Data-parallel processes (one per GPU; gloo processes on CPU), launched by torchrun (common/distributed.py);
    # batch_size is the global batch.  Left out of config.json at 1, so runs made before it existed stay valid.
    devices: int = field(default=1, metadata={"omit_if_default": True})
    # Nodes of `devices` processes each (torchrun per node, started by srun; common/distributed.py): world size
    # nodes x devices.  Left out of config.json at 1.
    nodes: int = field(default=1, metadata={"omit_if_default": True})
    # Micro-batch per process (None: its whole share, batch_size / (nodes x devices)); a process accumulates the
    # gradients of its share's micro-batches, bitwise as if they ran on that many more processes (docs/cluster.md).
    batch_per_gpu: int | None = field(default=None, metadata={"omit_if_default": True})
    # GPU speed switches (benchmarks/results.md, "GPU plan"); results equal the plain path within rounding
    # (tests/common/test_gpu_options.py).  Left out of config.json when off, so older runs stay valid.
    channels_last: bool = field(default=False, metadata={"omit_if_default": True})  # NHWC UNet activations
    fused_optimizer: bool = field(default=False, metadata={"omit_if_default": True})  # Adam's fused kernel
    # Equal-compute mode (docs/evaluation.md, "Effective compute"): FLOPs of training for this run. When set, the
    # run takes max(1, floor(flops_budget / FLOPs of one iteration)) iterations (FLOPs counted as in run_info's
    # train_flops_per_iter, once before the first step) and `iterations` is ignored.  Left out of config.json when
    # null, so runs made before it existed stay valid.
    flops_budget: float | None = field(default=None, metadata={"omit_if_default": True})

    def __post_init__(self):
        require(self.iterations >= 1, "iterations", "must be >= 1")
        require(self.batch_size >= 1, "batch_size", "must be >= 1")
        require(self.lr > 0, "lr", "must be > 0")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", "needs two values in [0, 1)")
        require(self.log_every >= 1 and self.checkpoint_every >= 1, "log_every", "intervals must be >= 1")
        require(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
        require(self.max_nonfinite >= 1, "max_nonfinite", "must be >= 1")
        require(self.devices >= 1, "devices", "must be >= 1")
        require(self.nodes >= 1, "nodes", "must be >= 1")
        world = self.nodes * self.devices
        require(self.batch_size % world == 0, "batch_size",
                f"must be a multiple of train.devices x train.nodes ({self.devices} x {self.nodes}): each process "
                "takes an equal share")
        share = self.batch_size // world
        require(self.batch_per_gpu is None or (self.batch_per_gpu >= 1 and share % self.batch_per_gpu == 0),
                "batch_per_gpu", f"must divide each process's share of the batch, batch_size / (devices x nodes) = "
                f"{self.batch_size} / {world} = {share}")
        require(self.ema_halflife_kimg >= 0, "ema_halflife_kimg", "must be >= 0")
        require(not self.fused_optimizer or self.optimizer == "adam", "fused_optimizer",
                "only optimizer: adam has a fused kernel (set fused_optimizer: false for radam)")
        require(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"), "device",
                "must be auto, cpu, cuda or cuda:N")
        require(self.flops_budget is None or (math.isfinite(self.flops_budget) and self.flops_budget > 0),
                "flops_budget", f"must be a finite number of FLOPs > 0 (or null), got {self.flops_budget!r}")


@dataclass
class FDCNNSpec:
    """The small classifier whose penultimate features define FD-CNN(dataset) (docs/evaluation.md)."""

    epochs: int = 2
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0


@dataclass
class EvalSpec:
    """Sampling and scoring protocol for one dataset: fixed N, fixed seeds, fixed steps."""

    steps: list[int] = field(default_factory=lambda: [1, 2, 4])
    n_samples: int = 10_000
    batch_size: int = 1000
    seed: int = 0  # sample seed: image i uses seed * 2^32 + i... see common.sample
    fd_cnn: FDCNNSpec = field(default_factory=FDCNNSpec)
    n_reference: int | None = None  # reference-set size for Frechet distances (None: whole split)

    def __post_init__(self):
        require(len(self.steps) >= 1 and all(s >= 1 for s in self.steps), "steps", "needs at least one value >= 1")
        require(self.n_samples >= 2, "n_samples", "must be >= 2")
        require(self.batch_size >= 1, "batch_size", "must be >= 1")


@dataclass
class InceptionSpec:
    """Opt-in Inception FID for one dataset, from torch-fidelity and clean-fid side by side (docs/evaluation.md).

    Kept out of the run config on purpose: turning it on rescores samples and never retrains a run.
    """

    enabled: bool = False
    n: int = 1000  # samples per FID (each row scores the first n samples of its samples file)
    # Reference statistics: n_reference training images (a seeded random subset), None: the whole train split (as
    # EDM and the CM papers compute CIFAR-10 FID), less the baseline images when baseline is 'disjoint'.
    n_reference: int | None = None
    # The real-vs-real floor: 'test_split' scores n_baseline test-split images (None: min(n, the split's size))
    # against the reference; 'disjoint' scores n_baseline training images outside the reference (None: n).
    # None: 'test_split' where the data kind has a test split (cifar10, mnist, fashion_mnist), else 'disjoint'.
    baseline: Literal["test_split", "disjoint"] | None = None
    n_baseline: int | None = None
    # the official torch-fidelity file, or 'default_1' (opt-in); None: $CMBENCH_INCEPTION_WEIGHTS
    weights: str | None = None
    batch_size: int = 50
    seed: int = 0  # which real images form a reference subset and a baseline subset
    steps: list[int] | None = None  # score only rows sampled with these step counts (None: every row)

    def __post_init__(self):
        require(self.n >= 2, "n", "must be >= 2")
        require(self.n_reference is None or self.n_reference >= 2, "n_reference", "must be >= 2 (or null)")
        require(self.n_baseline is None or self.n_baseline >= 2, "n_baseline", "must be >= 2 (or null)")
        require(self.steps is None or all(s >= 1 for s in self.steps), "steps", "values must be >= 1")
        require(self.batch_size >= 1, "batch_size", "must be >= 1")


@dataclass
class MethodOverrides:
    """Per-method settings: paper hyperparameters (`params`) and changes to training and sampling."""

    params: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    network: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)


@dataclass
class DatasetEntry:
    data: DataSpec
    network: NetworkSpec = field(default_factory=NetworkSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    methods: dict[str, MethodOverrides] = field(default_factory=dict)  # dataset-specific method overrides
    inception: InceptionSpec = field(default_factory=InceptionSpec)


@dataclass
class MLflowSpec:
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else sqlite under results/mlflow
    experiment: str = "cmbench"


@dataclass
class WorkflowSpec:
    """Read by the Snakefile: which runs to make and where to track them."""

    teacher_seed: int = 0  # distillation methods and teacher-initialized methods use this teacher run
    mlflow: MLflowSpec = field(default_factory=MLflowSpec)
    # CPU threads per training job. Small networks scale poorly with threads: on 2 cores two 1-thread jobs side
    # by side finish sooner than two 2-thread jobs in turn (the quick track sets 1).
    train_threads: int = 2
    # Device of the sampling, feature and scoring jobs (auto | cpu | cuda | cuda:N); anything but cpu asks the
    # scheduler for one GPU per job. Not part of any run's config: changing it rescores nothing and retrains nothing.
    eval_device: str = "auto"

    def __post_init__(self):
        require(self.train_threads >= 1, "train_threads", "must be >= 1")
        require(self.eval_device in ("auto", "cpu") or self.eval_device.startswith("cuda"), "eval_device",
                "must be auto, cpu, cuda or cuda:N")


@dataclass
class Config:
    datasets: dict[str, DatasetEntry]
    methods: dict[str, MethodOverrides] = field(default_factory=lambda: {"teacher": MethodOverrides()})
    seeds: list[int] = field(default_factory=lambda: [0])
    workflow: WorkflowSpec = field(default_factory=WorkflowSpec)
    # Named partial configs (e.g. "cpu": a budget that fits 2 CPU cores) merged over the file when selected
    # with `budget: NAME` (`snakemake --config budget=cpu`); see `config_from_data`.
    budget: str | None = None
    budgets: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self):
        require(len(self.datasets) >= 1, "datasets", "needs at least one dataset")
        require(len(self.seeds) >= 1, "seeds", "needs at least one seed")


@dataclass
class RunConfig:
    """Everything that determines one training run; written as config.json into the run folder."""

    dataset: str
    method: str
    seed: int
    data: DataSpec
    network: NetworkSpec
    train: TrainSpec
    eval: EvalSpec
    method_params: dict[str, Any]

    def to_json(self) -> str:
        return json.dumps(to_dict(self), indent=2, sort_keys=True)


# ---------------------------------------------------------------------------------------------------
# Files


def load_config(path: str | Path) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (pass --config with a YAML file, e.g. config/config.yaml)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    return config_from_data(data, str(path))


def config_from_data(data: Any, source: str) -> Config:
    """The typed Config of a file's data, with the selected budget (if any) merged over it first."""
    if isinstance(data, dict) and data.get("budget") is not None:
        budgets = data.get("budgets") or {}
        name = data["budget"]
        if name not in budgets:
            raise ConfigError(f"{source}: budget: unknown budget '{name}' (defined here: "
                              f"{', '.join(sorted(budgets)) or 'none'})")
        over = budgets[name]
        if not isinstance(over, dict) or {"budget", "budgets"} & set(over):
            raise ConfigError(f"{source}: budgets.{name}: must be a mapping of config keys (not budget/budgets)")
        data = _deep_merge(data, over)
    return from_dict(Config, data, "", source)


def resolve_run(config: Config, dataset: str, method: str, seed: int, source: str = "<config>") -> RunConfig:
    """Merge dataset defaults, global method overrides and dataset-specific method overrides."""
    if dataset not in config.datasets:
        raise ConfigError(f"{source}: unknown dataset '{dataset}' (defined: {', '.join(sorted(config.datasets))})")
    method_cls = get_method_class(method)
    entry = config.datasets[dataset]
    layers = [config.methods.get(method, MethodOverrides()), entry.methods.get(method, MethodOverrides())]
    wheres = [f"methods.{method}", f"datasets.{dataset}.methods.{method}"]
    network, train, eval_, params = entry.network, entry.train, entry.eval, {}
    for over, where in zip(layers, wheres, strict=True):
        network = with_overrides(network, over.network, f"{where}.network", source)
        train = with_overrides(train, over.train, f"{where}.train", source)
        eval_ = with_overrides(eval_, over.eval, f"{where}.eval", source)
        params = _deep_merge(params, over.params)
    method_obj = from_dict(method_cls, params, f"methods.{method}.params", source)
    network = _with_method_features(network, method_cls, source)
    return RunConfig(dataset=dataset, method=method, seed=seed, data=entry.data, network=network, train=train,
                     eval=eval_, method_params=to_dict(method_obj))


def _with_method_features(network: NetworkSpec, method_cls: type, source: str) -> NetworkSpec:
    """The backbone features the method declares switched on; an explicit value that contradicts it is an error."""
    features = {"second_time_input": method_cls.needs_second_time_input, "logvar_head": method_cls.needs_logvar_head}
    for key, needed in features.items():
        given = getattr(network, key)
        if given is not None and given != needed:
            uses = "needs" if needed else "does not use"
            raise ConfigError(f"{source}: network.{key}: {str(given).lower()} contradicts method "
                              f"'{method_cls.name}', which {uses} it; remove the key (the method declares it)")
    return dataclasses.replace(network, **features)


def load_run_config(path: str | Path) -> RunConfig:
    """Read a run folder's config.json (or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = RunDir(path).config
    if not path.is_file():
        raise ConfigError(f"run config not found: {path} (train the run first with `cmbench train`)")
    return from_dict(RunConfig, json.loads(path.read_text()), "", str(path))
