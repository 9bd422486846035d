"""The one training loop: every method, every dataset, CPU or CUDA, resumable by rerunning the same command.

Randomness is a pure function of (seed, step): the data order comes from `data.batch_indices` and the torch RNG
is reseeded at every step, so a run resumed from a checkpoint takes exactly the steps it would have taken.
The run folder holds config.json (resolved), stats.jsonl (one line per logging interval), checkpoints/ and,
when done, final.pt (raw and EMA weights).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import checkpoint, compute, distributed
from .config import RunConfig, to_dict
from .data import batch_indices, data_hash, load_dataset, load_prepared
from .device import describe
from .ema import EMA
from .errors import CheckpointError, ConfigError, Preempted, TrainingError
from .fsutil import append_line, atomic_write_json, atomic_write_text
from .models import build_backbone, build_method, check_compatible, load_trained

FINAL = "final.pt"
FAILURE = "failure.json"  # the last attempt's error (non-finite stop); tracking marks the MLflow run FAILED


def step_seed(seed: int, step: int) -> int:
    return seed * 2**32 + step + 1


def _check_run_folder(out: Path, run: RunConfig, archive_stale: bool) -> None:
    """A run folder belongs to one config; rerunning with another config must not mix two runs.

    With `archive_stale` the old run is renamed aside (nothing is deleted) and training starts afresh.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"output folder {out} is not writable ({e.strerror}); choose another --out") from None
    path = out / "config.json"
    if path.exists():
        old = json.loads(path.read_text())
        new = to_dict(run)
        if old != new:
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            if archive_stale:
                aside = out.with_name(f"{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
                os.replace(out, aside)
                print(f"config changed ({', '.join(diff)}): moved the old run to {aside}")
                return _check_run_folder(out, run, archive_stale=False)
            raise ConfigError(f"run folder {out} holds a run with a different config (differs in: {', '.join(diff)}); "
                              f"use another --out or delete the folder")
    else:
        atomic_write_text(path, run.to_json())


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
        raise ConfigError(f"method '{run.method}' distills a teacher: pass --teacher RUN_DIR (a trained 'teacher' "
                          f"run on '{run.dataset}')")
    if (run.train.init or method.default_init) == "teacher":
        raise ConfigError(f"method '{run.method}' starts from the teacher's weights: pass --teacher RUN_DIR "
                          f"or set train.init: random")


def _distillation_teacher(method, run: RunConfig, t_method, t_model):
    """What a distillation method distills: the exact mixture on gmm (METHODS.md 10), else the trained teacher."""
    if not method.needs_teacher:
        return None
    if run.data.kind == "gmm":
        from .gmm import GaussianMixture

        return GaussianMixture.from_spec(run.data.gmm).teacher()
    if t_model is None:
        raise ConfigError(f"method '{run.method}' distills a teacher: pass --teacher RUN_DIR (a trained 'teacher' "
                          f"run on '{run.dataset}')")
    return t_method.as_teacher(t_model)


def train(run: RunConfig, out: str | Path, *, data_path: str | None = None, teacher_dir: str | None = None,
          archive_stale: bool = False, progress_bar: bool | None = None, log=print, stop=None) -> Path:
    """Train (or resume, or do nothing if finished) and return the path of final.pt.

    `stop` (common.preemption.StopRequest): once it is set, the loop checkpoints at the next step boundary and
    raises Preempted.
    """
    out = Path(out)
    method = build_method(run)
    check_compatible(method, run.network)
    _check_teacher_given(method, run, teacher_dir)
    ranks, device = distributed.setup(run.train.device, run.train.devices)  # one process unless torchrun
    if ranks.is_main:
        _check_run_folder(out, run, archive_stale)
    else:
        log = _quiet
    distributed.barrier(ranks)
    final = out / FINAL
    if final.exists():
        try:
            checkpoint.load(final)
            log(f"{final} exists and is valid: nothing to do")
            return final
        except CheckpointError as e:
            log(f"warning: {e}; training again from the last checkpoint")
    data = load_prepared(data_path) if data_path else load_dataset(run.data)
    teacher_method, teacher_model = _load_teacher(run, teacher_dir, device)
    teacher = _distillation_teacher(method, run, teacher_method, teacher_model)

    torch.manual_seed(run.seed)
    model = method.build_model(build_backbone(run.network, data.item_shape)).to(device)
    init = run.train.init or method.default_init
    if init == "teacher":
        if teacher_model is None:
            raise ConfigError(f"method '{run.method}' starts from the teacher's weights: pass --teacher RUN_DIR "
                              f"or set train.init: random")
        missing, unexpected = model.backbone.load_state_dict(teacher_model.backbone.state_dict(), strict=False)
        if unexpected:
            raise ConfigError(f"teacher backbone does not fit '{run.method}' (unexpected keys {unexpected[:3]})")
        log(f"initialized from the teacher ({len(missing)} new parameter tensors)")
    if run.train.channels_last:  # NHWC convolutions (tensor cores); EMA and target copies follow
        model.to(memory_format=torch.channels_last)
    extras = {k: m.to(device) for k, m in method.extra_modules().items()}
    for m in (model, *extras.values()):
        distributed.broadcast_module(m, ranks)
    trainable = list(model.parameters()) + [p for m in extras.values() for p in m.parameters()]
    optimizer = _make_optimizer(run, trainable)
    ema = EMA(model, run.train.ema_halflife_kimg, run.train.ema_rampup_ratio)
    target = None
    if method.target_decay(0.0) is not None:  # CM's theta-, a copy the loss reads and the loop updates
        target = copy.deepcopy(model).requires_grad_(False)
    if run.train.compile:
        model.compile()

    ckpt_dir = out / "checkpoints"
    for folder in (out, ckpt_dir):  # before this process writes anything (other ranks, if any, write after step 1)
        if n := checkpoint.remove_stale_temporaries(folder):
            log(f"removed {n} temporary file(s) left in {folder} by an interrupted write")
    state = checkpoint.load_latest(ckpt_dir, map_location=device, log=log)
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        ema.module.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        for k, m in extras.items():
            m.load_state_dict(state["extras"][k])
        if target is not None:
            target.load_state_dict(state["target"])
        start = state["step"]
        log(f"resumed from step {start}")
    counters = state.get("counters") if state is not None else None  # absent in checkpoints of older versions
    stats_path = out / "stats.jsonl"
    _truncate_stats(stats_path, start)
    (out / FAILURE).unlink(missing_ok=True)  # a new attempt; rewritten if it fails again

    t = run.train
    n_params = sum(p.numel() for p in model.parameters())
    log(f"training {run.method} on {run.dataset} (seed {run.seed}): {n_params:,} parameters, "
        f"{t.iterations} iterations of batch {t.batch_size} on {describe(device)}")
    x_all = data.x.to(device)
    labels_all = data.labels.to(device) if (data.labels is not None and run.network.label_dim > 0) else None
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=t.amp == "bf16")
    sums: dict[str, float] = {}
    count = 0
    nonfinite_run, nonfinite_total, last_finite = (counters["nonfinite_run"], counters["nonfinite_total"],
                                                   counters["last_finite"]) if counters else (0, 0, float("nan"))

    def save_checkpoint(done: int) -> None:
        checkpoint.save(checkpoint.step_path(ckpt_dir, done), {
            "step": done, "model": model.state_dict(), "ema": ema.module.state_dict(),
            "optimizer": optimizer.state_dict(), "extras": {k: m.state_dict() for k, m in extras.items()},
            "target": target.state_dict() if target is not None else None,
            "counters": {"nonfinite_run": nonfinite_run, "nonfinite_total": nonfinite_total,
                         "last_finite": last_finite},
        })
        checkpoint.prune(ckpt_dir, t.keep_checkpoints)

    tick = time.perf_counter()
    bar = tqdm(range(start, t.iterations), initial=start, total=t.iterations, disable=(progress_bar is False
               if progress_bar is not None else None) if ranks.is_main else True, mininterval=2.0,
               desc=f"{run.method}/{run.dataset}")
    model.train()
    if target is not None:
        target.train()  # same dropout behaviour as the online network (CM uses the same mask for both)
    for step in bar:
        torch.manual_seed(distributed.rank_seed(step_seed(run.seed, step), ranks.rank))
        idx = distributed.shard(batch_indices(len(data), t.batch_size, run.seed, step), ranks).to(device)
        x0 = x_all[idx]
        labels = labels_all[idx] if labels_all is not None else None
        for group in optimizer.param_groups:
            group["lr"] = t.lr * min(1.0, (step + 1) / t.lr_warmup) if t.lr_warmup > 0 else t.lr
        with amp:
            terms = method.loss(model, x0, progress=step / t.iterations, labels=labels,
                                teacher=teacher.with_labels(labels) if teacher is not None else None,
                                target=target)
        loss = terms["loss"]
        optimizer.zero_grad(set_to_none=True)
        finite = distributed.all_true(bool(torch.isfinite(loss)), ranks, device)  # all ranks step or none
        if finite:
            loss.backward()
            distributed.average_gradients(trainable, ranks)  # what DDP would do; see common/distributed.py
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, t.grad_clip or math.inf)
            finite = bool(torch.isfinite(grad_norm))
        if finite:
            optimizer.step()
            ema.update(model, (step + 1) * t.batch_size, t.batch_size)
            if target is not None:
                _update_target(target, model, method.target_decay((step + 1) / t.iterations))
            nonfinite_run, last_finite = 0, float(loss.detach())
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + float(grad_norm)
            count += 1
        else:  # counted and reported, never replaced: the step is skipped
            nonfinite_run += 1
            nonfinite_total += 1
            if nonfinite_run >= t.max_nonfinite:
                message = (f"{nonfinite_run} non-finite losses or gradients in a row at step {step} of "
                           f"{run.method}/{run.dataset} (last finite loss {last_finite:.4g}); lower train.lr or "
                           f"set train.grad_clip")
                if ranks.is_main:
                    atomic_write_json(out / FAILURE, {"status": "FAILED", "step": step, "error": message,
                                                      "nonfinite_total": nonfinite_total,
                                                      "last_finite_loss": last_finite})
                raise TrainingError(message)
        done = step + 1
        if done % t.log_every == 0 or done == t.iterations:
            now = time.perf_counter()
            row = {"step": done, "kimg": done * t.batch_size / 1000, "lr": optimizer.param_groups[0]["lr"],
                   "sec_per_iter": (now - tick) / max(count + nonfinite_run, 1), "nonfinite_total": nonfinite_total}
            row.update(distributed.mean_scalars({k: v / max(count, 1) for k, v in sums.items()}, ranks, device))
            if ranks.is_main:
                append_line(stats_path, json.dumps(row))
            bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4g}")
            sums, count, tick = {}, 0, now
        stopping = not distributed.all_true(not stop, ranks, device)  # a signal to one rank stops them all
        if (done % t.checkpoint_every == 0 or done == t.iterations or stopping) and ranks.is_main:
            save_checkpoint(done)
        if stopping and done < t.iterations:
            bar.close()
            signal = getattr(stop, "signal", None) or "a stop signal to another rank"
            raise Preempted(f"{signal} received: checkpoint written at step {done} of {t.iterations} in "
                            f"{ckpt_dir}; rerun the same command to resume")
    bar.close()
    if not ranks.is_main:  # rank 0 alone writes the final weights; the others wait for them
        distributed.barrier(ranks)
        return final
    digest = data_hash(data)
    first = batch_indices(len(data), t.batch_size, run.seed, 0).to(device)
    flops = compute.train_iteration_flops(method, model, x_all[first], teacher=teacher, target=target,
                                          labels=labels_all[first] if labels_all is not None else None)
    seconds = _train_seconds(stats_path)
    # run_info.json before final.pt: final.pt marks the run done, so a kill between the two must not lose run_info
    atomic_write_json(out / "run_info.json", {"n_params": n_params, "data_hash": digest, "device": describe(device),
                          "iterations": t.iterations, "batch_size": t.batch_size, "init": init,
                          "train_seconds": seconds, "sec_per_iter": seconds / t.iterations,
                          "train_flops_per_iter": flops, "train_flops_total": flops * t.iterations})
    checkpoint.save(final, {
        "step": t.iterations, "model": model.state_dict(), "ema": ema.module.state_dict(),
        "item_shape": list(data.item_shape), "data_hash": digest, "n_params": n_params,
        "config": run.to_json(),
    })
    log(f"wrote {final}")
    distributed.barrier(ranks)
    return final


def _quiet(*args, **kwargs) -> None:
    """The log of ranks other than 0: one rank speaks for the job."""


@torch.no_grad()
def _update_target(target: torch.nn.Module, model: torch.nn.Module, mu: float) -> None:
    for p_t, p in zip(target.parameters(), model.parameters(), strict=True):
        p_t.lerp_(p.detach(), 1 - mu)


def _train_seconds(stats_path: Path) -> float:
    """Wall time of the training steps, summed over every invocation that contributed to the run."""
    total, prev = 0.0, 0
    for row in _read_stats(stats_path):
        total += row["sec_per_iter"] * (row["step"] - prev)
        prev = row["step"]
    return total




def _read_stats(path: Path) -> list[dict]:
    """The rows of stats.jsonl; a line torn by a kill in mid-append is skipped."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _truncate_stats(path: Path, step: int) -> None:
    """Drop stats lines past the resumed step (and torn ones), so a resumed run's history has no duplicates."""
    if not path.exists():
        return
    rows = [row for row in _read_stats(path) if row["step"] <= step]
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))
