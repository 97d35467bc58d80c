"""Model families at their public shapes: export time, size, parity and decode speed per format (issue 21).

    python scripts/bench_families.py                                   # qwen2.5-0.5b, qwen3-0.6b, smollm2-135m
    python scripts/bench_families.py --shapes qwen3-0.6b --formats gguf --repeat 1
    python scripts/bench_families.py --shapes gemma-3-270m,phi-3-mini-4k:4,gemma-2-2b:2,mistral-7b:2 \
        --formats gguf,onnx,executorch --max-seq-len 512

A shape `NAME:N` keeps the public shape's width and its first N layers (the window pattern with them): Phi-3-mini,
Gemma-2-2B and Mistral-7B at about half a billion parameters, which this machine can fit and export.

For each shape (devices/shapes.py PUBLIC: the published config.json of the family's model) a randomly initialized model of
the family is built (Qwen2's q/k/v biases, Qwen3's q/k norms, tied embeddings), fitted a few steps on a little text
(peaked logits: parity then measures the exporter, not near-ties), RTN 4-bit group 32 (embedding included, so the
tied head reads it), then exported to each format through the same `export` the CLI runs (parity in the runtime
options the artifact records) and timed through `devices.bench.bench`, the code path of `edgesmith bench`: prefill
and decode tok/s, median of --repeat, peak RSS. The context is capped at --max-seq-len (for a GGUF of a family whose
llama.cpp architecture has no sliding window, at the window too: llama.cpp would attend past it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

from devices.bench import bench
from devices.shapes import PUBLIC
from models.checkpoint import child_lineage, save_checkpoint
from models.llama import Transformer
from models.quant import quantize_embedding_, quantize_linear_
from models.tokenizer import train_tokenizer
from toolchain.export import ExportConfig, export

def fit(model: Transformer, tokens: torch.Tensor, steps: int, seq: int = 64, batch: int = 2) -> None:
    """A few AdamW steps on the text: a random model's logits over a vocabulary of 150,000 are so flat that int8
    activations (llama.cpp's Q4_0 x Q8_0, ONNX Runtime's accuracy level 4) flip its argmax on near-ties; a model
    that has seen the text puts its mass on a few tokens, as a real one does."""
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(tokens) - seq - 1, (batch,), generator=g)
        window = torch.stack([tokens[s:s + seq + 1] for s in starts.tolist()])
        loss = torch.nn.functional.cross_entropy(model(window[:, :-1]).flatten(0, 1), window[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def shape_config(shape: str, max_seq_len: int):
    """PUBLIC[name], or with `name:N` its first N layers; the context capped at max_seq_len."""
    name, _, layers = shape.partition(":")
    cfg = PUBLIC[name]
    changes = {"max_seq_len": min(cfg.max_seq_len, max_seq_len)}
    if layers:
        n = int(layers)
        changes["n_layers"] = n
        if cfg.sliding_layers is not None:
            changes["sliding_layers"] = tuple(i for i in cfg.sliding_layers if i < n) or None
    return dataclasses.replace(cfg, **changes)


def make_checkpoint(shape: str, root: Path, max_seq_len: int, steps: int) -> tuple[Path, int]:
    cfg = shape_config(shape, max_seq_len)
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        for m in model.modules():  # biases away from their init, so they count
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.normal_(0, 0.02)
    n_params = model.num_params()
    text = "".join(Path(json.__file__).parent.joinpath(n).read_text() for n in ("decoder.py", "encoder.py"))
    tok = train_tokenizer([text], vocab_size=512, show_progress=False)
    fit(model, torch.tensor(tok.encode(text)), steps)
    quantize_linear_(model, 4, 32)
    quantize_embedding_(model, 4, 32)
    path = save_checkpoint(model, tok, root / shape.replace(":", "-"), child_lineage(None, {"kind": "quantize", "method": "rtn",
                                                                         "bits": 4, "group_size": 32}))
    return path, n_params


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="qwen2.5-0.5b,qwen3-0.6b,smollm2-135m")
    p.add_argument("--formats", default="gguf,onnx", help="comma list of: gguf, onnx, executorch")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--fit-steps", type=int, default=30, help="AdamW steps on a little text before quantizing")
    p.add_argument("--keep", default=None, metavar="DIR", help="work here (default: a temporary directory)")
    args = p.parse_args()
    print(f"bench_families: {vars(args)}", flush=True)
    root = Path(args.keep or tempfile.mkdtemp(prefix="bench-families-"))
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for shape in args.shapes.split(","):
        t0 = time.perf_counter()
        ckpt, n_params = make_checkpoint(shape, root, args.max_seq_len, args.fit_steps)
        cfg = shape_config(shape, args.max_seq_len)
        print(f"{shape}: {n_params / 1e6:.0f} M parameters, family {cfg.family}, fitted and RTN 4-bit in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        for fmt in args.formats.split(","):
            out = root / f"{shape.replace(':', '-')}-{fmt}"
            seq = cfg.max_seq_len
            if fmt == "gguf" and cfg.sliding_window and cfg.family not in ("gemma2", "gemma3"):
                seq = min(seq, cfg.sliding_window)  # llama.cpp's llama / qwen2 / phi3 have no window
            t0 = time.perf_counter()
            manifest = export(ckpt, out, ExportConfig(format=fmt, force=True, max_seq_len=seq), log=lambda line: None)
            export_s = time.perf_counter() - t0
            [r] = bench([out], prompt_len=args.prompt_len, gen_len=args.gen_len, repeat=args.repeat)
            par = manifest["parity"]
            rows.append((shape, fmt, sum(f["bytes"] for f in manifest["files"].values()) / 1e6, export_s,
                         par.get("max_abs_logit_diff"), par.get("argmax_agreement"), par.get("passed"),
                         r["prefill_tok_s"]["median"], r["decode_tok_s"]["median"], r["peak_rss_mb"]["median"],
                         " ".join(f"{k}={v}" for k, v in sorted(r.get("run_options", {}).items()))))
            print(f"  {fmt}: exported in {export_s:.0f} s, decode {rows[-1][8]:.1f} tok/s", flush=True)
    head = ("shape", "format", "MB", "export s", "max |dlogit|", "argmax", "parity", "prefill tok/s",
            "decode tok/s", "peak RSS MB", "ran with")
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.1f} | {r[3]:.0f} | {r[4]:.3g} | {r[5]:.3f} | {r[6]} | {r[7]:.0f} | "
              f"{r[8]:.1f} | {r[9]:.0f} | {r[10]} |")


if __name__ == "__main__":
    main()
