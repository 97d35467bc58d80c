"""Quantization-aware training: the `qat` pass.

Every layer the quantize passes would quantize (the same plan: bits, per-layer rules, the token
embedding by its rule, a tied head reading the embedding's table) becomes a fake-quant module whose
forward uses `dequantize(quantize_rtn(W))` — the canonical Q4_0 / Q8_0 group rounding of
models/quant.py, fp16 scales included — and whose backward passes the gradient straight through to
the float W (the straight-through estimator, Bengio et al. 2013, arXiv:1308.3432). The model trains
through the distributed trainer on the train split. At the end each fake-quant module becomes the
canonical QuantizedLinear / QuantizedEmbedding built by round-to-nearest from the same W, i.e. from
the same `quantize_rtn(W)` as the last fake-quant forward: the pass checks that the codes are
identical and that the quantized model's logits equal the fake-quant model's bit for bit (added
error 0), and reports it, with what the plain `rtn` pass scores on the input model so the gain from
QAT is visible. A later `quantize` pass finds nothing float left to change. This module does not
quantize activations or the KV cache.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.errors import EdgesmithError
from models.quant import QuantizedLinear, check_scheme, check_target, dequantize, quantize_rtn, replace_module_
from models.registry import PASSES
from toolchain.compress import Context
from toolchain.compress.common import embedding_names, plan_layers, quantize_embeddings_
from toolchain.compress.methods.rtn import RTN, rtn
from toolchain.compress.passes.distill import TrainPass, check_trainable, run_training, val_perplexity
from toolchain.compress.rules import bits_for, parse_rules


class _FakeQuant(torch.autograd.Function):
    """Forward: the canonical quantize-dequantize of W. Backward: identity (straight-through)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, bits: int, group_size: int, target: str = "any") -> torch.Tensor:
        codes, scales = quantize_rtn(w, bits, group_size, target)
        return dequantize(codes, scales, w.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None, None, None


class FakeQuantLinear(nn.Linear):
    """An nn.Linear trained through its own quantization (its float weight, the same Parameter object
    as the Linear it replaces -- a tied head keeps sharing the embedding's -- is the latent variable)."""

    def __init__(self, linear: nn.Linear, bits: int, group_size: int, target: str = "any"):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # a bias (Qwen2's q/k/v) trains as it is, in float
        self.bits, self.group_size, self.target = bits, group_size, target

    def fake_weight(self) -> torch.Tensor:
        return _FakeQuant.apply(self.weight, self.bits, self.group_size, self.target)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.fake_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class FakeQuantEmbedding(nn.Embedding):
    """An nn.Embedding looked up in its own quantized table (rows = tokens, groups along the dim)."""

    def __init__(self, emb: nn.Embedding, bits: int, group_size: int, target: str = "any"):
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim = emb.num_embeddings, emb.embedding_dim
        self.padding_idx, self.max_norm, self.norm_type = None, None, 2.0
        self.scale_grad_by_freq, self.sparse = False, False
        self.weight = emb.weight
        self.bits, self.group_size, self.target = bits, group_size, target

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, _FakeQuant.apply(self.weight, self.bits, self.group_size, self.target))


@dataclass(frozen=True)
class QAT(TrainPass):
    bits: int = 4
    group_size: int = 32
    rules: tuple = ()
    lr: float = 3e-4
    target: str = "any"  # "xnnpack": codes ExecuTorch's XNNPACK kernels hold exactly (models/quant.py TARGETS)

    def __post_init__(self):
        super().__post_init__()
        check_scheme(self.bits, self.group_size)
        check_target(self.target)
        object.__setattr__(self, "rules", parse_rules(self.rules))


def _rtn_baseline(model: nn.Module, cfg: QAT, ctx) -> float:
    """Validation perplexity of the `rtn` pass on the input model (what QAT is measured against)."""
    q = rtn(copy.deepcopy(model), RTN(bits=cfg.bits, group_size=cfg.group_size, rules=cfg.rules, target=cfg.target),
            Context())
    return val_perplexity(q, ctx, cfg)


def fake_quantize_(model: nn.Module, plan: dict, embeds: dict, group_size: int, target: str = "any") -> None:
    """Swap in the fake-quant modules; a Linear tied to a fake-quant embedding reads the same table."""
    for name, bits in embeds.items():
        emb = model.get_submodule(name)
        for head, m in list(model.named_modules()):
            if isinstance(m, nn.Linear) and m.weight is emb.weight:
                replace_module_(model, head, FakeQuantLinear(m, bits, group_size, target))
        replace_module_(model, name, FakeQuantEmbedding(emb, bits, group_size, target))
    for name, bits in plan.items():
        replace_module_(model, name, FakeQuantLinear(model.get_submodule(name), bits, group_size, target))


@torch.no_grad()
def finalize_(model: nn.Module, cfg: QAT, probe: torch.Tensor) -> dict:
    """Fake-quant modules -> the canonical quantized ones; verify identical codes and bit-identical logits."""
    fq = {n: m for n, m in model.named_modules() if isinstance(m, (FakeQuantLinear, FakeQuantEmbedding))}
    codes = {n: quantize_rtn(m.weight, m.bits, m.group_size, m.target) for n, m in fq.items()}
    fake_logits = model(probe)
    tied = {id(m.weight) for m in model.modules() if isinstance(m, FakeQuantEmbedding)}
    for name, m in fq.items():
        if isinstance(m, FakeQuantLinear) and id(m.weight) not in tied:
            replace_module_(model, name, QuantizedLinear.from_float(m, m.bits, m.group_size, name=name, target=m.target))
    quantize_embeddings_(model, cfg)  # the tables; a tied head becomes a reader of its table
    for name, (q, s) in codes.items():
        got = model.get_submodule(name)
        if not (torch.equal(got.qweight, q) and torch.equal(got.scales, s)):
            raise EdgesmithError(f"qat: {name}: quantized codes differ from the fake-quant codes")
    diff = (model(probe) - fake_logits).abs().max().item()
    return {"codes_identical": True, "added_error_max_abs_logit": diff}


@PASSES.register("qat", config=QAT, trains=True)
def qat(model: nn.Module, cfg: QAT, ctx) -> nn.Module:
    check_trainable(model, cfg, ctx)
    plan = {n: b for n, b in plan_layers(model, cfg, ctx.report).items() if b is not None}
    embeds = {n: b for n in embedding_names(model) if (b := bits_for(n, cfg.rules, cfg.bits)) is not None}
    if not plan and not embeds:
        raise EdgesmithError("qat: nothing float to quantize (rules skip every layer, or it is already quantized)")
    float_ppl = val_perplexity(model, ctx, cfg)
    rtn_ppl = _rtn_baseline(model, cfg, ctx)
    fake_quantize_(model, plan, embeds, cfg.group_size, cfg.target)
    model, _ = run_training(model.train(), cfg, ctx)
    probe = ctx.calibration[:2] if ctx.calibration is not None else torch.from_numpy(
        ctx.train_tokens[:cfg.seq_len].astype("int64")).unsqueeze(0)
    check = finalize_(model, cfg, probe.to(next(model.parameters()).device))
    ctx.report.update({"layers": {**embeds, **plan}, **check, "perplexity": {"float": float_ppl, "rtn": rtn_ppl,
                                                               "qat": val_perplexity(model, ctx, cfg)}})
    return model
