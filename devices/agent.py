"""The bench agent: times one artifact through `runtimes.load(path)` in this process and prints JSON.

    python -m devices.agent ARTIFACT [--prompt-len 128] [--gen-len 128] [--repeat 5] [--options JSON] [--json OUT|-]
    python edgesmith-agent.pyz ARTIFACT ...          # the same, shipped to a device as a zipapp

Before anything is loaded, the artifact passes `edgesmith verify`'s checks here, on the device (manifest,
confinement, sizes, sha256, format headers, tokenizer): a copy damaged or swapped after the push stops in one line.
Each repeat: reset, prefill a `--prompt-len` prompt (token ids drawn with a fixed seed, so every
run and device sees the same prompt), greedy argmax (time to first token = prefill + argmax),
then `--gen-len - 1` greedy decode steps. One warm-up run precedes the timed ones. Per repeat it
records prefill tok/s, decode tok/s, TTFT and the process's peak RSS (VmHWM). `--bandwidth` also
measures the device's memory bandwidth (for devices without a profile). `--options` is a JSON object of
`runtimes.load` keyword arguments (`{"n_threads": 2, "accuracy_level": 0}`), applied over the artifact's
manifest `runtime_options`; the result records the session's `run_options`, what the run really used.
A refused option or value (the backends raise EdgesmithError) is one `edgesmith: error:` line, exit 2,
which the caller quotes. Imports only `runtimes`,
`models` and `devices.measure`: a device has no toolchain.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import runtimes
from devices.measure import measure_bandwidth
from models.errors import EdgesmithError
from runtimes.verify import require_verified


def peak_rss_mb() -> float:
    """Peak resident set of this process (VmHWM; ru_maxrss survives exec on Linux)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 * (1024 if sys.platform == "darwin" else 1))


def prompt_ids(vocab_size: int, n: int) -> list[int]:
    import numpy as np

    return np.random.default_rng(0).integers(3, vocab_size, n).tolist()  # skip the specials 0..2


def one_run(session, prompt: list[int], gen_len: int) -> tuple[float, float, float]:
    import numpy as np

    t0 = time.perf_counter()
    logits = session.prefill(prompt, all_logits=False)[-1]
    prefill_s = time.perf_counter() - t0
    token = int(np.argmax(logits))
    ttft_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(gen_len - 1):
        token = int(np.argmax(session.decode(token)))
    decode_s = time.perf_counter() - t1
    return prefill_s, ttft_s, decode_s


def bench_artifact(path: str, prompt_len: int, gen_len: int, repeat: int, options: dict | None = None) -> dict:
    checks = require_verified(path)  # on the device, after the push, before anything is loaded
    baseline = peak_rss_mb()
    t0 = time.perf_counter()
    session = runtimes.load(path, **(options or {}))
    load_s = time.perf_counter() - t0
    if prompt_len + gen_len > session.max_seq_len:
        raise EdgesmithError(f"{path}: --prompt-len {prompt_len} + --gen-len {gen_len} exceeds the artifact's "
                             f"max_seq_len {session.max_seq_len}")
    prompt = prompt_ids(session.vocab_size, prompt_len)
    one_run(session, prompt[: min(prompt_len, 16)], min(gen_len, 4))  # warm-up: lazy allocations, caches
    runs = {"prefill_tok_s": [], "decode_tok_s": [], "ttft_ms": [], "peak_rss_mb": []}
    for _ in range(repeat):
        session.reset()
        prefill_s, ttft_s, decode_s = one_run(session, prompt, gen_len)
        runs["prefill_tok_s"].append(prompt_len / prefill_s)
        runs["decode_tok_s"].append((gen_len - 1) / decode_s if gen_len > 1 and decode_s > 0 else 0.0)
        runs["ttft_ms"].append(ttft_s * 1e3)
        runs["peak_rss_mb"].append(peak_rss_mb())
    return {"runs": runs, "backend": session.backend, "threads": getattr(session, "n_threads", None),
            "run_options": dict(session.run_options), "verified_checks": checks,
            "load_s": load_s, "baseline_rss_mb": baseline, "host": platform.node(), "machine": platform.machine(),
            "python": sys.version.split()[0]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="edgesmith-agent", description="Time one artifact on this device.")
    p.add_argument("artifact")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=128)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--bandwidth", action="store_true", help="also measure memory bandwidth")
    p.add_argument("--options", default="{}", metavar="JSON", help="runtimes.load options as a JSON object "
                   "(default: the artifact's manifest runtime_options)")
    p.add_argument("--json", default="-", help="output file, or - for stdout (the default)")
    args = p.parse_args(argv)
    for name in ("prompt_len", "gen_len", "repeat"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    try:
        options = json.loads(args.options)
    except json.JSONDecodeError as e:
        p.error(f"--options: not JSON ({e})")
    if not isinstance(options, dict):
        p.error(f"--options: {args.options!r} is not a JSON object")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # no spin-waiting threads on a shared device
    try:
        result = bench_artifact(args.artifact, args.prompt_len, args.gen_len, args.repeat, options)
    except EdgesmithError as e:  # bad input: one line (the caller quotes it), no traceback
        if os.environ.get("EDGESMITH_DEBUG", "").lower() in ("1", "true", "yes", "on"):
            raise
        print(f"edgesmith: error: {e}", file=sys.stderr, flush=True)
        return 2
    if args.bandwidth:
        result["bandwidth_bytes_s"] = measure_bandwidth(os.cpu_count())
    text = json.dumps(result)
    if args.json == "-":
        print(text, flush=True)
    else:
        tmp = Path(args.json).with_name(Path(args.json).name + ".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
