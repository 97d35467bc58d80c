"""`edgesmith finetune CKPT`: LoRA / QLoRA fine-tuning of a checkpoint with the same trainer.

Loads the checkpoint (its tokenizer tokenizes `--data`), swaps in adapters (lora.py), trains only
them with trainer.train (one process or DDP ranks; resume and monitoring as for `train`), then
writes `<out>/adapter/` (adapter tensors + config naming the base) or, with `--merge`, `<out>/merged/`:
a plain float checkpoint with the adapters folded in, whose lineage extends the base's. It does not
quantize for deployment: `--qlora` only keeps the frozen base in 4 bits while training.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from models.checkpoint import child_lineage, load_checkpoint, save_checkpoint, write_text_atomic
from models.errors import EdgesmithError
from toolchain.data import load_corpus, tokenize_corpus
from toolchain.train.launch import shutdown
from toolchain.train.lora import DEFAULT_TARGETS, LoRA, apply_lora_, count_params, merge_lora_, save_adapter
from toolchain.train.run import launch, world_size
from toolchain.train.trainer import TrainConfig, check_resumable, latest_state, train


@dataclass(frozen=True)
class FinetuneJob:
    checkpoint: str
    data: str
    out: str
    train: TrainConfig
    rank: int = 8
    alpha: float | None = None
    targets: str | None = None
    qlora: bool = False
    merge: bool = False
    nproc: int = 1
    resume: str | None = None

    def lora(self) -> LoRA:
        return LoRA(rank=self.rank, alpha=self.alpha, targets=self.targets or DEFAULT_TARGETS, qlora=self.qlora)


def _validate(job: FinetuneJob):
    lora = job.lora()
    if job.train.strategy != "ddp":
        raise EdgesmithError(f"--strategy: {job.train.strategy!r} is not supported by finetune; allowed: ddp "
                             "(adapters are small: DDP replicates them cheaply)")
    job.train.micro_batch(world_size(job.nproc))
    ckpt = load_checkpoint(job.checkpoint, with_model=False)
    if job.train.seq_len > ckpt.config.max_seq_len:
        raise EdgesmithError(f"--seq-len: {job.train.seq_len} exceeds the model's max_seq_len {ckpt.config.max_seq_len}")
    resume = None
    if job.resume is not None:
        resume = latest_state(Path(job.out)) if job.resume == "latest" else Path(job.resume)
        check_resumable(resume, ckpt.config.to_dict(), job.train)
    return lora, resume


def _prepare(job: FinetuneJob):
    ckpt = load_checkpoint(job.checkpoint)
    corpus = load_corpus(job.data)
    return ckpt, corpus, tokenize_corpus(corpus, ckpt.tokenizer)


def run_finetune(job: FinetuneJob, argv: list[str]) -> dict | None:
    """The whole command; the summary on rank 0, None elsewhere."""
    lora, resume = _validate(job)
    load_corpus(job.data)
    env, prepared = launch(job.nproc, argv, lambda: _prepare(job))
    if env is None:
        return None
    try:
        t_start = time.perf_counter()
        ckpt, corpus, tokens = prepared
        model = ckpt.model
        torch.manual_seed(job.train.seed)  # same adapter initialisation on every rank
        names = apply_lora_(model, lora)
        trainable, total = count_params(model)
        if env.is_main:
            print(f"finetune {ckpt.path}: {'QLoRA (4-bit base)' if lora.qlora else 'LoRA'} rank {lora.rank} on "
                  f"{len(names)} Linears, {trainable:,} trainable of {total:,} parameters", flush=True)
        out = Path(job.out)
        plain, history = train(model, tokens.train, tokens.val, job.train, env, out=out, resume=resume)
        if not env.is_main:
            return None
        if job.merge:
            step = {"kind": "finetune", "method": "qlora" if lora.qlora else "lora", "lora": asdict(lora),
                    "data": corpus.name, "config": asdict(job.train), "merged": True}
            output = save_checkpoint(merge_lora_(plain), ckpt.tokenizer, out / "merged", child_lineage(ckpt, step))
        else:
            output = save_adapter(plain, lora, out / "adapter", base=str(ckpt.path))
        final = history[-1]
        summary = {"output": str(output), "steps": final["step"], "final_loss": final["loss"],
                   "val_perplexity": final.get("val_ppl"), "trainable_params": trainable, "total_params": total,
                   "adapted": names, "wall_s": time.perf_counter() - t_start}
        write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary
    finally:
        shutdown(env)
