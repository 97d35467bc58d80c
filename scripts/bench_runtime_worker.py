"""One row of scripts/bench_runtime.py, in its own process: times one runtime on one artifact, prints JSON.

    python scripts/bench_runtime_worker.py '{"kind": "session", "path": ..., "options": {...}, ...}'

The timing is the bench agent's (`devices.agent`): its prompt (`prompt_ids`), its timed prefill +
greedy decode (`one_run`), its peak RSS (`peak_rss_mb`). Per repeat: prefill of `prompt_len` tokens
(and TTFT), then the decode rate over `decode_tokens` tokens after a 128-token prompt and after a
`long_context` prompt. Besides our sessions (`runtimes.load` with the row's options), the anchors
run here too: llama.cpp's own `Llama` and optimum's `ORTModelForCausalLM`, each behind the two calls
`one_run` makes. It imports no toolchain, so a row's RSS is the runtime's, not the exporter's.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import runtimes  # noqa: E402
from devices.agent import one_run, peak_rss_mb, prompt_ids  # noqa: E402
from runtimes import GenerationConfig  # noqa: E402
from runtimes.speculative import compare_speculative  # noqa: E402


def open_session(path: str, options: dict, threads: int) -> runtimes.Session:
    if (Path(path) / "edgesmith.json").is_file():  # a checkpoint: the torch backend
        torch.set_num_threads(threads)
        return runtimes.load(path, **options)
    return runtimes.load(path, n_threads=threads, **options)


class LlamaRunner:
    """llama.cpp as its own CLI runs it: flash attention on, one thread per core."""

    def __init__(self, path: str, options: dict, threads: int):
        import llama_cpp  # optional anchor: only its rows need llama-cpp-python

        manifest = json.loads((Path(path) / "manifest.json").read_text())
        self.lc = llama_cpp
        self.llm = llama_cpp.Llama(str(Path(path) / manifest["entry"]), n_ctx=int(manifest["options"]["max_seq_len"]),
                                   n_batch=2048, n_ubatch=512, n_threads=threads, n_threads_batch=threads,
                                   flash_attn=True, logits_all=False, verbose=False)
        self.V = self.llm.n_vocab()

    def _logits(self):
        return np.ctypeslib.as_array(self.lc.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.V,))

    def prefill(self, ids, all_logits: bool = False):
        self.llm.reset()
        self.llm.eval(ids)
        return self._logits()[None]

    def decode(self, token):
        self.llm.eval([token])
        return self._logits()


class OptimumRunner:
    """optimum's ORTModelForCausalLM, called the way `generate` calls it (past_key_values handed back)."""

    def __init__(self, path: str, options: dict, threads: int):
        import onnxruntime as ort  # optional anchor: only its rows need optimum
        from optimum.onnxruntime import ORTModelForCausalLM

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        self.model = ORTModelForCausalLM.from_pretrained(path, use_cache=True, session_options=so)

    @torch.inference_mode()
    def prefill(self, ids, all_logits: bool = False):
        out = self.model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         use_cache=True)
        self.past, self.n = out.past_key_values, len(ids)
        return out.logits[0, -1:].numpy()

    @torch.inference_mode()
    def decode(self, token):
        self.n += 1
        out = self.model(input_ids=torch.tensor([[token]]), attention_mask=torch.ones(1, self.n, dtype=torch.long),
                         past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        return out.logits[0, -1].numpy()


RUNNERS = {"session": open_session, "llama": LlamaRunner, "optimum": OptimumRunner}


def decode_rate(r, prompt: list[int], n: int) -> float:
    """Tokens/s of `n` greedy decode steps after `prompt` (the agent's run, prefill excluded)."""
    return n / one_run(r, prompt, n + 1)[2]


def worker(spec: dict) -> dict:
    baseline = peak_rss_mb()  # after the imports every row pays (runtimes, torch, numpy)
    t0 = time.perf_counter()
    r = RUNNERS[spec["kind"]](spec["path"], spec["options"], spec["threads"])
    load_s = time.perf_counter() - t0
    ids = prompt_ids(spec["vocab"], spec["long_context"])
    p, n = spec["prompt_len"], spec["decode_tokens"]
    one_run(r, ids[:16], 4)  # warm up (compilation, lazy allocations), as the agent does
    prefill_s, ttft_s, short, long = [], [], [], []
    for _ in range(spec["repeats"]):
        prefill, ttft, _ = one_run(r, ids[:p], 1)
        prefill_s.append(prefill)
        ttft_s.append(ttft)
        short.append(decode_rate(r, ids[:128], n))
        long.append(decode_rate(r, ids[: spec["long_context"]], n))
    run_options = getattr(r, "run_options", {})  # what a session ran with (anchors: their own runner)
    profile = []
    if spec.get("profile") and hasattr(r, "model"):
        profile = profile_decode(r, ids, spec["profile"])
    elif spec.get("profile") and getattr(r, "backend", None) == "onnxruntime":
        del r  # one session at a time: the profiled one is opened afresh
        profile = profile_ort(spec, ids[:128], spec["profile"]) + profile_ort(spec, ids, spec["profile"])
    return {"load_s": load_s, "prefill_tok_s": p / statistics.median(prefill_s),
            "ttft_ms": statistics.median(ttft_s) * 1e3,
            "decode_tok_s": statistics.median(short), "decode_long_tok_s": statistics.median(long),
            "peak_rss_mb": peak_rss_mb(), "baseline_rss_mb": baseline,
            "run_options": run_options,
            "profile": profile}


def profile_decode(session, ids: list[int], steps: int) -> list[str]:
    """torch.profiler over `steps` decode steps after the whole prompt `ids` (a torch session): the top ops
    by self CPU time, as lines `name  ms per token  calls per token`, then the total per token."""
    from torch.profiler import profile

    session.reset()
    token = int(np.argmax(session.prefill(ids, all_logits=False)[-1]))
    with profile() as prof:
        for _ in range(steps):
            token = int(np.argmax(session.decode(token)))
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) / steps / 1e3
    lines = [f"{e.key:<42} {e.self_cpu_time_total / steps / 1e3:7.2f} ms/token {e.count / steps:6.0f} calls/token"
             for e in events[:12]]
    return lines + [f"{'profiled total (self CPU, all ops)':<42} {total:7.2f} ms/token at {len(ids)} tokens"]


def profile_ort(spec: dict, ids: list[int], steps: int) -> list[str]:
    """ONNX Runtime's own profiler over `steps` decode steps after the prompt `ids` (a session opened with the
    row's options and profiling on): self time per operator type, per token, with its share of the runs."""
    import onnxruntime as ort

    class Profiled(ort.SessionOptions):
        def __init__(self):
            super().__init__()
            self.enable_profiling = True
            self.profile_file_prefix = str(Path(spec["path"]).parent / "ort-profile")

    real, ort.SessionOptions = ort.SessionOptions, Profiled
    try:
        s = open_session(spec["path"], spec["options"], spec["threads"])
    finally:
        ort.SessionOptions = real
    token = int(np.argmax(s.prefill(ids, all_logits=False)[-1]))
    for _ in range(steps):
        token = int(np.argmax(s.decode(token)))
    trace = Path(s.session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])[-steps:]
    run_us = sum(e["dur"] for e in runs)
    by_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and any(
                r["ts"] <= e["ts"] <= r["ts"] + r["dur"] for r in runs):
            op = e.get("args", {}).get("op_name", "?")
            by_op[op] = by_op.get(op, 0.0) + e["dur"]
    lines = [f"{op + ' (ORT)':<42} {us / steps / 1e3:7.2f} ms/token {us / run_us:6.0%} of the runs"
             for op, us in sorted(by_op.items(), key=lambda kv: -kv[1])[:8]]
    return lines + [f"{'model_run total':<42} {run_us / steps / 1e3:7.2f} ms/token at {len(ids)} tokens"]


def speculative_worker(spec: dict) -> dict:
    target = runtimes.load(spec["path"], n_threads=spec["threads"])
    draft = runtimes.load(spec["draft"], n_threads=spec["threads"])  # its manifest's default: accuracy_level 4
    prompt = prompt_ids(spec["vocab"], 128)
    list(target.generate(prompt[:16], GenerationConfig(max_new_tokens=4)))
    r = compare_speculative(target, draft, prompt, GenerationConfig(max_new_tokens=spec["decode_tokens"]), 4)
    s = r["speculative_stats"]
    return {"identical": r["identical"], "acceptance": s.acceptance_rate, "tokens_per_target_forward":
            s.tokens_per_target_forward, "speedup": r["speedup"], "plain_tok_s": r["plain_stats"].decode_tokens_per_s,
            "speculative_tok_s": s.decode_tokens_per_s}


if __name__ == "__main__":
    row = json.loads(sys.argv[1])
    print(json.dumps(speculative_worker(row) if row["kind"] == "speculative" else worker(row)), flush=True)
