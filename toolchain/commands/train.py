"""`edgesmith train` and `edgesmith finetune`: the distributed trainer and LoRA / QLoRA."""

from __future__ import annotations

import argparse

from toolchain.train.finetune import FinetuneJob, run_finetune
from toolchain.train.run import TrainJob, run_train
from toolchain.train.trainer import PRECISIONS, STRATEGIES, TrainConfig

DEFAULTS = TrainConfig()


def _train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                       warmup=args.warmup, grad_accum=args.grad_accum, precision=args.precision,
                       strategy=args.strategy, grad_ckpt=args.grad_ckpt, eval_every=args.eval_every,
                       save_every=args.save_every, keep=args.keep, seed=args.seed)


def train(args: argparse.Namespace) -> None:
    job = TrainJob(model=args.model, data=args.data, out=args.out, train=_train_config(args), nproc=args.nproc,
                   resume=args.resume)
    s = run_train(job, args.argv)
    if s is not None:  # None: the torchrun launcher, or a rank other than 0 (rank 0 prints)
        print(f"checkpoint            {s['checkpoint']}")
        _print_loss(s)
        print(f"train tokens/s        {s['tokens_per_s']:,.0f} (median step, {s['world_size']} rank(s))")


def _print_loss(s: dict) -> None:
    print(f"final train loss      {s['final_loss']:.4f} (step {s['steps']})")
    if s["val_perplexity"] is not None:
        print(f"validation perplexity {s['val_perplexity']:.2f}")


def finetune(args: argparse.Namespace) -> None:
    job = FinetuneJob(checkpoint=args.checkpoint, data=args.data, out=args.out, train=_train_config(args),
                      rank=args.lora_rank, alpha=args.lora_alpha, targets=args.targets, qlora=args.qlora,
                      merge=args.merge, nproc=args.nproc, resume=args.resume)
    s = run_finetune(job, args.argv)
    if s is not None:
        print(f"trainable parameters  {s['trainable_params']:,} of {s['total_params']:,} (LoRA adapters)")
        _print_loss(s)
        print(f"output                {s['output']}")


def _add_train_options(t: argparse.ArgumentParser, steps: int, lr: float, batch_size: int) -> None:
    # Optimization
    t.add_argument("--steps", type=int, default=steps, help=f"optimizer steps (default {steps})")
    t.add_argument("--batch-size", type=int, default=batch_size, help="global batch in sequences "
                   f"(processes x per-process batch x --grad-accum; default {batch_size})")
    t.add_argument("--seq-len", type=int, default=DEFAULTS.seq_len, help=f"tokens per training sequence "
                   f"(default {DEFAULTS.seq_len})")
    t.add_argument("--lr", type=float, default=lr, help=f"peak learning rate, cosine decay (default {lr:g})")
    t.add_argument("--warmup", type=int, default=DEFAULTS.warmup, help=f"linear warm-up steps (default "
                   f"{DEFAULTS.warmup})")
    t.add_argument("--grad-accum", type=int, default=1, metavar="K", help="micro-batches accumulated per step")
    t.add_argument("--precision", default="fp32", help=f"{' or '.join(PRECISIONS)} (bf16: autocast)")
    t.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing per block")
    t.add_argument("--seed", type=int, default=0, help="initialization and data order")
    # Distribution
    t.add_argument("--nproc", type=int, default=1, metavar="N", help="processes on this machine (torchrun)")
    t.add_argument("--strategy", default="ddp", help=f"{' or '.join(STRATEGIES)} (fsdp: FSDP2 fully_shard)")
    # Monitoring and checkpoints
    t.add_argument("--eval-every", type=int, default=0, help="validation perplexity every N steps (0: at the end)")
    t.add_argument("--save-every", type=int, default=0, help="training-state checkpoint every N steps")
    t.add_argument("--keep", type=int, default=2, metavar="K", help="training-state checkpoints kept")
    t.add_argument("--resume", nargs="?", const="latest", default=None, metavar="STATE",
                   help="continue from the newest state under --out (or the given state directory)")


def register(sub) -> None:
    t = sub.add_parser("train", help="train a model (one process, or DDP/FSDP ranks through torchrun)")
    # Model and data
    t.add_argument("--model", default="nano", help="nano, micro, small or a CONFIG.json")
    t.add_argument("--data", default="stdlib", help="'stdlib' (embedded default), a text file or a folder")
    t.add_argument("--out", required=True, help="run directory: checkpoint/, state/, metrics.jsonl, loss.png")
    _add_train_options(t, DEFAULTS.steps, DEFAULTS.lr, DEFAULTS.batch_size)
    t.set_defaults(func=train)

    f = sub.add_parser("finetune", help="LoRA / QLoRA fine-tuning of a checkpoint")
    f.add_argument("checkpoint", help="the checkpoint directory to adapt")
    f.add_argument("--data", required=True, help="a text file or a folder (or 'stdlib')")
    f.add_argument("--out", required=True, help="run directory: adapter/ or merged/, state/, metrics.jsonl")
    f.add_argument("--lora-rank", type=int, required=True, metavar="R", help="rank of each adapter")
    f.add_argument("--lora-alpha", type=float, default=None, metavar="A", help="scale alpha / R (default: 2 R)")
    f.add_argument("--targets", default=None, metavar="REGEX", help="Linear names to adapt (default: every "
                   "projection of attention and MLP)")
    f.add_argument("--qlora", action="store_true", help="keep the frozen base in 4 bits (group 32)")
    f.add_argument("--merge", action="store_true", help="write a plain checkpoint with the adapters folded in")
    _add_train_options(f, 200, 1e-3, 8)
    f.set_defaults(func=finetune)
