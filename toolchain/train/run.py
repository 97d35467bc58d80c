"""`edgesmith train`: validate, prepare data, launch the ranks, train, write the HF checkpoint.

Every input is checked in the first process before any rank starts or any file is written (unknown
size, missing corpus, a global batch that does not divide, a resume from another model's state).
With `--nproc N > 1` the tokenizer and token files are made once, then the command re-runs itself
under torchrun; inside a torchrun group (ours or an outside multi-node one), local rank 0 of each
node prepares the data while the others wait. Rank 0 writes `<out>/checkpoint` (HF layout, lineage),
`<out>/metrics.jsonl`, `<out>/loss.png` and `<out>/summary.json`. LoRA fine-tuning is finetune.py.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from models.checkpoint import child_lineage, from_hf_config, read_json, save_checkpoint, write_text_atomic
from models.errors import EdgesmithError
from models.llama import SIZES, ModelConfig, Transformer, config_for
from toolchain.data import load_corpus, tokenize_corpus
from toolchain.demo import cached_tokenizer
from toolchain.train.launch import (DistEnv, barrier, init_distributed, nproc_warning, relaunch, shutdown,
                                    under_torchrun)
from toolchain.train.trainer import TrainConfig, check_resumable, latest_state, train


@dataclass(frozen=True)
class TrainJob:
    model: str  # a named size or a JSON config file (ModelConfig fields, or a HF Llama config.json)
    data: str
    out: str
    train: TrainConfig
    nproc: int = 1
    resume: str | None = None  # "latest" or a state directory

    def __post_init__(self):
        if isinstance(self.nproc, bool) or not isinstance(self.nproc, int) or self.nproc < 1:
            raise EdgesmithError(f"--nproc: {self.nproc!r} must be an integer >= 1")


def resolve_model_config(spec: str) -> ModelConfig:
    if spec in SIZES:
        return config_for(spec)
    if not spec.endswith(".json"):
        return config_for(spec)  # raises: unknown size, allowed values listed
    d = read_json(Path(spec))
    if "model_type" in d:
        return from_hf_config(d, spec)
    return ModelConfig.from_dict(d, source=spec)


def resolve_resume(job: TrainJob) -> Path | None:
    if job.resume is None:
        return None
    if job.resume == "latest":
        return latest_state(Path(job.out))
    path = Path(job.resume)
    if not (path / "trainer.json").is_file():
        raise EdgesmithError(f"--resume: {path} is not a training-state checkpoint (no trainer.json)")
    return path


def validate(job: TrainJob, world: int):
    """All checks that need no data: returns (model config, resume state dir)."""
    model_cfg = resolve_model_config(job.model)
    job.train.micro_batch(world)
    if job.train.seq_len > model_cfg.max_seq_len:
        raise EdgesmithError(f"--seq-len: {job.train.seq_len} exceeds the model's max_seq_len {model_cfg.max_seq_len}")
    resume = resolve_resume(job)
    if resume is not None:
        check_resumable(resume, model_cfg.to_dict(), job.train)
    return model_cfg, resume


def prepare_data(data: str, vocab_size: int):
    """(corpus, tokenizer, token files), cached on disk after the first call."""
    corpus = load_corpus(data)
    tokenizer = cached_tokenizer(corpus, vocab_size)
    return corpus, tokenizer, tokenize_corpus(corpus, tokenizer)


def world_size(nproc: int) -> int:
    """The number of ranks this command will run as: torchrun's WORLD_SIZE inside a group, else --nproc."""
    return int(os.environ["WORLD_SIZE"]) if under_torchrun() else nproc


def launch(nproc: int, argv: list[str], prepare) -> tuple[DistEnv | None, object]:
    """Validated inputs in hand: (None, None) in a launcher that ran the ranks, else (env, prepare()).

    With `nproc > 1` outside torchrun, `prepare()` fills the on-disk caches once, then the command
    re-runs under torchrun. Inside a group, local rank 0 of each node prepares first, the others after.
    """
    if not under_torchrun():
        warning = nproc_warning(nproc)
        if warning:
            print(warning, file=sys.stderr)
        if nproc > 1:
            prepare()
            code = relaunch(argv, nproc)
            if code:
                raise EdgesmithError(f"--nproc {nproc}: a training rank failed with exit status {code} "
                                     "(its error is printed above)")
            return None, None
    env = init_distributed()
    try:
        if env.local_rank != 0:
            barrier(env)
        prepared = prepare()
        if env.local_rank == 0:
            barrier(env)
    except BaseException:
        shutdown(env)
        raise
    return env, prepared


def run_train(job: TrainJob, argv: list[str]) -> dict | None:
    """The whole command. Returns the summary on rank 0 (None on other ranks and in a launcher)."""
    model_cfg, resume = validate(job, world_size(job.nproc))
    load_corpus(job.data)  # a missing or empty corpus fails here, before any rank starts
    env, prepared = launch(job.nproc, argv, lambda: prepare_data(job.data, model_cfg.vocab_size))
    if env is None:
        return None
    try:
        return _train_ranks(job, env, model_cfg, resume, *prepared)
    finally:
        shutdown(env)


def _train_ranks(job, env, model_cfg, resume, corpus, tokenizer, tokens) -> dict | None:
    t_start = time.perf_counter()
    cfg = job.train
    torch.manual_seed(cfg.seed)  # every rank builds the same initial weights
    model = Transformer(model_cfg)
    if env.is_main:
        print(f"train {job.model}: {model.num_params() / 1e6:.2f} M parameters, {len(tokens.train):,} train tokens; "
              f"{env.world} rank(s), {cfg.strategy if env.distributed else 'single process'}, {cfg.precision}, "
              f"global batch {cfg.batch_size} x {cfg.seq_len} tokens"
              + (f", resuming from {resume}" if resume else ""), flush=True)
    out = Path(job.out)
    plain, history = train(model, tokens.train, tokens.val, cfg, env, out=out, resume=resume)
    if not env.is_main:
        return None
    step = {"kind": "train", "trainer": "distributed", "model": job.model, "data": corpus.name,
            "world_size": env.world, "config": asdict(cfg)}
    ckpt = save_checkpoint(plain, tokenizer, out / "checkpoint", child_lineage(None, step))
    final = history[-1]
    rates = sorted(r["tokens_per_s"] for r in history)
    summary = {"checkpoint": str(ckpt), "steps": final["step"], "final_loss": final["loss"],
               "val_perplexity": final.get("val_ppl"), "tokens_per_s": rates[len(rates) // 2],
               "world_size": env.world, "wall_s": time.perf_counter() - t_start}
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
