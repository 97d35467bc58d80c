"""ExecuTorch benchmark: ExecuTorch's own Llama export (`export_llama`) as the anchor, beside ours, same weights.

A Llama (default ~336 M parameters: dim 1024, 24 layers, 16/4 heads, ffn 2816, vocab 32000, max_seq_len
1024; random, the norm weights jittered so a swapped norm shows in the conversion check, then `--fit-steps`
(30) AdamW steps on the text, as scripts/bench_families.py does) is saved as a float checkpoint. A random
model's logits are full of near-ties that the 8-bit activations of 8da4w flip: at 336 M our exporter's int4
parity measured argmax 0.889 (random, head scaled by LOGIT_SCALE) and 0.683 (20 steps fitted with that head:
ties within 0.2 % of the largest logit); 30 steps without the scale give 1.000 (eager simulation of the
program's numerics). `--fit-steps 0` keeps the random model with the scaled head. Rows,
each exported in its own measured process (wall seconds and peak RSS from `os.wait4`, so the number is
that process's and its children's, never another row's):

- `ours 8da4w`: the user's path, `edgesmith compress --pass quantize:method=rtn,bits=4,group_size=32,
  target=xnnpack` (`--max-tokens 1024`: its quality report only; not timed) then `edgesmith export --format
  executorch --max-seq-len 1024` (its time includes the parity check the exporter runs; the manifest's
  `export_s`, the lowering alone, is shown beside it). Unlike export_llama's 8da4w, rtn quantizes the token
  embedding too (4-bit), and our program returns the logits of every position, export_llama's the last;
- `ours fp32` (`--fp32`): the float checkpoint exported the same way;
- `anchor: export_llama 8da4w`: `python -m executorch.examples.models.llama.export_llama -kv
  --use_sdpa_with_kv_cache -X -qmode 8da4w -G 32 -d fp32` on the same weights in Meta's layout
  (`consolidated.pth` + `params.json`: q/k rows permuted back from Hugging Face's rotate-half order);
- `anchor: llama.cpp Q4_0`: `edgesmith export --format gguf` of the same quantized checkpoint, run by
  `runtimes.load` (llama-cpp-python inside).

Each artifact is then timed in a fresh process (this script with `--worker`): prefill tok/s of a 128-token
prompt, decode tok/s after 128 and after 896 tokens (greedy; 1 / median per-token time over
`--decode-tokens` steps; medians over `--repeats`). Ours and llama.cpp run through `runtimes.load` (what
`edgesmith bench` runs); the anchor .pte through `executorch.runtime` directly with its
`forward(tokens (1, T), input_pos (1,) = [start])`. Both .pte files run in the same process setup: the
quantized and LLM custom-op kernels registered, the same verification, the same thread pool
(ExecuTorch's default, or `--threads`). The last table prints the ratios the issue sets targets for.

`--check-conversion` first exports the anchor without `-qmode` (fp32) and compares its logits for a
prompt and a few decode steps with our torch model's (max |diff| / max |logit|: about 1e-6 at
--small; HF's q/k row order left unpermuted gives about 3e-2; the check fails above 1e-4).

    python scripts/bench_executorch.py --small --check-conversion      # quick: proves it works (minutes)
    python scripts/bench_executorch.py --json et.json                  # ~336 M: run on an idle machine
    python scripts/bench_executorch.py --keep /tmp/et --fp32 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import runtimes  # noqa: E402
from devices.agent import peak_rss_mb, prompt_ids  # noqa: E402
from devices.bench import run_json  # noqa: E402
from models.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from models.errors import EdgesmithError  # noqa: E402
from models.llama import ModelConfig, Transformer  # noqa: E402
from models.tokenizer import train_tokenizer  # noqa: E402
from toolchain.export.parity import PARITY_TEXT  # noqa: E402
from bench_families import fit  # noqa: E402  (scripts/ is this script's sys.path[0])

LOGIT_SCALE = 25.0
SIZES = {"full": dict(dim=1024, layers=24, heads=16, kv_heads=4, ffn=2816, vocab=32000),
         "small": dict(dim=256, layers=4, heads=8, kv_heads=4, ffn=768, vocab=4096)}
ROWS = {"ours": "ours 8da4w", "ours-fp32": "ours fp32", "anchor": "anchor: export_llama 8da4w",
        "llamacpp": "anchor: llama.cpp Q4_0"}
QUANTIZE = "quantize:method=rtn,bits=4,group_size=32,target=xnnpack"
EXPORT_LLAMA = "executorch.examples.models.llama.export_llama"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


# ----------------------------------------------------------------------------- measured child processes


def measured(argv: list[str], log: Path, timeout: float, cwd: Path | None = None) -> dict:
    """Run `argv` (output to `log`); its wall seconds and peak RSS (GB). The RSS comes from GNU time's report of
    its own child: a child of this process inherits this process's high-water mark through fork and exec (Linux
    keeps the larger of the old and new maxrss at exec), so `os.wait4`'s ru_maxrss here would report this
    process's peak (the fitted model's 7.7 GB) for every row."""
    rss_file = log.with_suffix(".maxrss")
    with open(log, "w") as f:
        t0 = time.perf_counter()
        proc = subprocess.Popen(["/usr/bin/time", "-f", "%M", "-o", str(rss_file), *argv], stdout=f,
                                stderr=subprocess.STDOUT, cwd=cwd, env=ENV, start_new_session=True)
        killed = False
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if not killed and time.perf_counter() - t0 > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                killed = True
            time.sleep(0.05)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    if proc.returncode != 0:
        tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])[-600:]
        raise RuntimeError(f"{'timed out: ' if killed else ''}exit {proc.returncode}: {' '.join(argv)}\n    {tail}")
    kb = int(rss_file.read_text().split()[-1])  # GNU time's %M: kilobytes
    return {"wall_s": wall, "peak_rss_gb": kb * 1024 / 1e9, "command": " ".join(argv)}


def edgesmith(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgesmith", *args]


# ----------------------------------------------------------------------------- checkpoints


def make_float(c: dict, root: Path) -> Path:
    """The float checkpoint (scripts/bench_runtime.py's model, norms jittered)."""
    cfg = ModelConfig(vocab_size=c["vocab"], dim=c["dim"], n_layers=c["layers"], n_heads=c["heads"],
                      n_kv_heads=c["kv_heads"], ffn_dim=c["ffn"], max_seq_len=c["max_seq_len"])
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        if not c["fit_steps"]:
            model.lm_head.weight.mul_(LOGIT_SCALE)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.mul_(1 + 0.1 * torch.randn_like(p))
    text = "".join(Path(json.__file__).parent.joinpath(n).read_text() for n in ("decoder.py", "encoder.py"))
    tok = train_tokenizer([text], vocab_size=min(512, c["vocab"]), show_progress=False)
    if c["fit_steps"]:  # peaked logits, as a real model's: a random one's near-ties flip under int8 activations
        ids = torch.tensor(tok.encode(text + PARITY_TEXT * 20), dtype=torch.long)
        t0 = time.perf_counter()
        fit(model, ids, c["fit_steps"])
        print(f"fitted {c['fit_steps']} steps in {time.perf_counter() - t0:.0f} s", flush=True)
    return save_checkpoint(model, tok, root / "float", {"parent": None, "passes": []})


def meta_layout(float_dir: Path, out: Path) -> tuple[Path, Path]:
    """`consolidated.pth` + `params.json` in Meta's layout (what export_llama reads) from our float checkpoint.
    No "8da4w"/"int8" in the path: export_llama would take the weights for pre-quantized ones."""
    model = load_checkpoint(float_dir).model
    cfg, sd = model.config, model.state_dict()
    hd = cfg.head_dim

    def unpermute(w, n):  # inverse of transformers' convert_llama_weights_to_hf.py `permute`
        return w.view(n, 2, hd // 2, w.shape[1]).transpose(1, 2).reshape(w.shape)

    meta = {"tok_embeddings.weight": sd["embed_tokens.weight"], "norm.weight": sd["norm.weight"],
            "output.weight": sd["lm_head.weight"]}
    for i in range(cfg.n_layers):
        p, a, m = f"layers.{i}.", f"layers.{i}.self_attn.", f"layers.{i}.mlp."
        meta.update({p + "attention.wq.weight": unpermute(sd[a + "q_proj.weight"], cfg.n_heads),
                     p + "attention.wk.weight": unpermute(sd[a + "k_proj.weight"], cfg.n_kv_heads),
                     p + "attention.wv.weight": sd[a + "v_proj.weight"],
                     p + "attention.wo.weight": sd[a + "o_proj.weight"],
                     p + "feed_forward.w1.weight": sd[m + "gate_proj.weight"],
                     p + "feed_forward.w3.weight": sd[m + "up_proj.weight"],
                     p + "feed_forward.w2.weight": sd[m + "down_proj.weight"],
                     p + "attention_norm.weight": sd[p + "input_layernorm.weight"],
                     p + "ffn_norm.weight": sd[p + "post_attention_layernorm.weight"]})
    out.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().contiguous().clone() for k, v in meta.items()}, out / "consolidated.pth")
    params = {"dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
              "vocab_size": cfg.vocab_size, "hidden_dim": cfg.ffn_dim, "norm_eps": cfg.norm_eps,
              "rope_theta": cfg.rope_theta, "use_scaled_rope": False}
    (out / "params.json").write_text(json.dumps(params, indent=1))
    return out / "consolidated.pth", out / "params.json"


def export_llama_argv(meta: tuple[Path, Path], pte: Path, S: int, qmode: str | None) -> list[str]:
    quant = ["-qmode", qmode, "-G", "32"] if qmode else []
    return [sys.executable, "-m", EXPORT_LLAMA, "--checkpoint", str(meta[0]), "--params", str(meta[1]), "-kv",
            "--use_sdpa_with_kv_cache", "-X", *quant, "--max_seq_length", str(S), "--max_context_length", str(S),
            "-d", "fp32", "-o", str(pte.parent), "--output_name", str(pte)]


# ----------------------------------------------------------------------------- timing (in a --worker process)


def register_et_kernels() -> None:
    """The kernels both .pte files may need, registered the same way in every worker (fair setup)."""
    import executorch.kernels.quantized  # noqa: F401
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401


class PteRunner:
    """export_llama's program through `executorch.runtime`: forward(tokens (1, T), input_pos (1,) = [start])
    -> the last position's logits."""

    def __init__(self, path: str, threads: int | None):
        from executorch.runtime import Runtime, Verification

        if threads:
            from executorch.extension.pybindings import portable_lib

            portable_lib._unsafe_reset_threadpool(threads)
        program = Runtime.get().load_program(path, verification=Verification.InternalConsistency)
        self.method, self.pos = program.load_method("forward"), 0

    def _run(self, ids: list[int]):
        (logits,) = self.method.execute((torch.tensor([ids], dtype=torch.long),
                                         torch.tensor([self.pos], dtype=torch.long)))
        self.pos += len(ids)
        return logits.reshape(-1, logits.shape[-1])[-1:].float().numpy()

    def prefill(self, ids, all_logits: bool = False):
        self.pos = 0
        return self._run(list(ids))

    def decode(self, token: int):
        return self._run([token])[-1]


def open_runner(spec: dict):
    register_et_kernels()
    if spec["kind"] == "pte":
        return PteRunner(spec["path"], spec["threads"])

    return runtimes.load(spec["path"], **({"n_threads": spec["threads"]} if spec["threads"] else {}))


def time_run(r, prompt: list[int], n: int) -> tuple[float, float]:
    """(prefill seconds of `prompt`, median seconds per greedy decode step over `n` steps)."""
    t0 = time.perf_counter()
    token = int(np.argmax(r.prefill(prompt, all_logits=False)[-1]))
    prefill_s, steps = time.perf_counter() - t0, []
    for _ in range(n):
        t = time.perf_counter()
        token = int(np.argmax(r.decode(token)))
        steps.append(time.perf_counter() - t)
    return prefill_s, statistics.median(steps)


def worker(spec: dict) -> dict:

    t0 = time.perf_counter()
    r = open_runner(spec)
    load_s = time.perf_counter() - t0
    ids = prompt_ids(spec["vocab"], max(spec["contexts"]))
    time_run(r, ids[:16], 4)  # warm-up: lazy allocations, thread pool
    runs = {n: [] for n in spec["contexts"]}
    for _ in range(spec["repeats"]):
        for n in spec["contexts"]:
            runs[n].append(time_run(r, ids[:n], spec["decode_tokens"]))
    short = spec["contexts"][0]
    return {"load_s": load_s, "prefill_tok_s": short / statistics.median(p for p, _ in runs[short]),
            "decode_tok_s": {str(n): 1 / statistics.median(d for _, d in v) for n, v in runs.items()},
            "run_rss_mb": peak_rss_mb(), "run_options": getattr(r, "run_options", {"n_threads": spec["threads"]})}


def check_worker(spec: dict) -> dict:
    """Logits of export_llama's fp32 program vs our torch model's full forward: a prefill of 16 tokens, then
    8 decode steps; max |diff| / max |logit| over those positions, and whether every argmax agrees."""
    ids = prompt_ids(spec["vocab"], 24)
    with torch.no_grad():
        ref = load_checkpoint(spec["ckpt"]).model.eval()(torch.tensor([ids]))[0].numpy()
    register_et_kernels()
    r = PteRunner(spec["path"], spec["threads"])
    got = [r.prefill(ids[:16])[-1]] + [r.decode(t) for t in ids[16:]]
    got, want = np.stack(got), ref[15:]
    return {"max_rel_diff": float(np.abs(got - want).max() / np.abs(want).max()),
            "argmax_agree": bool((got.argmax(-1) == want.argmax(-1)).all()), "positions": len(got)}


def in_worker(spec: dict, timeout: int) -> dict:
    try:
        return run_json([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)], timeout,
                        f"timing of {spec['path']}", env=ENV)
    except EdgesmithError as e:
        return {"error": str(e)[:300]}


# ----------------------------------------------------------------------------- building the rows


def build(key: str, ckpts: dict, root: Path, S: int, timeout: int) -> tuple[Path, dict]:
    """(the artifact, its export measurement) for row `key`."""
    if key in ("ours", "ours-fp32", "llamacpp"):
        out = root / key
        fmt = "gguf" if key == "llamacpp" else "executorch"
        src = ckpts["float"] if key == "ours-fp32" else ckpts["q4"]
        m = measured(edgesmith("export", str(src), "--format", fmt, "--out", str(out), "--max-seq-len", str(S),
                               "--force"), root / f"{key}.log", timeout)
        manifest = json.loads((out / "manifest.json").read_text())
        m["lowering_s"], m["file"] = manifest.get("export_s"), str(out / manifest["entry"])
        return out, m
    pte = root / "anchor" / "model_q4.pte"
    m = measured(export_llama_argv(ckpts["meta"], pte, S, "8da4w"), root / "anchor.log", timeout, cwd=pte.parent)
    m["file"] = str(pte)
    return pte, m


def prepare(c: dict, root: Path, rows: list[str], timeout: int) -> dict:
    """The float checkpoint, its quantized child (our CLI, measured) and its Meta-layout copy; reused under --keep."""
    ckpts = {"float": root / "float", "q4": root / "q4"}
    if not (ckpts["float"] / "edgesmith.json").is_file():
        make_float(c, root)
    if set(rows) & {"ours", "llamacpp"} and not (ckpts["q4"] / "edgesmith.json").is_file():
        # --max-tokens: the report's quality scoring only (rtn calibrates nothing; the default 32k tokens
        # takes minutes even at --small)
        m = measured(edgesmith("compress", str(ckpts["float"]), "--out", str(ckpts["q4"]), "--pass", QUANTIZE,
                               "--max-tokens", "1024", "--force"), root / "compress.log", timeout)
        print(f"edgesmith compress --pass {QUANTIZE}: {m['wall_s']:.1f} s, peak RSS {m['peak_rss_gb']:.2f} GB",
              flush=True)
    meta_dir = root / "anchor"
    ckpts["meta"] = ((meta_dir / "consolidated.pth", meta_dir / "params.json")
                     if (meta_dir / "params.json").is_file() else meta_layout(ckpts["float"], meta_dir))
    return ckpts


def check_conversion(ckpts: dict, root: Path, c: dict, timeout: int) -> dict:
    pte = root / "anchor" / "model_fp32.pte"
    if not pte.is_file():
        m = measured(export_llama_argv(ckpts["meta"], pte, c["max_seq_len"], None), root / "anchor-fp32.log",
                     timeout, cwd=pte.parent)
        print(f"export_llama fp32 (conversion check): {m['wall_s']:.1f} s, peak RSS {m['peak_rss_gb']:.2f} GB")
    spec = {"kind": "check", "path": str(pte), "ckpt": str(ckpts["float"]), "vocab": c["vocab"],
            "threads": c["threads"]}
    r = in_worker(spec, timeout)
    ok = "error" not in r and r["max_rel_diff"] < 1e-4 and r["argmax_agree"]
    print("conversion check (export_llama fp32 .pte vs our torch model, 16-token prefill + 8 decode steps): "
          + (r["error"] if "error" in r else
             f"max |diff| / max |logit| = {r['max_rel_diff']:.2e}, argmax agree: {r['argmax_agree']}")
          + f" -> {'OK' if ok else 'FAILED'}", flush=True)
    return {**r, "ok": ok}


# ----------------------------------------------------------------------------- report


def print_report(results: dict, c: dict, fp32_bytes: int) -> None:
    short, long = (str(n) for n in c["contexts"])
    head = (f"{'row':<28} {'export s':>8} {'(lower)':>7} {'RSS GB':>6} {'file MB':>7} {'prefill tok/s':>13} "
            f"{'dec@' + short:>8} {'dec@' + long:>8} {'run RSS MB':>10}")
    print("\n" + head + "\n" + "-" * len(head))
    for key, r in results.items():
        e = r.get("export", {})
        lower = f"{e['lowering_s']:7.1f}" if e.get("lowering_s") is not None else f"{'-':>7}"
        nan = float("nan")
        cols = (f"{ROWS[key]:<28} {e.get('wall_s', nan):>8.1f} {lower} {e.get('peak_rss_gb', nan):>6.2f} "
                f"{e.get('file_mb', nan):>7.1f}")
        t = r.get("timing", {})
        if "error" in r or "error" in t:
            print(f"{cols}  failed: {r.get('error') or t.get('error')}")
            continue
        print(f"{cols} {t['prefill_tok_s']:>13.1f} {t['decode_tok_s'][short]:>8.1f} {t['decode_tok_s'][long]:>8.1f} "
              f"{t['run_rss_mb']:>10.0f}")

    def dec(key, n):
        return results.get(key, {}).get("timing", {}).get("decode_tok_s", {}).get(n)

    def exp(key, field):
        return results.get(key, {}).get("export", {}).get(field)

    def div(a, b):
        return None if a is None or b is None or not b else a / b

    rss = exp("ours", "peak_rss_gb")
    lines = [
        (f"ours / export_llama decode @{short}", div(dec("ours", short), dec("anchor", short)), ">= 1.0", 1.0),
        (f"ours / export_llama decode @{long}", div(dec("ours", long), dec("anchor", long)), ">= 1.0", 1.0),
        (f"ours / llama.cpp Q4_0 decode @{short}", div(dec("ours", short), dec("llamacpp", short)), ">= 0.8", 0.8),
        ("export time ours / export_llama (wall)", div(exp("ours", "wall_s"), exp("anchor", "wall_s")), "<= 1.2", -1.2),
        ("  ours lowering only / export_llama", div(exp("ours", "lowering_s"), exp("anchor", "wall_s")), "-", None),
        ("peak export RSS ours / fp32 checkpoint", div(rss * 1e9 if rss else None, fp32_bytes), "<= 1.5", -1.5),
        ("  export_llama's / fp32 checkpoint", div((exp("anchor", "peak_rss_gb") or 0) * 1e9 or None, fp32_bytes),
         "-", None),
        (f"ours decode @{long} / @{short}", div(dec("ours", long), dec("ours", short)), ">= 0.8", 0.8),
        (f"  export_llama's @{long} / @{short}", div(dec("anchor", long), dec("anchor", short)), "-", None)]
    print(f"\nratios (target from the issue; fp32 checkpoint model.safetensors {fp32_bytes / 1e9:.3f} GB)")
    for name, value, target, bound in lines:
        verdict = "" if value is None or bound is None else (
            "ok" if (value >= bound if bound > 0 else value <= -bound) else "MISS")
        shown = "n/a" if value is None else f"{value:.2f}"
        print(f"  {name:<42} {shown:>6}   target {target:<7} {verdict}")
    print("\nexport commands (each measured as its own process)")
    for key, r in results.items():
        if r.get("export", {}).get("command"):
            print(f"  {key}: {r['export']['command']}")


# ----------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # Model
    p.add_argument("--small", action="store_true", help="dim 256, 4 layers, 8/4 heads, ffn 768, vocab 4096")
    for name in SIZES["full"]:
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--fit-steps", type=int, default=30, help="AdamW steps on the text before saving (0: random, "
                   "the head scaled by LOGIT_SCALE)")
    # Measurement
    p.add_argument("--rows", default="ours,anchor,llamacpp", help=f"comma list of: {', '.join(ROWS)}")
    p.add_argument("--fp32", action="store_true", help="add the row ours-fp32")
    p.add_argument("--check-conversion", action="store_true",
                   help="export the anchor in fp32 too and compare its logits with our torch model's")
    p.add_argument("--threads", type=int, default=None, help="threads of every runtime (default: each one's own)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--decode-tokens", type=int, default=32, help="decode steps timed per context")
    p.add_argument("--contexts", default="128,896", help="short,long prompt lengths (prefill tok/s: the short one)")
    p.add_argument("--keep", default=None, metavar="DIR", help="build (or reuse) checkpoints and artifacts here")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per export or timing process")
    p.add_argument("--json", default=None, metavar="FILE", help="write the results here as each row ends")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(check_worker(spec) if spec["kind"] == "check" else worker(spec)), flush=True)
        return
    rows = [r.strip() for r in args.rows.split(",") if r.strip()] + (["ours-fp32"] if args.fp32 else [])
    if any(r not in ROWS for r in rows):
        sys.exit(f"--rows: unknown row {next(r for r in rows if r not in ROWS)!r}; allowed: {', '.join(ROWS)}")
    rows = [r for r in ROWS if r in rows]
    c = {k: getattr(args, k) if getattr(args, k) is not None else v
         for k, v in SIZES["small" if args.small else "full"].items()}
    contexts = [int(n) for n in args.contexts.split(",")]
    c.update(max_seq_len=args.max_seq_len, threads=args.threads, contexts=contexts, fit_steps=args.fit_steps)
    if len(contexts) != 2 or max(contexts) + args.decode_tokens + 1 > args.max_seq_len:
        sys.exit("--contexts: two lengths; the longer + --decode-tokens must fit --max-seq-len")
    print("bench_executorch:", vars(args), flush=True)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_et-"))
    if any(s in str(root.resolve()) for s in ("8da4w", "int8")):
        sys.exit(f"{root}: export_llama reads '8da4w' / 'int8' in a checkpoint path as pre-quantized; pick another")
    root.mkdir(parents=True, exist_ok=True)
    cache_file = root / "exports.json"  # export measurements of the artifacts kept under --keep
    cache = json.loads(cache_file.read_text()) if args.keep and cache_file.is_file() else {}
    try:
        t0 = time.perf_counter()
        ckpts = prepare(c, root, rows, args.timeout)
        fp32_bytes = (ckpts["float"] / "model.safetensors").stat().st_size

        n_params = load_checkpoint(ckpts["float"], with_model=True).model.num_params()
        print(f"model: {n_params / 1e6:.1f} M parameters ({c}); checkpoints ready in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        results: dict = {"_check": check_conversion(ckpts, root, c, args.timeout)} if args.check_conversion else {}
        for key in (bar := tqdm(rows, desc="rows", unit="row")):
            bar.set_postfix_str(key)
            try:
                art, m = (Path(cache[key]["artifact"]), cache[key]["export"]) if key in cache and Path(
                    cache[key]["artifact"]).exists() else build(key, ckpts, root, c["max_seq_len"], args.timeout)
            except RuntimeError as e:
                results[key] = {"error": f"export failed: {str(e)[:400]}"}
                tqdm.write(f"{key}: {results[key]['error']}")
                continue
            m["file_mb"] = Path(m["file"]).stat().st_size / 1e6
            cache[key] = {"artifact": str(art), "export": m}
            if args.keep:
                cache_file.write_text(json.dumps(cache, indent=1))
            spec = {"kind": "pte" if key == "anchor" else "session", "path": str(art), "threads": args.threads,
                    "vocab": c["vocab"], "contexts": contexts, "decode_tokens": args.decode_tokens,
                    "repeats": args.repeats}
            results[key] = {"export": m, "timing": (t := in_worker(spec, args.timeout))}
            tqdm.write(f"{key}: export {m['wall_s']:.1f} s, peak RSS {m['peak_rss_gb']:.2f} GB; " + (
                t["error"] if "error" in t else f"decode {' / '.join(f'{v:.1f}' for v in t['decode_tok_s'].values())} "
                f"tok/s, load average {os.getloadavg()[0]:.2f}"))
            if args.json:
                Path(args.json).write_text(json.dumps({"args": vars(args), "config": c, "n_params": n_params,
                                                       "fp32_checkpoint_bytes": fp32_bytes, "results": results},
                                                      indent=1))
        print_report({k: v for k, v in results.items() if k in ROWS}, c, fp32_bytes)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
