"""The main job, first version: tokenizer + nano model on the embedded corpus, saved and measured.

`edgesmith run` with no arguments lands here: train a byte-level BPE tokenizer on the train split,
tokenize the corpus once, train the model with the trainer (one process), save the checkpoint under
`runs/<name>/checkpoints/00-train`, then report validation perplexity against the unigram baseline
and a sample generation. The recipe pipeline replaces this module; it holds no logic the pipeline
will not need.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from models.checkpoint import child_lineage, save_checkpoint, write_text_atomic
from models.errors import EdgesmithError
from models.llama import ModelConfig, Transformer, config_for
from models.tokenizer import MIN_VOCAB, Tokenizer, train_tokenizer
from runtimes.generate import generate
from runtimes.sampling import GenerationConfig
from toolchain.data import Corpus, cache_root, load_corpus, tokenize_corpus
from toolchain.evaluate import perplexity, unigram_perplexity
from toolchain.train.trainer import TrainConfig, train

EVAL_TOKENS = 64 * 1024  # validation tokens scored; enough for a stable figure, fast on 2 cores
SAMPLE_PROMPT = "def "


@dataclass(frozen=True)
class DemoConfig:
    model: str = "nano"
    data: str = "stdlib"
    vocab_size: int | None = None  # None: the named size's vocabulary
    out: str = "runs/demo"
    train: TrainConfig = field(default_factory=TrainConfig)

    def model_config(self) -> ModelConfig:
        cfg = config_for(self.model)
        if self.vocab_size is not None:
            if self.vocab_size < MIN_VOCAB:
                raise EdgesmithError(f"--vocab-size: {self.vocab_size} is too small; byte-level BPE needs at "
                                     f"least {MIN_VOCAB} (256 bytes + <|bos|>, <|endoftext|>, <|pad|>)")
            cfg = dataclasses.replace(cfg, vocab_size=self.vocab_size)
        return cfg


def cached_tokenizer(corpus: Corpus, vocab_size: int) -> Tokenizer:
    """Train a tokenizer on the train split once per (corpus content, vocab size)."""
    key = hashlib.sha256(f"{corpus.fingerprint()}\0{vocab_size}".encode()).hexdigest()[:24]
    out = cache_root() / "tokenizers" / key
    if not (out / "tokenizer.json").is_file():
        tok = train_tokenizer(corpus.texts("train"), vocab_size, length=len(corpus.train))
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{key}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        tok.save(tmp)
        try:
            tmp.rename(out)
        except OSError:  # made concurrently by another process
            shutil.rmtree(tmp, ignore_errors=True)
    return Tokenizer.load(out)


def sample_text(model: Transformer, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 64) -> str:
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.8, top_k=50, seed=0,
                           stop_tokens=(tokenizer.eos_id,))
    ids = [t for t in generate(model, [tokenizer.bos_id, *tokenizer.encode(prompt)], cfg) if t != tokenizer.eos_id]
    return prompt + tokenizer.decode(ids)


def run_demo(cfg: DemoConfig) -> dict:
    """Run the whole first job; returns the summary it also writes to `<out>/summary.json`."""
    t_start = time.perf_counter()
    model_cfg = cfg.model_config()  # validate every input before any work or any file
    if cfg.train.seq_len > model_cfg.max_seq_len:
        raise EdgesmithError(f"--seq-len: {cfg.train.seq_len} exceeds the model's max_seq_len {model_cfg.max_seq_len}")
    corpus = load_corpus(cfg.data)
    print(f"corpus {corpus.name}: {len(corpus.train)} train / {len(corpus.val)} validation documents")

    tokenizer = cached_tokenizer(corpus, model_cfg.vocab_size)
    tokens = tokenize_corpus(corpus, tokenizer)
    print(f"tokens: {len(tokens.train):,} train / {len(tokens.val):,} validation (vocab {tokenizer.vocab_size})")

    torch.manual_seed(cfg.train.seed)
    model = Transformer(model_cfg)
    print(f"model {cfg.model}: {model.num_params() / 1e6:.2f} M parameters; training {cfg.train.steps} steps "
          f"of {cfg.train.batch_size} x {cfg.train.seq_len} tokens")
    model, history = train(model, tokens.train, None, cfg.train)

    ckpt_dir = Path(cfg.out) / "checkpoints" / "00-train"
    step = {"kind": "train", "trainer": "edgesmith", "model": cfg.model, "data": corpus.name,
            "config": dataclasses.asdict(cfg.train), "final_loss": history[-1]["loss"]}
    save_checkpoint(model, tokenizer, ckpt_dir, child_lineage(None, step))

    seq_len = cfg.train.seq_len
    ppl = perplexity(model, tokens.val, seq_len, max_tokens=EVAL_TOKENS)
    scored = tokens.val[1:1 + (min(len(tokens.val) - 1, EVAL_TOKENS) // seq_len) * seq_len]
    unigram = unigram_perplexity(tokens.train, scored, model_cfg.vocab_size)
    sample = sample_text(model, tokenizer, SAMPLE_PROMPT)
    summary = {
        "checkpoint": str(ckpt_dir),
        "val_perplexity": ppl,
        "unigram_perplexity": unigram,
        "final_train_loss": history[-1]["loss"],
        "train_tokens_per_s": sorted(h["tokens_per_s"] for h in history)[len(history) // 2],
        "wall_s": time.perf_counter() - t_start,
        "sample": sample,
    }
    write_text_atomic(Path(cfg.out) / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
