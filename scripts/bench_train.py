"""Training throughput: tokens/s of `edgesmith train` for nano and micro at sequence length 256,
1 process vs 2 DDP processes (gloo on CPU), fp32 vs bf16 autocast, measured in one run.

Each cell is a real `edgesmith train` subprocess (the 2-process cells re-launch through torchrun);
the figure is the median of the per-step tokens/s in its metrics.jsonl, after the warm-up steps.
Three cells per model and precision: one process with one thread (one core's worth: the base a
data-parallel scaling figure is taken against), one process using every usable core as threads
(what a user gets without --nproc), two DDP processes with the cores split between them, and -- as
the ceiling for any data-parallel scheme here -- two independent single-process runs at the same
time (one thread, half the batch each, no communication at all; their tokens/s summed). The table
prints DDP against the first two, and the independent pair against one thread.

    python scripts/bench_train.py                                  # full size (nano + micro, 30 steps)
    python scripts/bench_train.py --models nano --steps 8 --precisions fp32 --data DIR  # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def start_cell(model: str, nproc: int, precision: str, args, out: Path, threads: int | None = None,
               batch_size: int | None = None) -> tuple[subprocess.Popen, list[str], Path]:
    cmd = [sys.executable, "-m", "edgesmith", "train", "--model", model, "--data", args.data,
           "--steps", str(args.steps), "--batch-size", str(batch_size or args.batch_size), "--seq-len",
           str(args.seq_len), "--precision", precision, "--nproc", str(nproc), "--warmup", "2", "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # let the trainer split the cores
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    return proc, cmd, out


def finish_cell(started: tuple[subprocess.Popen, list[str], Path], args) -> float:
    """Median per-step tokens/s of a started `edgesmith train`, after the warm-up steps."""
    proc, cmd, out = started
    _, err = proc.communicate()
    if proc.returncode:
        sys.exit(f"bench_train: {' '.join(cmd)} failed:\n{err[-2000:]}")
    rates = [json.loads(line)["tokens_per_s"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(rates[args.skip:])


def run_cell(model: str, nproc: int, precision: str, args, root: Path, threads: int | None = None) -> float:
    return finish_cell(start_cell(model, nproc, precision, args, root / f"{model}-{nproc}-{precision}-{threads}",
                                  threads), args)


def run_independent(model: str, precision: str, args, root: Path) -> float:
    """Two single-process runs at the same time, one thread and half the global batch each, with no
    communication at all: the most two ranks could do on this machine. Sum of their tokens/s."""
    runs = [start_cell(model, 1, precision, args, root / f"{model}-indep{i}-{precision}", 1, args.batch_size // 2)
            for i in range(2)]
    return sum(finish_cell(r, args) for r in runs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="nano,micro")
    p.add_argument("--data", default="stdlib")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--skip", type=int, default=3, help="warm-up steps left out of the median")
    p.add_argument("--batch-size", type=int, default=8, help="global batch (sequences)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--precisions", default="fp32,bf16")
    args = p.parse_args()
    if args.steps <= args.skip:
        sys.exit("bench_train: --steps must exceed --skip")
    print(f"edgesmith train throughput: seq {args.seq_len}, global batch {args.batch_size}, {args.steps} steps "
          f"(median of steps {args.skip + 1}..{args.steps}), data {args.data}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f} at start")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            cell = {}
            for precision in args.precisions.split(","):
                for key, nproc, threads in (("1x1", 1, 1), ("1", 1, None), ("2", 2, None), ("indep", 2, 1)):
                    t = time.perf_counter()
                    if key == "indep":
                        cell[key, precision] = run_independent(model, precision, args, Path(tmp))
                    else:
                        cell[key, precision] = run_cell(model, nproc, precision, args, Path(tmp), threads)
                    print(f"  {model} {precision} {key}: {nproc} proc ({threads or 'all'} threads): "
                          f"{cell[key, precision]:,.0f} tok/s ({time.perf_counter() - t:.0f} s)", flush=True)
            rows.append((model, cell))
    print()
    print("| model | precision | 1 proc, 1 thread | 1 proc, all cores | 2 proc DDP | 2 independent procs "
          "| DDP / 1 thread | DDP / 1 proc all cores | independent / 1 thread | bf16 / fp32 (1 proc) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for model, cell in rows:
        for precision in args.precisions.split(","):
            base, one, two = cell["1x1", precision], cell["1", precision], cell["2", precision]
            speed = (f"{cell['1', 'bf16'] / cell['1', 'fp32']:.2f}x"
                     if precision == "bf16" and ("1", "fp32") in cell else "")
            indep = cell["indep", precision]
            print(f"| {model} | {precision} | {base:,.0f} | {one:,.0f} | {two:,.0f} | {indep:,.0f} | {two / base:.2f}x "
                  f"| {two / one:.2f}x | {indep / base:.2f}x | {speed} |")
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
