"""`edgesmith bench`: time artifacts on a device and set each against its decode roofline.

- `local` (or a profile whose transport is local): each artifact in a fresh process running the
  bench agent (`python -m devices.agent`), so its peak RSS and warm-up are its own;
- `ssh://...` (or a profile with one): the agent zipapp (`devices.pack`) and the artifact are
  pushed to a scratch directory, run with the device's Python, the JSON result pulled back;
- `adb://...`: the artifact is pushed to /data/local/tmp, the profile's native runner runs it (llama.cpp's
  `llama-bench` a GGUF, ExecuTorch's Llama runner `llama_main` a .pte, once per repetition with a prompt of
  `prompt_len` tokens of the artifact's own tokenizer), its output is pulled back and parsed (`devices.native`).

Integrity: before anything is pushed, the artifact passes `edgesmith verify`'s checks (runtimes.verify:
manifest, confinement, sizes, sha256, format headers, tokenizer); after the push, `sha256sum` on the
device checks the copies again, and over ssh the agent runs the same verify there before it loads
anything, so a transfer that corrupted a byte stops the bench with one line instead of timing (or
crashing on) a broken file. An adb device has no Python: there the device-side check is the sha256 of
every pushed file against the manifest verified here. Locally the agent verifies before it loads.

Runtime options (`options`: `runtimes.load` keyword arguments, e.g. {"n_threads": 2, "accuracy_level": 0})
go to each artifact whose runner takes them: the agent passes them to `runtimes.load` over the artifact's
manifest `runtime_options` (the configuration its export verified); llama-bench gets the flags it has
(`devices.native`), the manifest's options under the caller's. An option that no artifact of the run takes
is refused in one line before anything runs; a bad value is refused by the backend, one line through the
agent. Each result records `options` (what was asked) and `run_options` (what the run really used, as the
session or llama-bench reported it); `format_table` shows the latter per row.

Each result holds the median, min and max over `repeat` runs of prefill tok/s, decode tok/s, TTFT
and peak RSS, the decode bound (bandwidth / bytes read per token, `devices.roofline`, with the KV cache
type the run used) and the achieved fraction of it. Any failure (unreachable device, timeout, runner error) raises
`EdgesmithError`; results are returned only whole, and `write_results` writes atomically.
"""

from __future__ import annotations

import io
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from devices import roofline
from devices.native import (LLAMA_BENCH_OPTIONS, LLAMA_MAIN_OPTIONS, llama_bench_argv, llama_bench_options,
                            llama_bench_run_options, llama_main_argv, parse_llama_bench, parse_llama_main)
from devices.pack import build_agent
from devices.profiles import DeviceProfile, list_profiles, load_profile
from devices.transports import AdbTransport, LocalTransport, SshTransport, Transport, run_streaming, transport_for
from models.atomic import write_bytes_atomic, write_text_atomic
from models.checkpoint import sha256_file
from models.errors import EdgesmithError
from models.tokenizer import Tokenizer
from runtimes.artifact import artifact_bytes, read_manifest
from runtimes.verify import require_verified
from runtimes.loader import backend_class, backends_for, option_names
from runtimes.options import FLAGS, describe

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("prefill_tok_s", "decode_tok_s", "ttft_ms", "peak_rss_mb")


def resolve_device(device: str) -> tuple[DeviceProfile | None, str]:
    """(profile or None, transport URI) for `local`, a profile name or path, or a URI."""
    if device.startswith(("ssh://", "adb://")):
        return None, device
    if device == "local" or device in list_profiles() or device.endswith(".toml"):
        profile = load_profile(device)
        return profile, profile.transport
    raise EdgesmithError(f"--device {device!r}; allowed: local, a profile ({', '.join(list_profiles())}), "
                         "ssh://user@host[:port] or adb://SERIAL")


def stats(values: Sequence[float]) -> dict | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def bench(artifacts: Sequence[str | Path], device: str = "local", *, prompt_len: int = 128, gen_len: int = 128,
          repeat: int = 5, timeout_s: float = 600.0, progress: Callable[[int, int, str], None] | None = None,
          ssh_options: Sequence[str] = (), python: str | None = None,
          on_line: Callable[[str], None] | None = None, options: dict | None = None) -> list[dict]:
    """One result dict per artifact (see the module docstring). `ssh_options`: extra ssh
    arguments; `python`: the device's Python (default: the profile's, else python3; locally this
    interpreter); `on_line`: receives the runner's output lines as they come; `options`: runtime
    options (`runtimes.load` keyword arguments) for the artifacts whose runner takes them."""
    for name, value in (("prompt_len", prompt_len), ("gen_len", gen_len), ("repeat", repeat)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise EdgesmithError(f"--{name.replace('_', '-')} {value!r} must be a positive integer")
    if not artifacts:
        raise EdgesmithError("bench: no artifacts given")
    profile, uri = resolve_device(device)
    transport = transport_for(uri, ssh_options)
    manifests = []
    for a in artifacts:  # local: the agent verifies before it loads; remote: verified here too, before the push
        if not isinstance(transport, LocalTransport):
            require_verified(a)
        m = read_manifest(a, verify=False)
        room = int(m["model"].get("max_seq_len", 0)) or int(m.get("options", {}).get("max_seq_len", 0))
        if prompt_len + gen_len > room:
            raise EdgesmithError(f"{a}: --prompt-len {prompt_len} + --gen-len {gen_len} exceeds the artifact's "
                                 f"max_seq_len {room}")
        manifests.append(m)
    runner = _runner(transport)
    row_options = per_artifact_options(artifacts, manifests, dict(options or {}), runner is AdbRunner)
    label = profile.name if profile else uri
    results = []
    with tempfile.TemporaryDirectory(prefix="edgesmith-bench-") as tmp:
        with runner(transport, profile, Path(tmp), python, timeout_s, on_line) as run:
            for i, (a, m, opts) in enumerate(zip(artifacts, manifests, row_options)):
                if progress:
                    progress(i, len(artifacts), Path(a).name)
                raw = run(Path(a), m, prompt_len, gen_len, repeat, opts)
                results.append(_result(Path(a), m, raw, label, profile, prompt_len, gen_len, repeat, opts))
    if progress:
        progress(len(artifacts), len(artifacts), "done")
    return results


def check_options(artifacts: Sequence[str | Path], device: str, options: dict) -> list[dict]:
    """What `bench(artifacts, device, options=options)` gives each artifact, or its one-line refusal, from the
    manifests alone (nothing runs): for a form to refuse before it starts a job."""
    _, uri = resolve_device(device)
    manifests = [read_manifest(a, verify=False) for a in artifacts]
    return per_artifact_options(artifacts, manifests, dict(options), uri.startswith("adb://"))


def per_artifact_options(artifacts: Sequence, manifests: list[dict], options: dict, native: bool) -> list[dict]:
    """The options each artifact's runner takes (its backend's `runtimes.load` options; llama-bench's flags
    for a native run). One that no artifact takes is refused in one line naming the flag, before any run."""
    rows, taken = [], set()
    takes_by = []
    for a, m in zip(artifacts, manifests):
        fmt = m.get("format")
        if native and fmt == "executorch":
            takes, who = LLAMA_MAIN_OPTIONS, f"{fmt} (llama_main)"
        elif native:
            takes, who = LLAMA_BENCH_OPTIONS, f"{fmt} (llama-bench)"
        else:
            names = backends_for(fmt) if isinstance(fmt, str) else []
            if not names:
                raise EdgesmithError(f"{Path(a) / 'manifest.json'}: format {fmt!r} has no runtime backend")
            takes, who = option_names(backend_class(names[0]).__init__), f"{fmt} ({names[0]})"
        takes_by.append(who + " takes " + (", ".join(FLAGS.get(o, o) for o in takes if o in FLAGS) or "none"))
        mine = {k: v for k, v in options.items() if k in takes}
        if native and fmt != "executorch":  # checked here, before any push (the agent's backends check theirs there)
            llama_bench_options(m, mine, str(a))
        taken |= set(mine)
        rows.append(mine)
    for key in options:
        if key not in taken:
            raise EdgesmithError(f"{FLAGS.get(key, key)}: no artifact of this bench takes it "
                                 f"({'; '.join(dict.fromkeys(takes_by))})")
    return rows


def _result(path: Path, m: dict, raw: dict, device: str, profile: DeviceProfile | None, prompt_len: int,
            gen_len: int, repeat: int, options: dict) -> dict:
    bandwidth = profile.bandwidth_bytes_s if profile else raw.get("bandwidth_bytes_s")
    r = {"artifact": str(path), "name": path.name, "format": m.get("format"), "precision": _precision(m),
         "device": device, "bytes": artifact_bytes(m), "prompt_len": prompt_len, "gen_len": gen_len,
         "repeat": repeat, **{k: stats(raw["runs"].get(k, [])) for k in METRICS}, "runner": raw.get("runner"),
         "backend": raw.get("backend"), "threads": raw.get("threads"), "options": options,
         "run_options": raw.get("run_options"), "verified_on_device": raw.get("verified_checks"),
         "bandwidth_bytes_s": bandwidth,
         "bytes_per_token": None, "decode_bound_tok_s": None, "roofline_fraction": None}
    if bandwidth:
        bound, read = roofline.decode_bound(m, bandwidth, prompt_len, gen_len, raw.get("runner", "agent"),
                                            (raw.get("run_options") or {}).get("kv_cache"))
        r.update(bytes_per_token=read, decode_bound_tok_s=bound,
                 roofline_fraction=r["decode_tok_s"]["median"] / bound)
    return r


def _precision(m: dict) -> str:
    bits = {int(q["bits"]) for q in ((m.get("quantization") or {}).get("weights") or {}).values()}
    if not bits:
        return m.get("precision") or "fp32"
    return f"int{bits.pop()}" if len(bits) == 1 else "mixed"


# ----------------------------------------------------------------------------- runners


def _runner(transport: Transport):
    if isinstance(transport, LocalTransport):
        return LocalRunner
    if isinstance(transport, SshTransport):
        return SshRunner
    if isinstance(transport, AdbTransport):
        return AdbRunner
    raise EdgesmithError(f"no bench runner for {transport.uri}")


def verify_pushed(transport: Transport, local: Path, remote: str, expected: dict[str, str],
                  timeout_s: float) -> None:
    """Every pushed file, hashed on the device, against `expected` ({file name: sha256}) taken from
    the local side (the manifest, or the file itself). One line naming the file when one differs."""
    names = sorted(expected)
    remote_paths = [remote if local.is_file() else f"{remote}/{n}" for n in names]
    found = transport.sha256(remote_paths, timeout=min(timeout_s, 600))
    for name, rp in zip(names, remote_paths):
        got = found.get(rp)
        if got != expected[name]:
            seen = f"sha256 {got[:12]}..." if got else "unreadable"
            local_file = local if local.is_file() else local / name
            raise EdgesmithError(f"{transport.uri}: {rp} is not the file pushed from {local_file} ({seen} on the "
                                 f"device, {expected[name][:12]}... expected): the transfer corrupted it; nothing "
                                 "was run on it")


def _manifest_hashes(m: dict) -> dict[str, str]:
    return {name: rec["sha256"] for name, rec in m["files"].items()}


def _agent_args(prompt_len: int, gen_len: int, repeat: int, options: dict) -> list[str]:
    return ["--prompt-len", str(prompt_len), "--gen-len", str(gen_len), "--repeat", str(repeat),
            "--options", json.dumps(options, sort_keys=True)]


def refusal(output: str) -> str | None:
    """The worker's one-line refusal (`edgesmith: error: ...`, printed last), without its prefix; None if none."""
    ours = [line for line in output.splitlines() if line.startswith("edgesmith: error: ")]
    return ours[-1][len("edgesmith: error: "):] if ours else None


def last_json(text: str, what: str) -> dict:
    """The JSON object on the last line of a worker's output that starts with `{`."""
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                break
    tail = " | ".join(text.strip().splitlines()[-3:])[:400] or "(no output)"
    raise EdgesmithError(f"{what}: the bench agent gave no result: {tail}")


def run_json(argv: Sequence[str], timeout_s: float, what: str, on_line: Callable[[str], None] | None = None,
             env: dict | None = None) -> dict:
    """Run a bench worker (`argv`) in a fresh local process, killed after `timeout_s`; the JSON result it
    prints last. A worker that refused its input in one `edgesmith: error: ...` line fails with that line."""
    r = run_streaming(argv, timeout_s, on_line, what=what, env=env)
    if r.returncode != 0:
        line = refusal(r.output)
        if line:  # the worker refused its input in one line: that line is the error
            raise EdgesmithError(line)
        tail = " | ".join(r.output.strip().splitlines()[-2:])[:400]
        raise EdgesmithError(f"{what} failed (exit {r.returncode}): {tail}")
    return last_json(r.output, what)


class LocalRunner:
    """Each artifact in a fresh `python -m devices.agent` process."""

    def __init__(self, transport, profile, tmp, python, timeout_s, on_line):
        self.python, self.timeout_s, self.on_line = python or sys.executable, timeout_s, on_line
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}

    def __enter__(self):
        return self.run

    def __exit__(self, *exc):
        return False

    def run(self, path: Path, m: dict, prompt_len: int, gen_len: int, repeat: int, options: dict) -> dict:
        argv = [self.python, "-m", "devices.agent", str(path), *_agent_args(prompt_len, gen_len, repeat, options),
                "--json", "-"]
        result = run_json(argv, self.timeout_s, f"bench of {path} on local", self.on_line, self.env)
        return {**result, "runner": "agent"}


class SshRunner:
    """Agent zipapp and artifacts pushed to a scratch directory; results pulled back."""

    AGENT = "edgesmith-agent.pyz"

    def __init__(self, transport: SshTransport, profile, tmp: Path, python, timeout_s, on_line):
        self.t, self.tmp, self.timeout_s, self.on_line = transport, tmp, timeout_s, on_line
        self.python = python or (profile.python if profile else "python3")
        self.measure_bandwidth = profile is None
        self.workdir = None

    def __enter__(self):
        agent = build_agent(self.tmp / self.AGENT)
        self.workdir = self.t.mkdtemp(timeout=min(self.timeout_s, 60))
        self.agent = self.t.push(agent, self.workdir, timeout=self.timeout_s)
        verify_pushed(self.t, agent, self.agent, {agent.name: sha256_file(agent)}, self.timeout_s)
        return self.run

    def __exit__(self, *exc):
        if self.workdir:
            try:
                self.t.remove(self.workdir, timeout=min(self.timeout_s, 30))
            except EdgesmithError:
                pass  # best effort: the scratch directory is under /tmp on the device
        return False

    def run(self, path: Path, m: dict, prompt_len: int, gen_len: int, repeat: int, options: dict) -> dict:
        remote = self.t.push(path, self.workdir, timeout=self.timeout_s)
        verify_pushed(self.t, path, remote, _manifest_hashes(m), self.timeout_s)
        out = f"{self.workdir}/result-{path.name}.json"
        argv = [self.python, self.agent, remote, *_agent_args(prompt_len, gen_len, repeat, options), "--json", out]
        if self.measure_bandwidth:
            argv.append("--bandwidth")
        result = self.t.run(argv, self.timeout_s, self.on_line)
        line = refusal(result.output) if result.returncode != 0 else None
        if line:  # the agent refused an option or the artifact in one line: that line, naming the device
            raise EdgesmithError(f"{self.t.uri}: {line}")
        self.t.check(result, f"bench agent on {path.name}")
        local = self.t.pull(out, self.tmp, timeout=self.timeout_s)
        return {**last_json(local.read_text(), f"bench of {path} on {self.t.uri}"), "runner": "agent"}


class AdbRunner:
    """Artifact pushed to /data/local/tmp/edgesmith, the profile's native runner (llama-bench for GGUF,
    ExecuTorch's llama_main for a .pte) run on it, output pulled."""

    def __init__(self, transport: AdbTransport, profile, tmp: Path, python, timeout_s, on_line):
        self.t, self.tmp, self.timeout_s = transport, tmp, timeout_s
        self.runner = (profile.native_runner if profile and profile.native_runner else "/data/local/tmp/llama-bench")
        self.et_runner = (profile.executorch_runner if profile and profile.executorch_runner
                          else "/data/local/tmp/llama_main")

    def __enter__(self):
        self.workdir = self.t.mkdtemp(timeout=min(self.timeout_s, 60))
        return self.run

    def __exit__(self, *exc):
        return False

    def run(self, path: Path, m: dict, prompt_len: int, gen_len: int, repeat: int, options: dict) -> dict:
        if m.get("format") == "executorch":
            return self.run_pte(path, m, prompt_len, gen_len, repeat, options)
        if m.get("format") != "gguf":
            raise EdgesmithError(f"{path}: adb bench runs GGUF artifacts through llama-bench and .pte through "
                                 f"ExecuTorch's llama_main; this one is {m.get('format')!r} (allowed: gguf, executorch)")
        remote = self.t.push(path, self.workdir, timeout=self.timeout_s)
        verify_pushed(self.t, path, remote, _manifest_hashes(m), self.timeout_s)
        out = f"{self.workdir}/llama-bench-{path.name}.json"
        given = llama_bench_options(m, options, str(path))  # no runtimes.load there: the manifest's options too
        argv = llama_bench_argv(self.runner, f"{remote}/{m['entry']}", prompt_len, gen_len, repeat, given)
        self.t.check(self.t.run_to_file(argv, out, self.timeout_s), f"{self.runner} on {path.name}")
        text = self.t.pull(out, self.tmp, timeout=self.timeout_s).read_text()
        ran = llama_bench_run_options(text)  # what llama-bench says it ran; its markdown says less: the flags given
        return {"runs": parse_llama_bench(text, prompt_len, gen_len), "runner": "llama-bench",
                "backend": "llama.cpp (llama-bench)", "run_options": given if ran is None else ran,
                "threads": (given if ran is None else ran).get("n_threads")}

    def run_pte(self, path: Path, m: dict, prompt_len: int, gen_len: int, repeat: int, options: dict) -> dict:
        if m.get("options", {}).get("input_pos") != "start":
            raise EdgesmithError(f"{path}: this .pte takes every position in input_pos (exported before the "
                                 "custom-op programs); ExecuTorch's llama_main needs a re-export")
        remote = self.t.push(path, self.workdir, timeout=self.timeout_s)
        verify_pushed(self.t, path, remote, _manifest_hashes(m), self.timeout_s)
        prompt = prompt_text(Tokenizer.load(path), prompt_len - 1)  # llama_main adds the BOS
        texts = []
        for i in range(repeat):
            out = f"{self.workdir}/llama-main-{path.name}-{i}.txt"
            argv = llama_main_argv(self.et_runner, f"{remote}/{m['entry']}", f"{remote}/tokenizer.json", prompt,
                                   prompt_len + gen_len, options)
            self.t.check(self.t.run_to_file(argv, out, self.timeout_s), f"{self.et_runner} on {path.name}")
            texts.append(self.t.pull(out, self.tmp, timeout=self.timeout_s).read_text())
        return {"runs": parse_llama_main(texts), "runner": "llama_main", "backend": "executorch (llama_main)",
                "run_options": dict(options), "threads": options.get("n_threads")}


def prompt_text(tokenizer: Tokenizer, n: int) -> str:
    """Plain text (letters and spaces: safe on any shell) that `tokenizer` encodes to exactly `n` tokens, or
    the longest such text below `n` it reaches, for a runner that takes text: words while they fit, then
    letters one at a time."""
    words = "the value of each item in the list is returned by the function".split()
    text = ""
    for i in range(4 * n + 8):
        longer = (text + " " + words[i % len(words)]).strip()
        if len(tokenizer.encode(longer)) > n:
            break
        text = longer
    for ch in " abcdefghijklmnopqrstuvwxyz" * (n + 1):
        if len(tokenizer.encode(text)) == n:
            break
        if len(tokenizer.encode(text + ch)) <= n:
            text += ch
    return text


# ----------------------------------------------------------------------------- output


def write_results(results: list[dict], path: str | Path) -> Path:
    """The results as a JSON list, written to a temporary file and renamed: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(results, indent=2) + "\n")  # sweeps a killed run's temporaries too
    return path


def read_results(path: str | Path) -> list[dict]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EdgesmithError(f"{path}: cannot read bench results ({e})") from None
    if not isinstance(data, list):
        raise EdgesmithError(f"{path}: not a bench results file (expected a JSON list)")
    return data


def _cell(s: dict | None, fmt: str = "{:.1f}") -> str:
    if not s:
        return "-"
    return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}-{fmt.format(s['max'])})"


def format_table(results: list[dict]) -> str:
    """A comparison table: the options each row ran with, medians with (min-max) over the repeats, the bound
    and its fraction. A row from before runtime options were recorded shows `?` for them."""
    head = ["artifact", "format", "prec", "options", "MB", "prefill tok/s", "decode tok/s", "TTFT ms", "peak RSS MB",
            "bound tok/s", "roofline"]
    rows = [[r.get("name") or Path(r["artifact"]).name, r["format"], r["precision"],
             describe(r["run_options"]) if r.get("run_options") is not None else "?", f"{r['bytes'] / 1e6:.2f}",
             _cell(r["prefill_tok_s"], "{:.0f}"), _cell(r["decode_tok_s"]), _cell(r["ttft_ms"], "{:.2f}"),
             _cell(r["peak_rss_mb"], "{:.0f}"),
             f"{r['decode_bound_tok_s']:.0f}" if r.get("decode_bound_tok_s") else "-",
             f"{r['roofline_fraction']:.1%}" if r.get("roofline_fraction") is not None else "-"] for r in results]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) if i < 4 else str(c).rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    out = [f"device: {results[0]['device'] if results else '-'}; prompt {results[0]['prompt_len'] if results else 0}"
           f", generate {results[0]['gen_len'] if results else 0}, median (min-max) of "
           f"{results[0]['repeat'] if results else 0} runs", line(head), line(["-" * w for w in widths])]
    return "\n".join(out + [line(r) for r in rows])


def plot_results(results: list[dict], png_path: str | Path) -> Path:
    """Decode tok/s (median, min-max whiskers) against each artifact's decode bound, and prefill tok/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    png_path = Path(png_path)
    names = [r.get("name") or Path(r["artifact"]).name for r in results]
    x = range(len(results))
    fig, axes = plt.subplots(1, 2, figsize=(max(6, 1.6 * len(results) + 3), 4))
    for ax, key, title in ((axes[0], "decode_tok_s", "decode tok/s"), (axes[1], "prefill_tok_s", "prefill tok/s")):
        med = [r[key]["median"] for r in results]
        err = [[m - r[key]["min"] for m, r in zip(med, results)], [r[key]["max"] - m for m, r in zip(med, results)]]
        ax.bar(x, med, yerr=err, capsize=4, color="#4c72b0")
        if key == "decode_tok_s":
            bounds = [r.get("decode_bound_tok_s") for r in results]
            if any(bounds):
                ax.scatter([i for i, b in zip(x, bounds) if b], [b for b in bounds if b], marker="_", s=600,
                           color="#c44e52", label="decode bound (roofline)", zorder=3)
                ax.legend(loc="best", fontsize=8)
        ax.set_xticks(list(x), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{title} on {results[0]['device']}" if results else title)
        ax.set_yscale("log")
    fig.tight_layout()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=110)
    finally:
        plt.close(fig)
    write_bytes_atomic(png_path, buf.getvalue())
    return png_path
