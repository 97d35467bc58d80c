"""Training-state checkpoints for exact resume: written atomically, the last K kept.

`<out>/state/step-NNNNNNNN/` holds `model.safetensors` and `optimizer.safetensors` (full state dicts
gathered through torch.distributed.checkpoint.state_dict, so a DDP, FSDP2 or single-process run can
resume the others' state), `trainer.json` (step, data position, scheduler, the run's model config and
global batch) and `rng-<rank>.json` (the torch, numpy and Python RNG states of every rank). Each is
written into a temporary directory renamed into place by rank 0, so a crash (even SIGKILL) leaves
either a complete checkpoint or none; the next save sweeps a dead run's temporaries (models/atomic.py),
and pruning renames a state aside before deleting it. Nothing is unpickled. Every rank reads the files: with several
nodes, `--out` must be on a filesystem they share. This module does not decide when to save.
"""

from __future__ import annotations

import base64
import json
import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from models.atomic import remove_tree, replace_dir, sweep_stale_in
from models.checkpoint import read_json, read_safetensors
from models.errors import EdgesmithError
from toolchain.train.launch import DistEnv, barrier

PREFIX = "step-"
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def state_root(out: Path) -> Path:
    return Path(out) / "state"


def list_states(out: Path) -> list[Path]:
    """Complete state checkpoints under `<out>/state`, oldest first (temporary dirs are skipped)."""
    root = state_root(out)
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / "trainer.json").is_file()]
    return sorted(done, key=lambda p: p.name)


# ----------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    d = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
         "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
         "python": [py_state[0], list(py_state[1]), py_state[2]]}
    if torch.cuda.is_available():
        d["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return d


def set_rng_state(d: dict) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(d["torch"])), dtype=torch.uint8))
    n = d["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = d["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if "cuda" in d and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(d["cuda"])), dtype=torch.uint8))


# ----------------------------------------------------------------------------- optimizer (de)flattening


def _split_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Full optimizer state dict -> tensors `state/<param fqn>/<key>` (safetensors) and the rest (JSON)."""
    tensors, scalars = {}, {}
    for fqn, per_param in sd["state"].items():
        for key, v in per_param.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state/{fqn}/{key}"] = v.detach().contiguous().cpu()
            else:
                scalars.setdefault(fqn, {})[key] = v
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _join_optimizer(tensors: dict, rest: dict) -> dict:
    state: dict[str, dict] = {}
    for name, v in tensors.items():
        _, fqn, key = name.split("/")
        state.setdefault(fqn, {})[key] = v
    for fqn, scalars in rest.get("scalars", {}).items():
        state.setdefault(fqn, {}).update(scalars)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in rest["param_groups"]]
    return {"state": state, "param_groups": groups}


# ----------------------------------------------------------------------------- save / load


def _shared_temp_dir(env: DistEnv, final: Path) -> Path:
    """Rank 0 makes `final`'s temporary directory, named with its pid (sweepable once it is dead); every
    rank learns the name through a broadcast of that pid (a tensor: nothing pickled)."""
    owner = torch.tensor([os.getpid()], dtype=torch.int64, device=env.device)
    if env.is_main:
        final.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale_in(final.parent)  # a killed run's half-written states (no live rank of ours writes there now)
    if env.distributed:
        dist.broadcast(owner, src=0)
    tmp = final.parent / f".{final.name}.tmp-{int(owner.item())}-{final.name.removeprefix(PREFIX)}"
    if env.is_main:
        tmp.mkdir()
    barrier(env)
    return tmp


def save_state(env: DistEnv, out: Path, step: int, model, optimizer, trainer: dict, keep: int) -> Path | None:
    """Collective: every rank calls it. Rank 0 writes `<out>/state/step-NNNNNNNN`, then prunes to `keep`."""
    root = state_root(out)
    final = root / f"{PREFIX}{step:08d}"
    tmp = _shared_temp_dir(env, final)
    (tmp / f"rng-{env.rank}.json").write_text(json.dumps(rng_state()))
    model_sd = get_model_state_dict(model, options=_FULL)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=_FULL)
    if env.is_main:
        save_file({k: v.contiguous() for k, v in model_sd.items()}, str(tmp / "model.safetensors"))
        tensors, rest = _split_optimizer(optim_sd)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(rest))
    barrier(env)
    if env.is_main:
        (tmp / "trainer.json").write_text(json.dumps({**trainer, "step": step, "world": env.world}, indent=2))
        replace_dir(tmp, final)
        for old in list_states(out)[:-keep]:
            remove_tree(old)  # renamed aside first: a kill mid-delete leaves no half state that looks complete
    barrier(env)
    return final if env.is_main else None


def read_trainer_json(path: Path) -> dict:
    return read_json(Path(path) / "trainer.json")


def load_state(env: DistEnv, path: Path, model, optimizer) -> dict:
    """Collective: restore model, optimizer and this rank's RNG from `path`; returns trainer.json."""
    path = Path(path)
    trainer = read_trainer_json(path)
    model_sd = read_safetensors(path / "model.safetensors")
    set_model_state_dict(model, model_sd, options=_FULL)
    optim_sd = _join_optimizer(read_safetensors(path / "optimizer.safetensors"),
                               read_json(path / "optimizer.json"))
    set_optimizer_state_dict(model, optimizer, optim_sd, options=_FULL)
    rng_file = path / f"rng-{env.rank}.json"
    if not rng_file.is_file():  # resumed with more ranks than saved: ranks share one seed anyway
        rng_file = path / "rng-0.json"
    if not rng_file.is_file():
        raise EdgesmithError(f"{path}: missing rng-0.json (incomplete state checkpoint)")
    set_rng_state(read_json_any(rng_file))
    return trainer


def read_json_any(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EdgesmithError(f"{path}: unreadable ({e})") from None
