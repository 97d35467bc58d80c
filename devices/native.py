"""Native runners on a device: llama.cpp's `llama-bench` command line and its output.

`llama_bench_argv` builds the command (`-p` prompt tokens, `-n` generated tokens, `-r`
repetitions, `-o json`); `parse_llama_bench` reads its JSON output (an array with one object per
test: `n_prompt`, `n_gen`, `avg_ts`, `samples_ts`, ... as documented in llama.cpp's
tools/llama-bench/README.md) and, as a fallback, its default markdown table (`| test | t/s |` with
`pp128` / `tg128` rows and `mean ± stddev`). A prompt-processing test gives prefill tok/s (and,
from it, the time to first token: llama-bench times no sampling); a text-generation test gives
decode tok/s. llama-bench does not report memory: peak RSS stays unknown (None).
"""

from __future__ import annotations

import json
import re

from models.errors import EdgesmithError


def llama_bench_argv(runner: str, model: str, prompt_len: int, gen_len: int, repeat: int,
                     threads: int | None = None) -> list[str]:
    argv = [runner, "-m", model, "-p", str(prompt_len), "-n", str(gen_len), "-r", str(repeat), "-o", "json"]
    if threads:
        argv += ["-t", str(threads)]
    return argv


def parse_llama_bench(text: str, prompt_len: int, gen_len: int) -> dict:
    """{"prefill_tok_s": [...], "decode_tok_s": [...], "ttft_ms": [...], "peak_rss_mb": []} per repetition
    (markdown output gives only the mean, reported once)."""
    start = text.find("[")
    rows = None
    if start >= 0:
        try:
            rows = json.loads(text[start:text.rfind("]") + 1])
        except json.JSONDecodeError:
            rows = None
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
