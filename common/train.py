"""The one training loop: every method, every dataset, CPU or CUDA, resumable by rerunning the same command.

Randomness is a pure function of (seed, step): the data order comes from `data.batch_indices` and the torch RNG
is reseeded at every step, so a run resumed from a checkpoint takes exactly the steps it would have taken.
The run folder (common/records.py: RunDir) holds config.json (resolved), stats.jsonl (one line per logging
interval), checkpoints/ and, when done, run_info.json and final.pt (raw and EMA weights).
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from core.errors import CheckpointError, ConfigError, Preempted, TrainingError

from . import checkpoint, compute, distributed
from .config import RunConfig, to_dict
from .data import Dataset, batch_indices, data_hash, load_dataset, load_prepared
from .device import describe
from .ema import EMA
from .fsutil import atomic_write_json, atomic_write_text
from .models import build_backbone, build_method, load_trained
from .records import RunDir, append_stats, read_stats, truncate_stats

if TYPE_CHECKING:
    from methods.base import Method


def step_seed(seed: int, step: int) -> int:
    return seed * 2**32 + step + 1


def _check_run_folder(out: RunDir, run: RunConfig, archive_stale: bool) -> None:
    """A run folder belongs to one config; rerunning with another config must not mix two runs.

    With `archive_stale` the old run is renamed aside (nothing is deleted) and training starts afresh.
    """
    folder = out.path
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"output folder {folder} is not writable ({e.strerror}); choose another --out") from None
    if out.config.exists():
        old = out.read_config()
        new = to_dict(run)
        if old != new:
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            if archive_stale:
                aside = folder.with_name(f"{folder.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
                os.replace(folder, aside)
                print(f"config changed ({', '.join(diff)}): moved the old run to {aside}")
                return _check_run_folder(out, run, archive_stale=False)
            raise ConfigError(f"run folder {folder} holds a run with a different config (differs in: "
                              f"{', '.join(diff)}); use another --out or delete the folder")
    else:
        atomic_write_text(out.config, run.to_json())


def _make_optimizer(run: RunConfig, params):
    t = run.train
    cls = {"adam": torch.optim.Adam, "radam": torch.optim.RAdam}[t.optimizer]
    fused = {"fused": True} if t.fused_optimizer else {}  # one kernel for all parameters (config-checked: adam)
    return cls(params, lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay, **fused)


def _load_teacher(run: RunConfig, teacher_dir: str | None, device):
    if teacher_dir is None:
        return None, None
    t_run, t_method, t_model, _ = load_trained(teacher_dir, device)
    if t_run.dataset != run.dataset:
        raise ConfigError(f"teacher run {teacher_dir} was trained on '{t_run.dataset}', not '{run.dataset}'")
    return t_method, t_model


def _check_teacher_given(method, run: RunConfig, teacher_dir: str | None) -> None:
    """Fail before reading data or building networks when the method needs a teacher run and none is given."""
    if teacher_dir is not None:
        return
    if method.needs_teacher and run.data.kind != "gmm":
        raise _no_teacher_error(run)
    if (run.train.init or method.default_init) == "teacher":
        raise _teacher_init_error(run)


def _no_teacher_error(run: RunConfig) -> ConfigError:
    return ConfigError(f"method '{run.method}' distills a teacher: pass --teacher RUN_DIR (a trained 'teacher' "
                       f"run on '{run.dataset}')")


def _teacher_init_error(run: RunConfig) -> ConfigError:
    return ConfigError(f"method '{run.method}' starts from the teacher's weights: pass --teacher RUN_DIR "
                       f"or set train.init: random")


def _distillation_teacher(method, run: RunConfig, t_method, t_model):
    """What a distillation method distills: the exact mixture on gmm, else the trained teacher."""
    if not method.needs_teacher:
        return None
    if run.data.kind == "gmm":
        from core.gmm import GaussianMixture

        return GaussianMixture.from_spec(run.data.gmm).teacher()
    if t_model is None:
        raise _no_teacher_error(run)
    return t_method.as_teacher(t_model)


def train(run: RunConfig, out: str | Path, *, data_path: str | None = None, teacher_dir: str | None = None,
          archive_stale: bool = False, progress_bar: bool | None = None, log=print, stop=None) -> Path:
    """Train (or resume, or do nothing if finished) and return the path of final.pt.

    `stop` (common.preemption.StopRequest): once it is set, the loop checkpoints at the next step boundary and
    raises Preempted.
    """
    out = RunDir(out)
    method = build_method(run)
    _check_teacher_given(method, run, teacher_dir)
    ranks, device = distributed.setup(run.train.device, run.train.devices, run.train.nodes)  # 1 unless torchrun
    if ranks.is_main:
        _check_run_folder(out, run, archive_stale)
    else:
        log = _quiet
    distributed.barrier(ranks)
    if _finished(out.final, log):
        return out.final
    tr = _build(run, method, data_path, teacher_dir, ranks, device, log)
    batches = Batches.on(tr.data, run, device)
    if run.train.flops_budget is not None:  # before any checkpoint is loaded: the fresh run's count
        _apply_flops_budget(tr, batches, log)
    start, counters = _resume(tr, out, log)
    t = run.train
    micro = f" ({tr.accum} micro-batches of {t.batch_per_gpu} per process)" if tr.accum > 1 else ""
    log(f"training {run.method} on {run.dataset} (seed {run.seed}): {tr.n_params:,} parameters, "
        f"{tr.iterations} iterations of batch {t.batch_size}{micro} on {describe(device)}")
    _loop(tr, batches, out, start, counters, progress_bar, stop)
    if ranks.is_main:  # rank 0 alone writes the final weights; the others wait for them
        _finish(tr, batches, out, log)
    distributed.barrier(ranks)
    return out.final


@dataclass
class Trainer:
    """What the loop trains and reads, built once per invocation (before any checkpoint is loaded into it)."""

    run: RunConfig
    method: Method
    data: Dataset
    ranks: distributed.Group
    device: torch.device
    model: torch.nn.Module
    init: str  # "random" or "teacher": where the weights started
    extras: dict[str, torch.nn.Module]  # a method's trainable modules beside the network
    trainable: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    ema: EMA
    target: torch.nn.Module | None  # CM's theta-, a copy the loss reads and the loop updates
    teacher: object | None  # what a distillation method distills
    amp: torch.autocast
    accum: int  # micro-batches per process and step (train.batch_per_gpu)
    teacher_flops_total: int | None = 0  # training FLOPs of the teacher run this run used (None: not recorded)
    budget: Budget | None = None  # train.flops_budget's derived iteration count (equal-compute mode)

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def iterations(self) -> int:
        """The run's length: train.iterations, or the count derived from train.flops_budget."""
        return self.budget.iterations if self.budget is not None else self.run.train.iterations


@dataclass(frozen=True)
class Budget:
    """Equal-compute mode: train.flops_budget over the FLOPs of one iteration, floored (at least 1 iteration).

    Fixed when a run starts and saved in every checkpoint: a resumed run (any rank) keeps its count."""

    flops: float  # train.flops_budget
    flops_per_iter: int  # counted once before the first step (common.compute.train_iteration_flops)
    iterations: int

    @classmethod
    def of(cls, flops: float, flops_per_iter: int) -> Budget:
        return cls(flops, flops_per_iter, max(1, math.floor(flops / flops_per_iter)))

    def to_dict(self) -> dict:
        return {"flops": self.flops, "flops_per_iter": self.flops_per_iter, "iterations": self.iterations}


@dataclass
class Counters:
    """The non-finite guard's state; saved in every checkpoint so a resumed run counts on."""

    nonfinite_run: int = 0  # non-finite steps in a row
    nonfinite_total: int = 0
    last_finite: float = float("nan")  # the last finite loss

    @classmethod
    def from_checkpoint(cls, state: dict | None) -> Counters:
        counters = state.get("counters") if state is not None else None  # absent in checkpoints of older versions
        return cls(**counters) if counters else cls()

    def to_dict(self) -> dict:
        return {"nonfinite_run": self.nonfinite_run, "nonfinite_total": self.nonfinite_total,
                "last_finite": self.last_finite}


@dataclass
class Batches:
    """The training set where it lies (a prepared file is memory-mapped: one copy per machine in the page cache);
    a step's batch is a pure function of (seed, step), and only the rows a micro-batch takes are converted to
    float32 (on the CPU, as the whole split used to be) and moved to the device."""

    data: Dataset
    labeled: bool  # the network reads labels
    batch_size: int
    seed: int
    device: torch.device

    @classmethod
    def on(cls, data: Dataset, run: RunConfig, device: torch.device) -> Batches:
        labeled = data.labels is not None and run.network.label_dim > 0
        return cls(data, labeled, run.train.batch_size, run.seed, device)

    def indices(self, step: int) -> torch.Tensor:
        """The whole batch of `step` (all ranks together)."""
        return batch_indices(len(self.data), self.batch_size, self.seed, step)

    def take(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        idx = idx.cpu()
        x = self.data.rows(idx).to(self.device)
        return x, (self.data.labels[idx].to(self.device) if self.labeled else None)


@dataclass
class Window:
    """The loss terms summed over the finite steps of one logging interval."""

    tick: float  # perf_counter at its start
    sums: dict[str, float] = field(default_factory=dict)
    count: int = 0

    def add(self, terms: dict[str, torch.Tensor], grad_norm: torch.Tensor) -> None:
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v.detach())
        self.sums["grad_norm"] = self.sums.get("grad_norm", 0.0) + float(grad_norm)
        self.count += 1


def _finished(final: Path, log) -> bool:
    """final.pt exists and is valid; a corrupt one is trained again from the last checkpoint."""
    if not final.exists():
        return False
    try:
        checkpoint.load(final)
    except CheckpointError as e:
        log(f"warning: {e}; training again from the last checkpoint")
        return False
    log(f"{final} exists and is valid: nothing to do")
    return True


def _build(run: RunConfig, method: Method, data_path: str | None, teacher_dir: str | None,
           ranks: distributed.Group, device: torch.device, log) -> Trainer:
    """Data, teacher, networks (seeded by run.seed), optimizer, EMA and target network."""
    data = load_prepared(data_path) if data_path else load_dataset(run.data)
    teacher_method, teacher_model = _load_teacher(run, teacher_dir, device)
    teacher = _distillation_teacher(method, run, teacher_method, teacher_model)

    torch.manual_seed(run.seed)
    model = method.build_model(build_backbone(run.network, data.item_shape)).to(device)
    init = run.train.init or method.default_init
    if init == "teacher":
        _init_from_teacher(model, teacher_model, run, log)
    if run.train.channels_last:  # NHWC convolutions (tensor cores); EMA and target copies follow
        model.to(memory_format=torch.channels_last)
    extras = {k: m.to(device) for k, m in method.extra_modules().items()}
    for m in (model, *extras.values()):
        distributed.broadcast_module(m, ranks)
    trainable = list(model.parameters()) + [p for m in extras.values() for p in m.parameters()]
    optimizer = _make_optimizer(run, trainable)
    ema = EMA(model, run.train.ema_halflife_kimg, run.train.ema_rampup_ratio)
    target = None
    if method.target_decay(0.0) is not None:  # after the EMA, which copies the model too
        target = copy.deepcopy(model).requires_grad_(False)
    if run.train.compile:
        model.compile()
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=run.train.amp == "bf16")
    return Trainer(run, method, data, ranks, device, model, init, extras, trainable, optimizer, ema, target,
                   teacher, amp, _accumulation(run), _teacher_flops_total(method, run, init, teacher_dir))


def _teacher_flops_total(method, run: RunConfig, init: str, teacher_dir: str | None) -> int | None:
    """Training FLOPs of the teacher run this run builds on (its weights or its distillation targets; on gmm a
    distillation method distills the exact mixture, which costs no training): 0 when it uses none, None when the
    teacher run predates FLOPs accounting."""
    uses_run = init == "teacher" or (method.needs_teacher and run.data.kind != "gmm")
    if not uses_run or teacher_dir is None:
        return 0
    return RunDir(teacher_dir).read_run_info().get("train_flops_total")


def _iteration_flops(tr: Trainer, batches: Batches) -> int:
    """FLOPs of one training iteration of the whole batch (common.compute.train_iteration_flops, on copies)."""
    n_micro = tr.ranks.world_size * tr.accum  # counted on one micro-batch (FLOPs are linear in the batch): the
    x_first, labels_first = batches.take(batches.indices(0)[:tr.run.train.batch_size // n_micro])  # whole may not fit
    return n_micro * compute.train_iteration_flops(tr.method, tr.model, x_first, teacher=tr.teacher,
                                                   target=tr.target, labels=labels_first)


def _apply_flops_budget(tr: Trainer, batches: Batches, log) -> None:
    """Equal-compute mode: set tr.budget from train.flops_budget and the FLOPs of one iteration.

    Counted on the freshly built networks (before any checkpoint is loaded) under a fixed seed, so every invocation
    of the run counts the same; rank 0's count is used on every rank.  The RNG state is left as it was."""
    t = tr.run.train
    cuda = list(range(torch.cuda.device_count())) if tr.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(step_seed(tr.run.seed, 0))
        flops = _iteration_flops(tr, batches)
    if tr.ranks.active:
        count = torch.tensor([flops], dtype=torch.int64, device=tr.device)
        torch.distributed.broadcast(count, src=0)
        flops = int(count.item())
    if flops <= 0:
        raise ConfigError(f"train.flops_budget: one iteration of '{tr.run.method}' counts {flops} FLOPs (no "
                          f"matmul/conv/attention op); set train.iterations instead")
    tr.budget = Budget.of(t.flops_budget, flops)
    log(f"train.flops_budget {t.flops_budget:.6g} FLOPs / {flops:,} FLOPs per iteration -> {tr.budget.iterations} "
        f"iterations (train.iterations {t.iterations} is ignored)")


def _accumulation(run: RunConfig) -> int:
    """Micro-batches per process and step: its share of the batch over train.batch_per_gpu (config-checked)."""
    t = run.train
    share = t.batch_size // (t.nodes * t.devices)
    return share // (t.batch_per_gpu or share)


def _init_from_teacher(model: torch.nn.Module, teacher_model: torch.nn.Module | None, run: RunConfig, log) -> None:
    if teacher_model is None:
        raise _teacher_init_error(run)
    missing, unexpected = model.backbone.load_state_dict(teacher_model.backbone.state_dict(), strict=False)
    if unexpected:
        raise ConfigError(f"teacher backbone does not fit '{run.method}' (unexpected keys {unexpected[:3]})")
    log(f"initialized from the teacher ({len(missing)} new parameter tensors)")


def _resume(tr: Trainer, out: RunDir, log) -> tuple[int, Counters]:
    """Load the newest valid checkpoint, if any, into `tr`; return (its step, its counters)."""
    for folder in (out.path, out.checkpoints):  # before this process writes anything (other ranks: after step 1)
        if n := checkpoint.remove_stale_temporaries(folder):
            log(f"removed {n} temporary file(s) left in {folder} by an interrupted write")
    state = checkpoint.load_latest(out.checkpoints, map_location=tr.device, log=log)
    start = 0
    if state is not None:
        tr.model.load_state_dict(state["model"])
        tr.ema.module.load_state_dict(state["ema"])
        tr.optimizer.load_state_dict(state["optimizer"])
        for k, m in tr.extras.items():
            m.load_state_dict(state["extras"][k])
        if tr.target is not None:
            tr.target.load_state_dict(state["target"])
        start = state["step"]
        _resume_budget(tr, state, log)
        log(f"resumed from step {start}")
    counters = Counters.from_checkpoint(state)
    truncate_stats(out.stats, start)
    out.failure.unlink(missing_ok=True)  # a new attempt; rewritten if it fails again
    return start, counters


def _resume_budget(tr: Trainer, state: dict, log) -> None:
    """A resumed equal-compute run keeps the iteration count its checkpoints were written under (it never changes
    unless the FLOP counter itself does, e.g. another torch version)."""
    saved = state.get("budget")
    if tr.budget is None or saved is None or saved == tr.budget.to_dict():
        return
    if saved["flops"] != tr.budget.flops:  # config.json guards this; a checkpoint copied from another run does not
        raise CheckpointError(f"checkpoint at step {state['step']} was written under train.flops_budget "
                              f"{saved['flops']:.6g}, not {tr.budget.flops:.6g}")
    log(f"warning: this invocation counts {tr.budget.flops_per_iter:,} FLOPs per iteration, the run's checkpoints "
        f"{saved['flops_per_iter']:,}: keeping the run's {saved['iterations']} iterations")
    tr.budget = Budget(saved["flops"], saved["flops_per_iter"], saved["iterations"])


def _loop(tr: Trainer, batches: Batches, out: RunDir, start: int, counters: Counters, progress_bar: bool | None,
          stop) -> None:
    """Steps start..iterations: log every log_every, checkpoint every checkpoint_every and on a stop request."""
    run, t, iterations = tr.run, tr.run.train, tr.iterations
    window = Window(time.perf_counter())
    bar = tqdm(range(start, iterations), initial=start, total=iterations,
               disable=_bar_disabled(progress_bar, tr.ranks.is_main), mininterval=2.0,
               desc=f"{run.method}/{run.dataset}")
    tr.model.train()
    if tr.target is not None:
        tr.target.train()  # same dropout behaviour as the online network (CM uses the same mask for both)
    for step in bar:
        _step(tr, batches, step, counters, window, out)
        done = step + 1
        if done % t.log_every == 0 or done == iterations:
            _log(tr, out, bar, window, counters, done)
        stopping = not distributed.all_true(not stop, tr.ranks, tr.device)  # a signal to one rank stops them all
        if (done % t.checkpoint_every == 0 or done == iterations or stopping) and tr.ranks.is_main:
            _save_checkpoint(tr, out, done, counters)
        if stopping and done < iterations:
            bar.close()
            signal = getattr(stop, "signal", None) or "a stop signal to another rank"
            raise Preempted(f"{signal} received: checkpoint written at step {done} of {iterations} in "
                            f"{out.checkpoints}; rerun the same command to resume")
    bar.close()


def _bar_disabled(progress_bar: bool | None, is_main: bool) -> bool | None:
    """tqdm's `disable`: always on ranks other than 0; None lets tqdm decide (hidden when not on a terminal)."""
    if not is_main:
        return True
    if progress_bar is None:
        return None
    return not progress_bar


def _step(tr: Trainer, batches: Batches, step: int, counters: Counters, window: Window, out: RunDir) -> bool:
    """One optimizer step; a non-finite loss or gradient skips it (counted; too many in a row stop the run).

    Returns whether the step was taken."""
    t = tr.run.train
    terms, grad_norm = _gradients(tr, batches, step)
    if grad_norm is None:  # counted and reported, never replaced: the step is skipped
        _skip_nonfinite(tr, step, counters, out)
        return False
    tr.optimizer.step()
    tr.ema.update(tr.model, (step + 1) * t.batch_size, t.batch_size)
    if tr.target is not None:
        _update_target(tr.target, tr.model, tr.method.target_decay((step + 1) / tr.iterations))
    counters.nonfinite_run, counters.last_finite = 0, float(terms["loss"].detach())
    window.add(terms, grad_norm)
    return True


def _gradients(tr: Trainer, batches: Batches, step: int) -> tuple[dict, torch.Tensor | None]:
    """(loss terms, gradient norm) of `step`'s batch, with the gradients in place; norm None if non-finite.

    This rank runs its micro-batches (common/distributed.py: global micro-batch j has its own rows and seed),
    autograd sums their gradients, and one all-reduce averages over every micro-batch of every rank.  A non-finite
    loss in any micro-batch on any rank skips the step on all ranks.
    """
    run, t = tr.run, tr.run.train
    for group in tr.optimizer.param_groups:
        group["lr"] = t.lr * min(1.0, (step + 1) / t.lr_warmup) if t.lr_warmup > 0 else t.lr
    tr.optimizer.zero_grad(set_to_none=True)
    seed, parts, finite = step_seed(run.seed, step), [], True
    for j, idx in distributed.micro_batches(batches.indices(step), tr.ranks, tr.accum):
        torch.manual_seed(distributed.rank_seed(seed, j))
        terms = _micro_loss(tr, batches, idx, step / tr.iterations)
        finite = bool(torch.isfinite(terms["loss"]))
        if finite:
            terms["loss"].backward()
        parts.append(terms if tr.accum == 1 else {k: v.detach() for k, v in terms.items()})
        if not finite:
            break
    terms = parts[0] if tr.accum == 1 else _mean_terms(parts)
    if not distributed.all_true(finite, tr.ranks, tr.device):  # all ranks step or none
        return terms, None
    distributed.average_gradients(tr.trainable, tr.ranks, tr.accum)  # what DDP would do; common/distributed.py
    grad_norm = torch.nn.utils.clip_grad_norm_(tr.trainable, t.grad_clip or math.inf)
    return terms, grad_norm if bool(torch.isfinite(grad_norm)) else None


def _micro_loss(tr: Trainer, batches: Batches, idx: torch.Tensor, progress: float) -> dict[str, torch.Tensor]:
    x0, labels = batches.take(idx)
    with tr.amp:
        return tr.method.loss(tr.model, x0, progress=progress, labels=labels,
                              teacher=tr.teacher.with_labels(labels) if tr.teacher is not None else None,
                              target=tr.target)


def _mean_terms(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Each loss term's mean over the micro-batches, in float64 (as the ranks' means are taken when logging)."""
    return {k: sum(p[k].double() for p in parts) / len(parts) for k in parts[0]}


def _skip_nonfinite(tr: Trainer, step: int, counters: Counters, out: RunDir) -> None:
    """Count a skipped step; after train.max_nonfinite in a row, write failure.json and raise TrainingError."""
    run = tr.run
    counters.nonfinite_run += 1
    counters.nonfinite_total += 1
    if counters.nonfinite_run < run.train.max_nonfinite:
        return
    message = (f"{counters.nonfinite_run} non-finite losses or gradients in a row at step {step} of "
               f"{run.method}/{run.dataset} (last finite loss {counters.last_finite:.4g}); lower train.lr or "
               f"set train.grad_clip")
    if tr.ranks.is_main:
        atomic_write_json(out.failure, {"status": "FAILED", "step": step, "error": message,
                                        "nonfinite_total": counters.nonfinite_total,
                                        "last_finite_loss": counters.last_finite})
    raise TrainingError(message)


def _log(tr: Trainer, out: RunDir, bar, window: Window, counters: Counters, done: int) -> None:
    """Append one stats.jsonl row (means over the interval, over all ranks) and start a new interval."""
    t = tr.run.train
    now = time.perf_counter()
    row = {"step": done, "kimg": done * t.batch_size / 1000, "lr": tr.optimizer.param_groups[0]["lr"],
           "sec_per_iter": (now - window.tick) / max(window.count + counters.nonfinite_run, 1),
           "nonfinite_total": counters.nonfinite_total}
    means = {k: v / max(window.count, 1) for k, v in window.sums.items()}
    row.update(distributed.mean_scalars(means, tr.ranks, tr.device))
    if tr.ranks.is_main:
        append_stats(out.stats, row)
    bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4g}")
    window.tick, window.sums, window.count = now, {}, 0


def _save_checkpoint(tr: Trainer, out: RunDir, done: int, counters: Counters) -> None:
    checkpoint.save(checkpoint.step_path(out.checkpoints, done), {
        "step": done, "model": tr.model.state_dict(), "ema": tr.ema.module.state_dict(),
        "optimizer": tr.optimizer.state_dict(), "extras": {k: m.state_dict() for k, m in tr.extras.items()},
        "target": tr.target.state_dict() if tr.target is not None else None,
        "counters": counters.to_dict(),
        **({"budget": tr.budget.to_dict()} if tr.budget is not None else {}),
    })
    checkpoint.prune(out.checkpoints, tr.run.train.keep_checkpoints)


def _finish(tr: Trainer, batches: Batches, out: RunDir, log) -> None:
    """FLOPs of one iteration, run_info.json, then final.pt (which marks the run done)."""
    run, t, iterations = tr.run, tr.run.train, tr.iterations
    digest = data_hash(tr.data)
    # equal-compute runs keep the count their iterations were derived from (total within one iteration of budget)
    flops = tr.budget.flops_per_iter if tr.budget is not None else _iteration_flops(tr, batches)
    seconds = _train_seconds(out.stats)
    n_params = tr.n_params
    budget = {"flops_budget": tr.budget.flops} if tr.budget is not None else {}
    # run_info.json before final.pt: final.pt marks the run done, so a kill between the two must not lose run_info
    atomic_write_json(out.run_info, {"n_params": n_params, "data_hash": digest, "device": describe(tr.device),
                                     "iterations": iterations, "batch_size": t.batch_size, "init": tr.init,
                                     "train_seconds": seconds, "sec_per_iter": seconds / iterations,
                                     "train_flops_per_iter": flops, "train_flops_total": flops * iterations,
                                     **budget, "teacher_flops_total": tr.teacher_flops_total})
    checkpoint.save(out.final, {
        "step": iterations, "model": tr.model.state_dict(), "ema": tr.ema.module.state_dict(),
        "item_shape": list(tr.data.item_shape), "data_hash": digest, "n_params": n_params,
        "config": run.to_json(),
    })
    log(f"wrote {out.final}")


def _quiet(*args, **kwargs) -> None:
    """The log of ranks other than 0: one rank speaks for the job."""


@torch.no_grad()
def _update_target(target: torch.nn.Module, model: torch.nn.Module, mu: float) -> None:
    for p_t, p in zip(target.parameters(), model.parameters(), strict=True):
        p_t.lerp_(p.detach(), 1 - mu)


def _train_seconds(stats_path: Path) -> float:
    """Wall time of the training steps, summed over every invocation that contributed to the run."""
    total, prev = 0.0, 0
    for row in read_stats(stats_path):
        total += row["sec_per_iter"] * (row["step"] - prev)
        prev = row["step"]
    return total
