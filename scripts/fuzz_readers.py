"""Fuzzing every reader of user-supplied files at scale: GGUF, safetensors, ONNX, .pte, manifest.json,
tokenizer.json, config.json, recipe TOML, device profile TOML (issue 23, item 4).

Each case is a hypothesis-generated mutation of a valid seed file (scripts/fuzz_cases.py builds the seeds
once into `--work` and holds the mutations), read through the real user-facing reader in a worker
subprocess, one per reader. The worker answers one JSON line per case; the supervisor here gives it 10 s
per case (`--hang-s`), and kills and restarts it after a crash or a hang (with `--reuse-after-exception`, only
after a death or a hang: a worker that answered with a traceback goes on). Cases come from hypothesis run here,
not in the worker, so a restart does not change which cases follow. Outcomes:

- ok: the reader loaded it (and an artifact ran a prefill of a couple of tokens);
- refused: an EdgesmithError with a one-line message, counted by class (the message with the path, quoted
  values and numbers normalised, cut before any parenthesis);
- crash: any other exception (a traceback), a multi-line or empty EdgesmithError, or a worker that died
  (a signal, any exit) in the middle of a case;
- hang: no answer within 10 s.

Every crash and hang keeps its reproducer under `<work>/findings/<reader>-<case>-<outcome>/` (the case
directory as the reader saw it, plus finding.json: seed, mutation ops, traceback or stderr tail).

Memory: after warm-up (every seed of the reader, unmutated) the worker's peak RSS is the baseline; each
answer carries ru_maxrss. Peak growth over the baseline must stay within 4x the largest input file the
reader was given. The worker's address space is capped at its warm-up size + 2 GiB, so a reader that tries
to allocate without bound fails in the worker (recorded as a crash) instead of taking the machine down.

    python scripts/fuzz_readers.py --cases 10000 --jobs 1 --work /tmp/fuzz --json /tmp/fuzz.json
    python scripts/fuzz_readers.py --readers gguf,onnx --cases 300 --seed 1

Exit status 0 only with no crash, no hang and every RSS bound met, else 1 (2: bad arguments). This script
changes no product code and writes nothing outside `--work` (workers run in `<work>/cases`, with
EDGESMITH_CACHE in `<work>/cache`).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gc
import json
import multiprocessing
import os
import queue
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import seed as hypothesis_seed
from tqdm import tqdm

from fuzz_cases import READERS, build_seeds, cases, mutate, refusal_class, run_case, seed_bytes, write_case
from models.errors import EdgesmithError

ROOT = Path(__file__).resolve().parents[1]
HANG_S = 10.0
START_S = 300.0  # imports and the warm-up cases (the first .pte load takes seconds)
RSS_BOUND = 4.0  # peak RSS growth <= this x the largest input file
HEADROOM = 2 << 30  # address space a worker may add to its warm-up size
KEEP_BYTES = 200  # findings per reader kept with their case directory (the rest: seed + ops, which rebuild it)
TELLING = re.compile(r"GGML_ASSERT|assert|terminate called|what\(\)|error|fatal", re.IGNORECASE)  # a death's cause
SELFTEST = "_selftest"  # a fake reader that shows the harness catches each outcome (tests/reliability)
SELFTEST_MODES = ("ok", "refuse", "raise", "abort", "hang", "grow", "multi-line")
_kept: list = []  # the selftest's "grow" mode keeps its allocation alive


@dataclass(frozen=True)
class Options:
    cases: int = 10000
    seed: int = 0
    work: str = ""
    quick: bool = False  # seeds without the slow ExecuTorch 8da4w export
    hang_s: float = HANG_S
    max_findings: int = 0  # stop a reader after this many crashes + hangs (0: never)
    reuse: bool = False  # keep the worker after a Python exception (restart only after a death or a hang)


def selftest_case(case: Path) -> None:
    """The selftest reader: the first byte of case.bin picks what it does."""
    data = (case / "case.bin").read_bytes()
    mode = SELFTEST_MODES[data[0] % len(SELFTEST_MODES)] if data else "ok"
    if mode == "refuse":
        raise EdgesmithError(f"{case / 'case.bin'}: refused, first byte {data[0]}")
    if mode == "raise":
        raise RuntimeError("selftest: a bare exception")
    if mode == "abort":
        os.abort()
    if mode == "hang":
        time.sleep(3600)
    if mode == "grow":
        _kept.append(bytearray(64 << 20))  # resident: bytearray fills its buffer
    if mode == "multi-line":
        raise EdgesmithError("selftest: a message\non two lines")


def selftest_seeds(work: Path) -> list[dict]:
    d = work / "seeds" / SELFTEST
    d.mkdir(parents=True, exist_ok=True)
    (d / "case.bin").write_bytes(bytes(64))
    return [{"name": SELFTEST, "dir": str(d), "target": "case.bin", "record": None, "kind": "binary", "ints": [],
             "header": 1}]


# ----------------------------------------------------------------------------- worker (one per reader)


def worker(reader: str) -> None:
    """Read case directories from stdin, answer one JSON line per case on the original stdout."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # what native libraries print goes to the log, never into the protocol
    capped = False
    for line in sys.stdin:
        req = json.loads(line)
        if not req.get("warm") and not capped:
            vm = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmSize:")) * 1024
            resource.setrlimit(resource.RLIMIT_AS, (vm + HEADROOM, vm + HEADROOM))
            gc.collect()
            gc.freeze()  # what warm-up left is permanent: a collection per case then scans only the case's objects
            capped = True
        os.ftruncate(2, 0)  # the log holds this case's stderr only
        case, t0 = Path(req["case"]), time.perf_counter()
        answer = {"outcome": "ok"}
        try:
            selftest_case(case) if reader == SELFTEST else run_case(reader, case)
        except EdgesmithError as e:
            msg = str(e)
            if "\n" in msg.strip() or not msg.strip():
                answer = {"outcome": "crash", "detail": f"EdgesmithError without a one-line message: {msg!r}",
                          "class": "EdgesmithError: multi-line or empty message"}
            else:
                answer = {"outcome": "refused", "class": refusal_class(msg, case), "detail": msg}
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # noqa: BLE001 -- anything but our one error is what we are looking for
            tb = traceback.extract_tb(e.__traceback__)
            ours = [f for f in tb if Path(f.filename).is_relative_to(ROOT) and "scripts" not in Path(f.filename).parts]
            frame = (ours or tb or [None])[-1]  # the innermost frame of the product, else the innermost one
            where = f"{Path(frame.filename).relative_to(ROOT) if ours else Path(frame.filename).name}:{frame.name}" \
                if frame else "?"
            first = (str(e).strip().splitlines() or [""])[0]
            answer = {"outcome": "crash", "detail": traceback.format_exc()[-4000:],
                      "class": f"{type(e).__name__} in {where}: {refusal_class(first, case)}"}
        gc.collect()
        answer["s"] = round(time.perf_counter() - t0, 4)
        answer["maxrss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        proto.write(json.dumps(answer) + "\n")


class Worker:
    """A worker subprocess for one reader, asked one case at a time with a timeout."""

    def __init__(self, reader: str, work: Path, seeds: list[dict], originals: dict[str, bytes], hang_s: float):
        self.reader, self.work, self.hang_s = reader, work, hang_s
        self.log = work / "logs" / f"{reader}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "EDGESMITH_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
               "MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": "65536",
               # ggml's abort otherwise attaches gdb to print a backtrace: seconds under load (a false hang)
               "GGML_NO_BACKTRACE": "1"}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", reader],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env,
                                         cwd=work / "cases", text=True)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.baseline_kb = self.peak_kb = 0
        for seed in seeds:  # warm-up: every seed as it is must load
            warm = work / "cases" / f"{reader}-warm"
            write_case(seed, originals[seed["name"]], warm)
            answer = self.ask(warm, START_S, warm=True)
            if answer["outcome"] != "ok":
                self.kill()
                raise RuntimeError(f"fuzz: {reader} worker could not load the valid seed {seed['name']}: "
                                   f"{answer.get('detail', answer)}")
            self.baseline_kb = answer["maxrss_kb"]

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def ask(self, case: Path, timeout: float | None = None, warm: bool = False) -> dict:
        timeout = timeout or self.hang_s
        try:
            self.proc.stdin.write(json.dumps({"case": str(case), "warm": warm}) + "\n")
            self.proc.stdin.flush()
        except OSError:  # it died after its last answer: the pump reports the end below
            pass
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            self.peak_kb = max(self.peak_kb, self.hwm_kb())
            self.kill()
            return {"outcome": "hang", "class": f"no answer in {timeout:g} s", "detail": self.stderr_tail()}
        if line is None:
            rc = self.proc.wait()
            how = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exited with code {rc}"
            tail = self.stderr_tail()
            lines = [x for x in tail.splitlines() if x.strip()]
            last = next((x for x in reversed(lines) if TELLING.search(x)), lines[-1] if lines else "")
            last = re.sub(r"(?<![\w.])-?\d+\b", "N", re.sub(r"/\S*/", "", last.strip()))  # paths to names
            return {"outcome": "crash", "class": f"worker {how}: {last}"[:200],
                    "detail": f"worker {how}\n{tail}"}
        answer = json.loads(line)
        self.peak_kb = max(self.peak_kb, answer["maxrss_kb"])
        return answer

    def hwm_kb(self) -> int:
        try:
            return next(int(x.split()[1]) for x in open(f"/proc/{self.proc.pid}/status") if x.startswith("VmHWM:"))
        except (OSError, StopIteration):
            return 0

    def stderr_tail(self) -> str:
        """What the worker printed during the case: its start and its end."""
        try:
            data = self.log.read_bytes()
        except OSError:
            return ""
        data = data if len(data) <= 4000 else data[:1500] + b"\n[...]\n" + data[-2500:]
        return data.decode("utf-8", "replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()


# ----------------------------------------------------------------------------- supervisor (one reader)


def start_worker(reader: str, work: Path, seeds: list[dict], originals: dict[str, bytes], hang_s: float) -> Worker:
    """A warmed-up worker; a failed warm-up is retried twice (the product tree may be mid-edit for a moment)."""
    for attempt in range(3):
        try:
            return Worker(reader, work, seeds, originals, hang_s)
        except RuntimeError:
            if attempt == 2:
                raise
            time.sleep(30)


def keep_finding(work: Path, reader: str, index: int, seed: str, ops: list, answer: dict, case: Path,
                 with_bytes: bool) -> str:
    dest = work / "findings" / f"{reader}-{index:06d}-{answer['outcome']}"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    if with_bytes:
        shutil.copytree(case, dest / "case")
    record = {"reader": reader, "case": index, "seed": seed, "ops": ops, **answer}
    (dest / "finding.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    return str(dest)


def fuzz_reader(reader: str, opts: Options, progress=None) -> dict:
    """Run `opts.cases` cases of `reader`; the per-reader result (counts, classes, memory, findings)."""
    work, n = Path(opts.work), opts.cases
    seeds = selftest_seeds(work) if reader == SELFTEST else build_seeds(work, opts.quick)[reader]
    originals = seed_bytes(seeds)
    by_name = {s["name"]: s for s in seeds}
    sizes = {k: len(v) for k, v in originals.items()}
    case_dir = work / "cases" / reader
    for old in (work / "findings").glob(f"{reader}-*"):  # a rerun in the same --work replaces its findings
        shutil.rmtree(old)
    res = {"reader": reader, "cases": 0, "ok": 0, "refused": 0, "crash": 0, "hang": 0, "restarts": 0,
           "largest_input_bytes": max(sizes.values()), "growth_kb": 0, "baseline_kb": 0, "classes": {},
           "crash_classes": {}, "findings": [], "stopped_early": False, "harness_errors": []}
    t0 = time.perf_counter()
    try:
        w = start_worker(reader, work, seeds, originals, opts.hang_s)
    except RuntimeError as e:
        res.update(error=str(e)[:3000], time_s=round(time.perf_counter() - t0, 1))
        return res
    res["baseline_kb"] = w.baseline_kb

    def one(case) -> None:
        nonlocal w
        if res["cases"] >= n or res["stopped_early"]:
            return
        name, ops = case
        try:
            data = mutate(by_name[name], ops, originals)
            res["largest_input_bytes"] = max(res["largest_input_bytes"], write_case(by_name[name], data, case_dir))
        except Exception:  # noqa: BLE001 -- a bug of this harness, not of a reader: kept, counted, not fatal
            res["harness_errors"].append(f"{name} {json.dumps(ops)[:500]}\n{traceback.format_exc()[-1500:]}")
            res["stopped_early"] = len(res["harness_errors"]) >= 100
            return
        answer = w.ask(case_dir)
        res["cases"] += 1
        res[answer["outcome"]] += 1
        if answer["outcome"] == "refused":
            res["classes"][answer["class"]] = res["classes"].get(answer["class"], 0) + 1
        elif answer["outcome"] in ("crash", "hang"):
            res["crash_classes"][answer["class"]] = res["crash_classes"].get(answer["class"], 0) + 1
            res["findings"].append(keep_finding(work, reader, res["cases"], name, ops, answer, case_dir,
                                                len(res["findings"]) < KEEP_BYTES))
        res["growth_kb"] = max(res["growth_kb"], w.peak_kb - w.baseline_kb)
        alive = answer["outcome"] == "crash" and "maxrss_kb" in answer and opts.reuse  # an exception, answered
        if answer["outcome"] in ("crash", "hang") and not alive:  # a fresh process: nothing of it carries over
            w.kill()
            try:
                w = start_worker(reader, work, seeds, originals, opts.hang_s)
            except RuntimeError as e:
                res.update(error=str(e)[:3000], stopped_early=True)
                return
            res["restarts"] += 1
        if opts.max_findings and len(res["findings"]) >= opts.max_findings:
            res["stopped_early"] = True
        if progress is not None:
            progress(reader)

    if reader == SELFTEST:  # each mode in turn, no hypothesis
        for i in range(n):
            one((SELFTEST, [{"op": "set", "at": 0, "bytes": f"{i % len(SELFTEST_MODES):02x}"}]))
    offset = 0
    while res["cases"] < n and not res["stopped_early"]:  # hypothesis may stop early: go on with the next seed
        run = settings(max_examples=n - res["cases"], database=None, deadline=None, phases=[Phase.generate],
                       suppress_health_check=list(HealthCheck), verbosity=Verbosity.quiet)(
            hypothesis_seed(opts.seed * 1000 + offset)(given(cases(reader, seeds, sizes))(one)))
        run()
        offset += 1
    if not res.get("error"):
        w.close()
    res["time_s"] = round(time.perf_counter() - t0, 1)
    return res


# ----------------------------------------------------------------------------- report


def summarise(res: dict) -> dict:
    growth_mb, largest_mb = res["growth_kb"] / 1024, res["largest_input_bytes"] / 2**20
    res.update(growth_mb=round(growth_mb, 2), largest_input_mb=round(largest_mb, 4),
               ratio=round(growth_mb / max(largest_mb, 1e-9), 2), bound_met=growth_mb <= RSS_BOUND * largest_mb)
    return res


def table(results: list[dict]) -> str:
    head = ("reader", "cases", "ok", "refused", "crashes", "hangs", "RSS growth MB", "largest input MB", "ratio",
            "bound", "restarts", "time s")
    rows = [head] + [(r["reader"] + (" (stopped)" if r["stopped_early"] else ""), r["cases"], r["ok"], r["refused"],
                      r["crash"], r["hang"], r["growth_mb"], r["largest_input_mb"], r["ratio"],
                      "ok" if r["bound_met"] else f"> {RSS_BOUND:g}x",
                      r["restarts"], r["time_s"]) for r in results]
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    lines = ["  ".join(str(v).rjust(w) if i else str(v).ljust(w) for i, (v, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    for r in results:
        lines.append(f"\n{r['reader']}: {len(r['classes'])} refusal classes")
        lines += [f"  {count:7d}  {cls}" for cls, count in sorted(r["classes"].items(), key=lambda kv: -kv[1])]
        if r.get("error"):
            lines.append(f"{r['reader']}: STOPPED, the worker could not start: {r['error']}")
        if r["harness_errors"]:
            lines.append(f"{r['reader']}: {len(r['harness_errors'])} HARNESS ERRORS (cases not run), the first:\n"
                         + r["harness_errors"][0])
        if r["crash_classes"]:
            lines.append(f"{r['reader']}: CRASHES AND HANGS ({len(r['findings'])} reproducers under "
                         f"{Path(r['findings'][0]).parent})")
            lines += [f"  {count:7d}  {cls}" for cls, count in sorted(r["crash_classes"].items(),
                                                                      key=lambda kv: -kv[1])]
    return "\n".join(lines)


def run_all(readers: list[str], opts: Options, jobs: int) -> list[dict]:
    bar = tqdm(total=opts.cases * len(readers), unit="case", desc="fuzz", file=sys.stderr, smoothing=0.05,
               mininterval=1.0)
    if jobs <= 1:
        results = [fuzz_reader(reader, opts, progress=lambda r: bar.update()) for reader in readers]
        bar.close()
        return results
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager, concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
        ticks = manager.Queue()
        futures = [pool.submit(fuzz_reader, r, opts, ticks.put) for r in readers]
        while not all(f.done() for f in futures):
            try:
                ticks.get(timeout=0.5)
                bar.update()
            except queue.Empty:
                pass
        bar.close()
        return [f.result() for f in futures]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # Cases
    p.add_argument("--cases", type=int, default=10000, help="cases per reader")
    p.add_argument("--seed", type=int, default=0,
                   help="hypothesis seed (the CI test fixes it; a long run may still diverge: hypothesis adapts)")
    p.add_argument("--readers", default=",".join(READERS), help=f"comma-separated, of: {', '.join(READERS)}")
    p.add_argument("--quick-seeds", action="store_true", help="leave out the ExecuTorch 8da4w seed (~90 s to build)")
    # Supervision
    p.add_argument("--jobs", type=int, default=1, help="readers fuzzed in parallel")
    p.add_argument("--hang-s", type=float, default=HANG_S, help="a case with no answer after this long is a hang")
    p.add_argument("--max-findings", type=int, default=0, help="stop a reader after this many crashes and hangs "
                   "(0: never)")
    p.add_argument("--reuse-after-exception", action="store_true", help="keep the worker after a Python exception "
                   "(restart it only after it died or hung): faster where one bug crashes many cases")
    # Output
    p.add_argument("--work", default=None, help="seeds, cases, logs and findings (default: a new temp dir)")
    p.add_argument("--json", default=None, help="write the results here too")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    readers = [r.strip() for r in args.readers.split(",") if r.strip()]
    unknown = [r for r in readers if r not in (*READERS, SELFTEST)]
    if unknown or args.cases < 1:
        p.error(f"--readers: unknown {unknown}; allowed: {', '.join(READERS)}" if unknown else "--cases must be >= 1")
    work = Path(args.work or tempfile.mkdtemp(prefix="fuzz-readers-")).resolve()
    (work / "cases").mkdir(parents=True, exist_ok=True)
    os.environ["EDGESMITH_CACHE"] = str(work / "cache")  # the local profile is measured once, into --work
    if set(readers) - {SELFTEST}:
        build_seeds(work, args.quick_seeds, log=lambda line: print(line, file=sys.stderr))
    opts = Options(cases=args.cases, seed=args.seed, work=str(work), quick=args.quick_seeds, hang_s=args.hang_s,
                   max_findings=args.max_findings, reuse=args.reuse_after_exception)
    t0 = time.perf_counter()
    results = [summarise(r) for r in run_all(readers, opts, args.jobs)]
    print(table(results))
    failed = [r["reader"] for r in results if r["crash"] or r["hang"] or not r["bound_met"] or r["harness_errors"]
              or r.get("error")]
    print(f"\n{sum(r['cases'] for r in results)} cases in {time.perf_counter() - t0:.0f} s, work dir {work}; "
          + (f"FAILED: {', '.join(failed)}" if failed else "0 crashes, 0 hangs, every RSS bound met"))
    if args.json:
        Path(args.json).write_text(json.dumps({"options": {**asdict(opts), "jobs": args.jobs},
                                               "readers": results}, indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
