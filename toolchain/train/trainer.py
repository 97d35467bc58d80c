"""The trainer: one loop for a single process, DDP and FSDP2 ranks.

AdamW with warmup + cosine (a LambdaLR), gradient clipping, gradient accumulation, bf16 autocast,
activation checkpointing per block, validation perplexity every `eval_every` steps, a metrics JSONL
file, a rank-0 progress bar, a PNG loss curve, and atomic training-state checkpoints (state.py) from
which `resume` continues bit for bit. The global batch (`batch_size`, in sequences) is split as
world x micro batch x accumulation, so the same global batch trains the same model whatever the
process count. It does not make tokenizers, read corpora or write the final HF checkpoint (run.py).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from models.atomic import write_bytes_atomic, write_text_atomic
from models.errors import EdgesmithError
from toolchain.train.launch import DistEnv
from toolchain.train.state import list_states, load_state, read_trainer_json, save_state
from toolchain.train.stream import TokenStream

PRECISIONS = ("fp32", "bf16")
STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 600
    batch_size: int = 16  # global batch, in sequences: world x micro batch x grad_accum
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    grad_accum: int = 1
    precision: str = "fp32"
    strategy: str = "ddp"
    grad_ckpt: bool = False
    eval_every: int = 0  # 0: only at the end
    eval_tokens: int = 16 * 1024
    save_every: int = 0  # 0: no training-state checkpoints
    keep: int = 2
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "keep", "eval_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise EdgesmithError(f"--{name.replace('_', '-')}: {value!r} must be an integer >= 1")
        for name in ("warmup", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise EdgesmithError(f"--{name.replace('_', '-')}: {getattr(self, name)} must be >= 0")
        if not self.lr > 0:
            raise EdgesmithError(f"--lr: {self.lr} must be > 0")
        if self.precision not in PRECISIONS:
            raise EdgesmithError(f"--precision: {self.precision!r} is not supported; allowed: {', '.join(PRECISIONS)}")
        if self.strategy not in STRATEGIES:
            raise EdgesmithError(f"--strategy: {self.strategy!r} is not supported; allowed: {', '.join(STRATEGIES)}")

    def micro_batch(self, world: int) -> int:
        if self.batch_size % (world * self.grad_accum):
            raise EdgesmithError(
                f"--batch-size: {self.batch_size} does not divide into {world} process(es) x {self.grad_accum} "
                f"accumulation step(s); use a multiple of {world * self.grad_accum}")
        return self.batch_size // (world * self.grad_accum)

    def lr_factor(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def lr_at(self, step: int) -> float:
        return self.lr * self.lr_factor(step)


# ----------------------------------------------------------------------------- model preparation


def enable_grad_ckpt_(model: nn.Module) -> None:
    """Recompute each block's activations in backward instead of storing them."""
    for block in model.layers:
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward


def wrap_model(model: nn.Module, cfg: TrainConfig, env: DistEnv) -> nn.Module:
    """The module the loop trains: the model itself, DDP around it, or the model fully_shard-ed in place."""
    model.to(env.device)
    if cfg.grad_ckpt:
        enable_grad_ckpt_(model)
    if not env.distributed:
        return model
    if cfg.strategy == "ddp":
        device_ids = [env.local_rank] if env.device.startswith("cuda") else None
        # Buffers (rope tables, QLoRA codes) are built identically on every rank: no per-step broadcast.
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)
    from torch.distributed.fsdp import fully_shard

    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    return model


def make_optimizer(model: nn.Module, cfg: TrainConfig):
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for _, p in params if p.dim() >= 2]
    no_decay = [p for _, p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cfg.lr_factor)
    return opt, sched


def _autocast(cfg: TrainConfig, env: DistEnv):
    if cfg.precision == "bf16":
        return torch.autocast(device_type=env.device.split(":")[0], dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _sync_context(model: nn.Module, sync: bool):
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if sync else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def _all_mean(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= env.world
    return t


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: nn.Module, val: np.ndarray, cfg: TrainConfig, env: DistEnv, batch: int = 8) -> float:
    """Validation perplexity over the first `eval_tokens` tokens, windows split evenly among ranks."""
    fwd = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    n_windows = max(1, min(len(val) - 1, cfg.eval_tokens) // cfg.seq_len)
    per_rank = max(1, n_windows // env.world)
    mine = [(env.rank * per_rank + i) % n_windows for i in range(per_rank)]
    was_training = fwd.training
    fwd.eval()
    total = torch.zeros(2, dtype=torch.float64, device=env.device)
    for i in range(0, per_rank, batch):
        rows = [val[w * cfg.seq_len: w * cfg.seq_len + cfg.seq_len + 1].astype(np.int64) for w in mine[i:i + batch]]
        xy = torch.from_numpy(np.stack(rows)).to(env.device)
        with _autocast(cfg, env):
            logits = fwd(xy[:, :-1])
        total[0] += F.cross_entropy(logits.float().flatten(0, 1), xy[:, 1:].flatten(), reduction="sum").double()
        total[1] += xy[:, 1:].numel()
    if env.distributed:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    fwd.train(was_training)
    return math.exp((total[0] / total[1]).item())


# ----------------------------------------------------------------------------- monitoring


class Metrics:
    """`<out>/metrics.jsonl` on rank 0: one line per step (and `val_ppl` on evaluation steps)."""

    def __init__(self, out: Path | None, env: DistEnv, resume_step: int):
        self.path = Path(out) / "metrics.jsonl" if out is not None and env.is_main else None
        self.history: list[dict] = []
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step and self.path.is_file():  # drop steps redone after the checkpoint
            self.history = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.history))

    def log(self, record: dict) -> None:
        self.history.append(record)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([r["step"] for r in self.history], [r["loss"] for r in self.history], label="train loss")
        evals = [r for r in self.history if "val_ppl" in r]
        if evals:
            ax.plot([r["step"] for r in evals], [math.log(r["val_ppl"]) for r in evals], "o-", label="val loss")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats)")
        ax.grid(alpha=0.3)
        ax.legend()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        write_bytes_atomic(path, buf.getvalue())


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl. A last line without its newline is a record whose append was cut
    short by a kill: dropped (the step is redone after a resume). Any other bad line is an error."""
    lines = Path(path).read_text().split("\n")[:-1]  # the last piece: "" after the final newline, or torn
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise EdgesmithError(f"{path}: line {i} is not a JSON record ({e})") from None
    return records


# ----------------------------------------------------------------------------- resume checks


def check_resumable(state_dir: Path, model_config: dict, cfg: TrainConfig) -> dict:
    """trainer.json of `state_dir`, or one line saying why this run cannot continue it."""
    t = read_trainer_json(state_dir)
    if t.get("model_config") != model_config:
        theirs = t.get("model_config") or {}
        diff = sorted(k for k in set(theirs) | set(model_config) if theirs.get(k) != model_config.get(k))
        raise EdgesmithError(f"--resume: {state_dir} was made by another model ({', '.join(diff)} differ)")
    for key in ("batch_size", "seq_len"):
        if t["train_config"][key] != getattr(cfg, key):
            raise EdgesmithError(f"--resume: {state_dir} was trained with --{key.replace('_', '-')} "
                                 f"{t['train_config'][key]}, not {getattr(cfg, key)}")
    if t["step"] > cfg.steps:
        raise EdgesmithError(f"--resume: {state_dir} is at step {t['step']}, past --steps {cfg.steps}")
    return t


def latest_state(out: Path) -> Path:
    states = list_states(out)
    if not states:
        raise EdgesmithError(f"--resume: {Path(out) / 'state'} holds no training-state checkpoint")
    return states[-1]


# ----------------------------------------------------------------------------- the loop


def train(model: nn.Module, train_tokens: np.ndarray, val_tokens: np.ndarray | None, cfg: TrainConfig,
          env: DistEnv | None = None, out: Path | None = None, resume: Path | None = None,
          progress: bool = True, loss_fn=None) -> tuple[nn.Module | None, list[dict]]:
    """Train `model`; returns (on rank 0: a plain module holding the full trained weights, else None) and history.

    Collective when `env.distributed`: every rank calls it with the same arguments. `loss_fn(logits, x, y)
    -> scalar`, when given, replaces the next-token cross-entropy (distillation adds a teacher term).
    """
    env = env or DistEnv()
    micro = cfg.micro_batch(env.world)
    model_config = model.config.to_dict()
    if cfg.seq_len > model.config.max_seq_len:
        raise EdgesmithError(f"--seq-len: {cfg.seq_len} exceeds the model's max_seq_len {model.config.max_seq_len}")
    if val_tokens is not None and len(val_tokens) <= cfg.seq_len:
        raise EdgesmithError(f"--seq-len: the validation split has {len(val_tokens)} tokens, fewer than "
                             f"seq_len + 1 = {cfg.seq_len + 1}")
    if resume is not None:
        check_resumable(resume, model_config, cfg)
    stream = TokenStream(train_tokens, cfg.seq_len, cfg.seed)
    plain = copy.deepcopy(model) if env.is_main and env.distributed and cfg.strategy == "fsdp" else model
    wrapped = wrap_model(model, cfg, env)
    opt, sched = make_optimizer(wrapped, cfg)
    start, position = 0, 0
    if resume is not None:
        t = load_state(env, resume, wrapped, opt)
        sched.load_state_dict(t["scheduler"])
        start, position = t["step"], t["data_position"]
    metrics = Metrics(out, env, start)
    wrapped.train()
    tokens_per_step = cfg.batch_size * cfg.seq_len
    bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", disable=not (progress and env.is_main))
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        lr = opt.param_groups[0]["lr"]
        opt.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=env.device)
        for a in range(cfg.grad_accum):
            x, y = stream.micro_batch(position, a, env.rank, env.world, micro)
            x, y = x.to(env.device), y.to(env.device)
            with _sync_context(wrapped, a == cfg.grad_accum - 1):
                with _autocast(cfg, env):
                    logits = wrapped(x)
                    loss = (F.cross_entropy(logits.float().flatten(0, 1), y.flatten()) if loss_fn is None
                            else loss_fn(logits, x, y)) / cfg.grad_accum
                loss.backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in wrapped.parameters() if p.requires_grad], cfg.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        opt.step()
        sched.step()
        position += cfg.batch_size
        loss_value = _all_mean(loss_sum, env).item()
        record = {"step": step + 1, "loss": loss_value, "lr": lr, "grad_norm": grad_norm.item(),
                  "tokens_per_s": tokens_per_step / (time.perf_counter() - t0)}
        last = step + 1 == cfg.steps
        if val_tokens is not None and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or last):
            record["val_ppl"] = evaluate(wrapped, val_tokens, cfg, env)
        metrics.log(record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}")
        if out is not None and cfg.save_every and ((step + 1) % cfg.save_every == 0 or last):
            trainer_state = {"data_position": position, "scheduler": sched.state_dict(),
                             "model_config": model_config, "train_config": asdict(cfg)}
            save_state(env, out, step + 1, wrapped, opt, trainer_state, cfg.keep)
    bar.close()
    if out is not None and env.is_main and metrics.history:
        metrics.plot(Path(out) / "loss.png")
    return _gather_plain(wrapped, plain, cfg, env), metrics.history


def _gather_plain(wrapped: nn.Module, plain: nn.Module, cfg: TrainConfig, env: DistEnv) -> nn.Module | None:
    """Rank 0 gets a plain (unwrapped, unsharded) module with the trained weights."""
    if not env.distributed:
        return plain.eval()
    if cfg.strategy == "ddp":
        return plain.eval() if env.is_main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not env.is_main:
        return None
    plain.load_state_dict(full)
    return plain.eval()
