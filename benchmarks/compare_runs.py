"""Compare the outputs of two cmbench workflow runs: `python -m benchmarks.compare_runs ROOT_A ROOT_B [--checkpoints]`.

- results/samples/**/*.npz: the arrays `samples`, `latents` (and `labels` where present) must be bitwise equal
  (np.array_equal, same dtype and shape);
- results/metrics/**/*.json: every numeric value under "metrics" must be equal (timing fields such as
  sec_per_sample / sec_per_iter / train_seconds and paths live outside "metrics" and are ignored);
- with --checkpoints, also results/runs/**/final.pt: every tensor must be bitwise equal (needs torch).

Prints one summary line, then each difference; exits 1 if anything differs or is missing on one side.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np

SAMPLE_ARRAYS = ("samples", "latents", "labels")


def _files(root: Path, pattern: str) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.glob(pattern))}


def _pair(a: Path, b: Path, pattern: str, problems: list[str]) -> list[tuple[str, Path, Path]]:
    fa, fb = _files(a, pattern), _files(b, pattern)
    for rel in sorted(set(fa) ^ set(fb)):
        problems.append(f"{rel}: only in {a if rel in fa else b}")
    return [(rel, fa[rel], fb[rel]) for rel in sorted(set(fa) & set(fb))]


def _numbers(value, prefix: str = ""):
    """(dotted key, number) of every int/float in a nested dict/list."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _numbers(v, f"{prefix}.{k}" if prefix else k)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _numbers(v, f"{prefix}[{i}]")
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield prefix, value


def compare_samples(a: Path, b: Path, problems: list[str]) -> tuple[int, int]:
    equal = total = 0
    for rel, pa, pb in _pair(a, b, "results/samples/**/*.npz", problems):
        with np.load(pa, allow_pickle=False) as xa, np.load(pb, allow_pickle=False) as xb:
            if set(xa.files) != set(xb.files):
                problems.append(f"{rel}: keys {sorted(xa.files)} != {sorted(xb.files)}")
            for key in SAMPLE_ARRAYS:
                if key not in xa.files and key not in xb.files:
                    continue
                total += 1
                if key not in xa.files or key not in xb.files:
                    problems.append(f"{rel}: '{key}' only on one side")
                    continue
                va, vb = xa[key], xb[key]
                if va.dtype == vb.dtype and np.array_equal(va, vb):
                    equal += 1
                else:
                    diff = (float(np.abs(va.astype(np.float64) - vb.astype(np.float64)).max())
                            if va.shape == vb.shape else "shape")
                    problems.append(f"{rel}: '{key}' differs ({va.dtype}{va.shape} vs {vb.dtype}{vb.shape}, "
                                    f"max |diff| {diff})")
    return equal, total


def compare_metrics(a: Path, b: Path, problems: list[str]) -> tuple[int, int]:
    equal = total = 0
    for rel, pa, pb in _pair(a, b, "results/metrics/**/*.json", problems):
        ma = dict(_numbers(json.loads(pa.read_text()).get("metrics", {})))
        mb = dict(_numbers(json.loads(pb.read_text()).get("metrics", {})))
        for key in sorted(set(ma) ^ set(mb)):
            problems.append(f"{rel}: metrics.{key} only on one side")
        for key in sorted(set(ma) & set(mb)):
            total += 1
            if ma[key] == mb[key] or (ma[key] != ma[key] and mb[key] != mb[key]):  # nan == nan here
                equal += 1
            else:
                problems.append(f"{rel}: metrics.{key} {ma[key]!r} != {mb[key]!r}")
    return equal, total


def _tensors(value, prefix: str = ""):
    import torch

    if isinstance(value, dict):
        for k, v in value.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            yield from _tensors(v, f"{prefix}[{i}]")
    elif isinstance(value, torch.Tensor):
        yield prefix, value


def compare_checkpoints(a: Path, b: Path, problems: list[str]) -> tuple[int, int]:
    import torch

    equal = total = 0
    for rel, pa, pb in _pair(a, b, "results/runs/**/final.pt", problems):
        sa = torch.load(io.BytesIO(pa.read_bytes()), map_location="cpu", weights_only=True)
        sb = torch.load(io.BytesIO(pb.read_bytes()), map_location="cpu", weights_only=True)
        ta, tb = dict(_tensors(sa)), dict(_tensors(sb))
        for key in sorted(set(ta) ^ set(tb)):
            problems.append(f"{rel}: tensor {key} only on one side")
        for key in sorted(set(ta) & set(tb)):
            total += 1
            if ta[key].dtype == tb[key].dtype and torch.equal(ta[key], tb[key]):
                equal += 1
            else:
                problems.append(f"{rel}: tensor {key} differs")
    return equal, total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root_a", type=Path)
    p.add_argument("root_b", type=Path)
    p.add_argument("--checkpoints", action="store_true", help="also compare results/runs/**/final.pt (torch)")
    args = p.parse_args(argv)
    problems: list[str] = []
    s_eq, s_n = compare_samples(args.root_a, args.root_b, problems)
    m_eq, m_n = compare_metrics(args.root_a, args.root_b, problems)
    line = f"samples: {s_eq}/{s_n} arrays equal; metrics: {m_eq}/{m_n} values equal"
    if args.checkpoints:
        c_eq, c_n = compare_checkpoints(args.root_a, args.root_b, problems)
        line += f"; checkpoints: {c_eq}/{c_n} tensors equal"
    print(line)
    for problem in problems:
        print(f"  {problem}")
    if s_n == 0 and m_n == 0:
        print("  nothing compared: no results/samples or results/metrics under either root")
        return 1
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
