"""Knowledge distillation: the `distill` pass, and what the training passes (distill, qat) share.

The student (the pass's input model: a pruned or factorized one; or `student=<size>`, a fresh model of
a named size with the teacher's vocabulary) is trained through the distributed trainer
(toolchain/train/trainer.py, so `edgesmith compress --nproc N` trains on N DDP ranks) to match the
teacher with

    loss = kl_weight * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + lm_weight * CE(student, next token)

(Hinton et al. 2015, arXiv:1503.02531; T^2 keeps the soft term's gradients the size of the hard one's).
The teacher is the model the compress run started from (its input checkpoint, before any pass), or
`teacher=<checkpoint>` with the same tokenizer. Perplexity on the validation split is measured for
teacher, student before and student after; `recovered` is the share of the student's perplexity gap
to the teacher that distillation closed. Weights that are exactly zero when training starts (a
magnitude or 2:4 pruned model) stay zero (`keep_zeros`): their gradients are masked, so AdamW never
moves them. This module does not prune.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.checkpoint import load_checkpoint
from models.errors import EdgesmithError
from models.llama import SIZES, Transformer, config_for
from models.registry import PASSES
from toolchain.compress.quality import compare
from toolchain.train.trainer import TrainConfig, train


@dataclass(frozen=True)
class TrainPass:
    """Fields every training pass has; they map onto toolchain.train.trainer.TrainConfig."""
    steps: int = 200
    batch_size: int = 8  # global batch in sequences (split over --nproc ranks)
    seq_len: int = 128
    lr: float = 1e-3
    warmup: int = 10
    eval_tokens: int = 16 * 1024  # validation tokens for the before / after perplexity
    keep_zeros: bool = True
    seed: int = 0

    def __post_init__(self):
        name = type(self).__name__.lower()
        for field in ("steps", "batch_size", "seq_len", "eval_tokens"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise EdgesmithError(f"{name}: {field}={v!r} must be an integer >= 1")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise EdgesmithError(f"{name}: warmup={self.warmup!r} must be an integer >= 0")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise EdgesmithError(f"{name}: lr={self.lr!r} must be > 0")
        if not isinstance(self.keep_zeros, bool):
            raise EdgesmithError(f"{name}: keep_zeros={self.keep_zeros!r}; allowed: true, false")

    def train_config(self):
        return TrainConfig(steps=self.steps, batch_size=self.batch_size, seq_len=self.seq_len, lr=float(self.lr),
                           warmup=self.warmup, eval_tokens=self.eval_tokens, seed=self.seed)


def keep_zeros_(model: nn.Module) -> tuple[list, int]:
    """Mask the gradient of every exactly-zero weight (2-D parameters); returns (hook handles, zeros held)."""
    handles, held = [], 0
    for p in model.parameters():
        if p.dim() == 2 and p.requires_grad:
            mask = p.detach() == 0
            if mask.any():
                held += int(mask.sum())
                handles.append(p.register_hook(lambda g, m=mask: g.masked_fill(m, 0)))
    return handles, held


def check_trainable(model: nn.Module, cfg: TrainPass, ctx) -> None:
    """Refuse, before any work, what the trainer would refuse later."""
    name = type(cfg).__name__.lower()
    if ctx.train_tokens is None:
        raise EdgesmithError(f"{name}: needs the train split (Context.train_tokens); "
                             "run it through `edgesmith compress`")
    if cfg.seq_len > model.config.max_seq_len:
        raise EdgesmithError(f"{name}: seq_len={cfg.seq_len} exceeds the model's max_seq_len "
                             f"{model.config.max_seq_len}")
    if len(ctx.train_tokens) <= cfg.seq_len + 1:
        raise EdgesmithError(f"{name}: the train split has {len(ctx.train_tokens)} tokens, "
                             f"too few for seq_len={cfg.seq_len}")


def run_training(model: nn.Module, cfg: TrainPass, ctx, loss_fn=None) -> tuple[nn.Module, list[dict]]:
    """Train `model` with the trainer on ctx's train split (on ctx.env's ranks); the trained model on every rank."""
    check_trainable(model, cfg, ctx)
    model.requires_grad_(True)  # every parameter of the student trains
    handles, held = keep_zeros_(model) if cfg.keep_zeros else ([], 0)
    try:
        trained, history = train(model, ctx.train_tokens, None, cfg.train_config(), env=ctx.env, loss_fn=loss_fn)
    finally:
        for h in handles:
            h.remove()
    ctx.report["zeros_kept"] = held
    ctx.report["train"] = {"steps": cfg.steps, "first_loss": history[0]["loss"], "final_loss": history[-1]["loss"],
                           "world_size": ctx.env.world if ctx.env is not None else 1}
    # DDP trains the module in place and keeps ranks identical: non-zero ranks keep their own copy.
    return (trained if trained is not None else model).eval(), history


def val_perplexity(model: nn.Module, ctx, cfg: TrainPass) -> float:
    if ctx.val_tokens is None:
        raise EdgesmithError(f"{type(cfg).__name__.lower()}: needs the validation split (Context.val_tokens)")
    return compare(model.eval(), None, ctx.val_tokens, min(cfg.seq_len, model.config.max_seq_len),
                   cfg.eval_tokens)["perplexity"]


# ----------------------------------------------------------------------------- distill


@dataclass(frozen=True)
class Distill(TrainPass):
    temperature: float = 2.0
    kl_weight: float = 1.0
    lm_weight: float = 0.5
    teacher: str | None = None  # a checkpoint; None: the compress run's input model
    student: str | None = None  # a named size; None: the pass's input model

    def __post_init__(self):
        super().__post_init__()
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            raise EdgesmithError(f"distill: temperature={self.temperature!r} must be > 0")
        for f in ("kl_weight", "lm_weight"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise EdgesmithError(f"distill: {f}={v!r} must be >= 0")
        if self.kl_weight == 0 and self.lm_weight == 0:
            raise EdgesmithError("distill: kl_weight and lm_weight are both 0; nothing to train on")
        if self.student is not None and self.student not in SIZES:
            raise EdgesmithError(f"distill: student={self.student!r} is not a named size; allowed: {', '.join(SIZES)}")


def load_teacher(cfg: Distill, ctx) -> nn.Module:
    if cfg.teacher is None:
        if ctx.reference is None:
            raise EdgesmithError("distill: no teacher: give teacher=<checkpoint> or run it through "
                                 "`edgesmith compress`")
        return ctx.reference
    t = load_checkpoint(cfg.teacher)
    if ctx.tokenizer is not None and t.tokenizer.fingerprint != ctx.tokenizer.fingerprint:
        raise EdgesmithError(f"distill: teacher={cfg.teacher}: its tokenizer differs from the student's")
    return t.model


def distill_loss(teacher: nn.Module, cfg: Distill):
    T = float(cfg.temperature)

    def loss_fn(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        s = logits.float().flatten(0, 1)  # (B*T, V)
        loss = torch.zeros((), device=s.device)
        if cfg.kl_weight:
            with torch.no_grad():
                t = teacher(x).float().flatten(0, 1)
            kl = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="batchmean")
            loss = loss + cfg.kl_weight * T * T * kl
        if cfg.lm_weight:
            loss = loss + cfg.lm_weight * F.cross_entropy(s, y.flatten())
        return loss

    return loss_fn


@PASSES.register("distill", config=Distill, trains=True)
def distill(model: nn.Module, cfg: Distill, ctx) -> nn.Module:
    teacher = load_teacher(cfg, ctx)
    if cfg.student is not None:  # a fresh model of a named size, speaking the teacher's vocabulary
        tc = teacher.config
        torch.manual_seed(cfg.seed)
        model = Transformer(dataclasses.replace(config_for(cfg.student), vocab_size=tc.vocab_size,
                                                max_seq_len=tc.max_seq_len))
    check_trainable(model, cfg, ctx)
    if model.config.vocab_size != teacher.config.vocab_size:
        raise EdgesmithError(f"distill: student vocab_size {model.config.vocab_size} differs from the teacher's "
                             f"{teacher.config.vocab_size}")
    device = ctx.env.device if ctx.env is not None else "cpu"
    teacher = teacher.to(device).eval()  # its forward runs under no_grad: nothing of it trains
    teacher_ppl = val_perplexity(teacher, ctx, cfg)
    before = val_perplexity(model, ctx, cfg)
    model, _ = run_training(model.train(), cfg, ctx, distill_loss(teacher, cfg))
    after = val_perplexity(model, ctx, cfg)
    gap = before - teacher_ppl
    ctx.report.update({
        "teacher": cfg.teacher or "the compress run's input model", "student": cfg.student or "the pass's input model",
        "perplexity": {"teacher": teacher_ppl, "before": before, "after": after},
        "recovered": (before - after) / gap if gap > 0 else None,
    })
    return model
