"""Native runners on a device: llama.cpp's `llama-bench` and ExecuTorch's Llama runner (`llama_main`), their
command lines and their output.

`llama_bench_argv` builds the command (`-p` prompt tokens, `-n` generated tokens, `-r`
repetitions, `-o json`); `parse_llama_bench` reads its JSON output (an array with one object per
test: `n_prompt`, `n_gen`, `avg_ts`, `samples_ts`, ... as documented in llama.cpp's
tools/llama-bench/README.md) and, as a fallback, its default markdown table (`| test | t/s |` with
`pp128` / `tg128` rows and `mean ± stddev`). A prompt-processing test gives prefill tok/s (and,
from it, the time to first token: llama-bench times no sampling); a text-generation test gives
decode tok/s. llama-bench does not report memory: peak RSS stays unknown (None).

Runtime options map onto llama-bench's flags where it has one: `n_threads` `-t N`, `flash_attn` `-fa 0|1`,
`kv_cache` `-ctk T -ctv T`; any other option is refused in one line (llama-bench has no such knob).
What a run used is read back from llama-bench's own JSON (`n_threads`, `flash_attn`, `type_k`), not assumed.

ExecuTorch's runner (examples/models/llama/main.cpp, built for Android as the README says) takes a text prompt,
`--seq_len` (prompt + generated tokens), `--temperature 0` (greedy), `--num_bos 1`, `--warmup` (one discarded
run in the same process) and `--cpu_threads N` (`n_threads`, its only option here), and prints one
`PyTorchObserver {...}` line of its own statistics (extension/llm/runner/stats.h): prefill tok/s =
prompt_tokens / (prompt_eval_end_ms - inference_start_ms), decode tok/s = generated_tokens /
(inference_end_ms - prompt_eval_end_ms), TTFT = first_token_ms - inference_start_ms. One process per
repetition; no memory figure (peak RSS stays None).
"""

from __future__ import annotations

import json
import re

from models.errors import EdgesmithError
from runtimes.backends.llamacpp import KV_TYPES  # the same KV cache types as the llamacpp backend (no llama_cpp import)


LLAMA_BENCH_OPTIONS = ("n_threads", "flash_attn", "kv_cache")


def check_llama_bench_options(options: dict, what: str) -> None:
    """One line naming the option when llama-bench has no such flag or the value is not one it takes."""
    for key, value in options.items():
        if key not in LLAMA_BENCH_OPTIONS:
            raise EdgesmithError(f"{what}: llama-bench has no option {key!r}; allowed: {', '.join(LLAMA_BENCH_OPTIONS)}")
        if key == "n_threads" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise EdgesmithError(f"{what}: n_threads {value!r} must be a positive integer")
        if key == "flash_attn" and not isinstance(value, bool):
            raise EdgesmithError(f"{what}: flash_attn {value!r}; allowed: true, false")
        if key == "kv_cache" and value not in KV_TYPES:
            raise EdgesmithError(f"{what}: kv_cache {value!r}; allowed: {', '.join(KV_TYPES)}")


def llama_bench_options(manifest: dict, options: dict, what: str) -> dict:
    """The options a llama-bench run of this artifact gets: its manifest's `runtime_options` (the configuration
    its export verified) that llama-bench has, the caller's `options` over them; checked."""
    recorded = manifest.get("runtime_options") or {}
    merged = {**{k: v for k, v in recorded.items() if k in LLAMA_BENCH_OPTIONS}, **options}
    check_llama_bench_options(merged, what)
    return merged


def llama_bench_argv(runner: str, model: str, prompt_len: int, gen_len: int, repeat: int,
                     options: dict | None = None) -> list[str]:
    """The llama-bench command line; `options` (checked by check_llama_bench_options) become its flags."""
    options = options or {}
    argv = [runner, "-m", model, "-p", str(prompt_len), "-n", str(gen_len), "-r", str(repeat), "-o", "json"]
    if options.get("n_threads"):
        argv += ["-t", str(options["n_threads"])]
    if options.get("flash_attn") is not None:
        argv += ["-fa", "1" if options["flash_attn"] else "0"]
    if options.get("kv_cache"):
        argv += ["-ctk", options["kv_cache"], "-ctv", options["kv_cache"]]
    return argv


def llama_bench_run_options(text: str) -> dict | None:
    """What llama-bench reports it ran with (its JSON rows' n_threads, flash_attn, type_k), as runtime
    options; None when its output is not JSON (the markdown table)."""
    rows = _json_rows(text)
    if not rows:
        return None
    row = rows[0]
    found = {}
    if row.get("n_threads") is not None:
        found["n_threads"] = int(row["n_threads"])
    fa = row.get("flash_attn")
    if fa is not None:  # a bool in llama-bench's JSON (older builds: 0/1; newer: "on"/"off"/"auto" possible)
        found["flash_attn"] = bool(fa) if isinstance(fa, (bool, int)) else {"on": True, "off": False}.get(fa, fa)
    if row.get("type_k"):
        found["kv_cache"] = row["type_k"]
    return found


def _json_rows(text: str) -> list | None:
    start = text.find("[")
    if start < 0:
        return None
    try:
        rows = json.loads(text[start:text.rfind("]") + 1])
    except json.JSONDecodeError:
        return None
    return rows if isinstance(rows, list) else None


def parse_llama_bench(text: str, prompt_len: int, gen_len: int) -> dict:
    """{"prefill_tok_s": [...], "decode_tok_s": [...], "ttft_ms": [...], "peak_rss_mb": []} per repetition
    (markdown output gives only the mean, reported once)."""
    rows = _json_rows(text)
    if rows is not None:
        pp = next((r for r in rows if r.get("n_prompt") == prompt_len and not r.get("n_gen")), None)
        tg = next((r for r in rows if r.get("n_gen") == gen_len and not r.get("n_prompt")), None)
        prefill = (pp or {}).get("samples_ts") or ([pp["avg_ts"]] if pp else None)
        decode = (tg or {}).get("samples_ts") or ([tg["avg_ts"]] if tg else None)
    else:
        prefill, decode = _markdown(text, f"pp{prompt_len}"), _markdown(text, f"tg{gen_len}")
    if not prefill or not decode:
        tail = " | ".join(text.strip().splitlines()[-3:])[:300] or "(no output)"
        raise EdgesmithError(f"llama-bench output has no pp{prompt_len} and tg{gen_len} results: {tail}")
    prefill = [float(x) for x in prefill]
    return {"prefill_tok_s": prefill, "decode_tok_s": [float(x) for x in decode],
            "ttft_ms": [prompt_len / x * 1e3 for x in prefill], "peak_rss_mb": []}


def _markdown(text: str, test: str) -> list[float] | None:
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[-2].replace(" ", "") == test:
            m = re.match(r"([\d.]+)", cells[-1])
            if m:
                return [float(m.group(1))]
    return None


# ----------------------------------------------------------------------------- ExecuTorch's llama_main

LLAMA_MAIN_OPTIONS = ("n_threads",)


def llama_main_argv(runner: str, model: str, tokenizer: str, prompt: str, seq_len: int,
                    options: dict | None = None) -> list[str]:
    """The llama_main command line (greedy, one BOS, a warmup run first); `options`: n_threads only."""
    options = options or {}
    for key, value in options.items():
        if key not in LLAMA_MAIN_OPTIONS:
            raise EdgesmithError(f"ExecuTorch's llama_main has no option {key!r}; allowed: {', '.join(LLAMA_MAIN_OPTIONS)}")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise EdgesmithError(f"n_threads {value!r} must be a positive integer")
    argv = [runner, "--model_path", model, "--tokenizer_path", tokenizer, "--prompt", prompt,
            "--seq_len", str(seq_len), "--temperature", "0", "--num_bos", "1", "--warmup"]
    if options.get("n_threads"):
        argv += ["--cpu_threads", str(options["n_threads"])]
    return argv


def parse_llama_main(texts: list[str]) -> dict:
    """The runs of llama_main outputs (one per repetition) from their `PyTorchObserver {...}` lines."""
    runs = {"prefill_tok_s": [], "decode_tok_s": [], "ttft_ms": [], "peak_rss_mb": []}
    for text in texts:
        line = next((ln for ln in reversed(text.splitlines()) if ln.startswith("PyTorchObserver ")), None)
        try:
            st = json.loads(line[len("PyTorchObserver "):]) if line else None
            prefill_ms = st["prompt_eval_end_ms"] - st["inference_start_ms"]
            decode_ms = st["inference_end_ms"] - st["prompt_eval_end_ms"]
            ttft_ms = st["first_token_ms"] - st["inference_start_ms"]
            prompt, generated = int(st["prompt_tokens"]), int(st["generated_tokens"])
        except (TypeError, ValueError, KeyError, json.JSONDecodeError):
            tail = " | ".join(text.strip().splitlines()[-3:])[:300] or "(no output)"
            raise EdgesmithError(f"llama_main output has no PyTorchObserver statistics: {tail}") from None
        if prefill_ms <= 0 or decode_ms <= 0 or generated < 1:
            raise EdgesmithError(f"llama_main statistics cannot be timed (prefill {prefill_ms} ms, decode "
                                 f"{decode_ms} ms, {generated} tokens generated)")
        runs["prefill_tok_s"].append(prompt / prefill_ms * 1e3)
        runs["decode_tok_s"].append(generated / decode_ms * 1e3)
        runs["ttft_ms"].append(float(ttft_ms))
    return runs
