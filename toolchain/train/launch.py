"""Process groups for the trainer: join one started by torchrun, or re-launch through it.

`edgesmith train --nproc N` (N > 1) re-runs the same command line under `torch.distributed.run`
(`--standalone`, N processes on this machine). A process started by torchrun -- ours or an outside
one spanning several nodes (`--nnodes`, `--node-rank`, `--rdzv-endpoint`) -- finds RANK/WORLD_SIZE
in its environment and joins that group: gloo on CPU, nccl on CUDA. CPU threads are split so ranks
on one machine do not oversubscribe its cores. This module does not train or read data.
"""

from __future__ import annotations

import datetime
import functools
import os
import signal
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from models.errors import EdgesmithError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def threads_per_rank(local_world: int) -> int:
    """OMP_NUM_THREADS when set (torchrun sets it), else the usable cores shared among local ranks."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, usable_cores() // max(1, local_world))


def init_distributed() -> DistEnv:
    """Join the torchrun group if this process is in one; otherwise a single-process DistEnv."""
    if not under_torchrun():
        torch.set_num_threads(threads_per_rank(1))
        return DistEnv(device="cuda" if torch.cuda.is_available() else "cpu")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        backend, device = "nccl", f"cuda:{local_rank}"
    else:
        backend, device = "gloo", "cpu"
    _die_with_torchrun()
    torch.set_num_threads(threads_per_rank(local_world))
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return DistEnv(rank, world, local_rank, local_world, device)


def shutdown(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def nproc_warning(nproc: int) -> str | None:
    """gloo ranks beyond the usable cores only time-share them: say so, but run."""
    cores = usable_cores()
    if not torch.cuda.is_available() and nproc > cores:
        return (f"edgesmith: warning: --nproc {nproc} is more than the {cores} usable CPU cores; "
                f"the ranks will share cores (1 thread each) and run slower than {cores}")
    return None


def strip_nproc(argv: list[str]) -> list[str]:
    """ARGV without `--nproc N`: ranks take their count from torchrun, whose own parser would read
    `--nproc` as an ambiguous abbreviation of its `--nproc-per-node`."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def relaunch(argv: list[str], nproc: int) -> int:
    """Run `python -m edgesmith ARGV` as `nproc` ranks under torchrun on this machine; its exit code."""
    threads = max(1, usable_cores() // nproc)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads)),
           "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "toolchain.train.torchrun", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "edgesmith", *strip_nproc(argv)]
    preexec = functools.partial(_term_with_parent, os.getpid(), _prctl())  # prctl looked up before the fork
    return subprocess.run(cmd, env=env, preexec_fn=preexec).returncode


PR_SET_PDEATHSIG = 1


def _prctl():
    """libc's prctl (Linux), or None elsewhere: the kernel can signal a process when its parent dies."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl


def _term_with_parent(parent: int, prctl) -> None:
    """In the torchrun child, before exec: SIGTERM when this process dies, even by SIGKILL (Linux).

    torchrun answers SIGTERM by stopping its ranks, so a killed `edgesmith` leaves no orphan rank
    writing into the run it was killed in (the rerun resumes alone). A parent that died before the
    prctl took effect is caught by the check after it."""
    if prctl is not None and prctl(PR_SET_PDEATHSIG, signal.SIGTERM) == 0 and os.getppid() != parent:
        os._exit(1)


def _die_with_torchrun() -> None:
    """A rank of our torchrun (toolchain.train.torchrun sets EDGESMITH_TORCHRUN_PID): SIGKILL when it dies.

    torchrun starts each rank in a session of its own, so killing the process group of `edgesmith`
    (a terminal's kill, a job manager's) takes torchrun down with SIGKILL before it can stop them;
    without this the ranks would go on training into the run the rerun resumes."""
    pid, prctl = os.environ.get("EDGESMITH_TORCHRUN_PID", ""), _prctl()
    if not pid.isdigit() or prctl is None:
        return
    if prctl(PR_SET_PDEATHSIG, signal.SIGKILL) == 0 and os.getppid() != int(pid):
        raise EdgesmithError(f"torchrun (pid {pid}) exited before rank {os.environ.get('RANK')} started; "
                             "the rank stops")
