"""Crash safety: every stage killed with SIGKILL at a random point, then run again.

For train, compress, export, bench and run: the real `edgesmith` command, run once uninterrupted
(the reference: its outputs, its duration, the temporary paths it made), then killed -- its whole
process group, SIGKILL -- at a point drawn from a seeded RNG (EDGESMITH_CRASH_SEED, default 0;
every assertion message names the seed and the point): anywhere in the reference's duration, or
within 50 ms of the k-th temporary path appearing (a kill inside a write), or after a random step
or progress line. After the kill: no process of the killed run is alive (torchrun's ranks and the
bench agent lead sessions of their own), and every final output path is absent or complete (a
checkpoint loads with its sha256 checked, an artifact's manifest verifies and `runtimes.load` opens
it, JSON parses, a PNG ends with its IEND chunk, a training state has every file). Then the same
command again: it completes, its outputs equal the reference's, and no temporary path is left --
the killed run's are swept by the rerun (models/atomic.py names them by pid).

What "the same command again" means per stage, as a user would do it:
- train: with `--resume` when a complete training state exists, else as it was;
- run: as it was (the pipeline resumes: steps finished before the kill are cached);
- compress, export: as it was. They refuse an existing --out without --force, so a kill after the
  final rename is answered "already exists" (exit 2), the output -- checked complete -- kept. A
  second trial starts with --out present and --force given, so the kill can land in the swap;
- bench --json: as it was (the results file is replaced atomically; the trial starts with one).

Two deterministic tests pin down what the random kills reach only sometimes: the sweep keeps a live
writer's temporaries and removes a dead one's, and a metrics log torn by a kill mid-append resumes.
"""

import json
import os
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import runtimes
from models.atomic import replace_dir, temp_dir_for
from models.checkpoint import load_checkpoint, read_safetensors
from models.errors import EdgesmithError
from runtimes.artifact import read_manifest
from tests.reliability.crash import (Proc, after_file_lines, after_lines, after_seconds, after_temporaries,
                                     child_running, crash_rng, crash_seed, survivors, temporaries)
from toolchain.pipeline import MARKER
from toolchain.train.launch import DistEnv
from toolchain.train.state import list_states
from toolchain.train.trainer import Metrics, read_metrics

SEED = crash_seed()
TINY = {"vocab_size": 320, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 128, "max_seq_len": 128}
TRAIN = ["--steps", 16, "--batch-size", 4, "--seq-len", 32, "--save-every", 4, "--keep", 2, "--eval-every", 8]
PASS = ["--pass", "quantize:method=rtn,bits=4,group_size=32", "--seq-len", 32, "--max-tokens", 2048]
BENCH = ["--prompt-len", 8, "--gen-len", 8, "--repeat", 2]
PNG_END = b"IEND\xaeB`\x82"


@dataclass
class Reference:
    out: Path
    seconds: float
    temps: int  # temporary paths seen while it ran
    event_s: dict[str, float]  # when each watched event first happened (seconds since start)


def reference(args: list, out: Path, watch: tuple[Path, ...], env: dict | None = None, events=None) -> Reference:
    proc = Proc(args, env=env, watch=watch)
    rc = proc.wait(events=events)
    assert rc == 0, f"reference run of edgesmith {' '.join(proc.args)} failed:\n{proc.output[-3000:]}"
    return Reference(out, proc.elapsed(), len(proc.temps_seen), proc.event_s)


def kill_point(stage: str, ref: Reference, trial: int, watch: tuple[Path, ...]):
    """(condition, delay, description). Trial 0: anywhere in the reference run's duration. Trial 1: in a
    write -- within 50 ms of the k-th temporary path the run makes under `watch`, k drawn among those
    the reference run was seen to make (a write's own window, so a busier machine moves with it)."""
    rng = crash_rng(f"{stage}-{trial}")
    seed = f"{stage} trial {trial}, seed {SEED} (EDGESMITH_CRASH_SEED)"
    if trial == 0 or not ref.temps:
        delay = rng.uniform(0, ref.seconds)
        return (after_seconds(0), delay, f"{seed}: SIGKILL {delay:.3f} s after start, uniform in the reference "
                f"run's duration [0, {ref.seconds:.2f}] s")
    k, delay = rng.randint(1, ref.temps), rng.uniform(0, 0.05)
    return (after_temporaries(k, *watch), delay, f"{seed}: SIGKILL {delay:.3f} s after temporary path {k} of the "
            f"{ref.temps} the reference run made appeared")


def kill(proc: Proc, condition, delay: float, point: str, roots: tuple[Path, ...]) -> str:
    """Kill at the point; assert nothing of the run survives it. Returns the point, with what happened
    (and how many temporary paths the kill left under `roots` for the rerun to sweep)."""
    killed = proc.kill_when(condition, delay)
    left = survivors(proc.tag)
    where = (f"{point}; killed at {proc.kill_s:.3f} s, leaving {len(temporaries(*roots))} temporary path(s)"
             if killed else f"{point}; the command finished before the kill")
    print(where)  # shown with -s, and with the output of a failing test
    assert not left, f"{where}: processes of the killed run are still alive (orphans): {left}"
    return where


def valid(where: str, what, check) -> None:
    try:
        check()
    except Exception as e:  # noqa: BLE001 -- any failure to read a final output is the finding
        raise AssertionError(f"{where}: {what} exists but is not complete: {type(e).__name__}: {e}") from None


def no_temporaries(where: str, *roots: Path) -> None:
    left = temporaries(*roots)
    assert not left, f"{where}: temporary paths left after the rerun: {[str(p) for p in left]}"


# ----------------------------------------------------------------------------- output checks


def check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and data.endswith(PNG_END), f"{path}: not a whole PNG"


def check_json(path: Path):
    return json.loads(path.read_text())


def check_metrics(path: Path) -> None:
    """Every newline-terminated record parses (a torn last record is what an append killed midway leaves)."""
    for line in path.read_text().split("\n")[:-1]:
        json.loads(line)


def check_state(state: Path) -> None:
    for name in ("model.safetensors", "optimizer.safetensors"):
        read_safetensors(state / name)
    for name in ("trainer.json", "optimizer.json", "rng-0.json"):
        check_json(state / name)


def check_artifact(path: Path) -> None:
    read_manifest(path)  # every file's size and sha256
    session = runtimes.load(path)
    assert session.max_seq_len > 0
    del session


def check_train_dir(where: str, out: Path) -> None:
    if (out / "checkpoint").exists():
        valid(where, out / "checkpoint", lambda: load_checkpoint(out / "checkpoint"))
    for name, check in (("summary.json", check_json), ("metrics.jsonl", check_metrics), ("loss.png", check_png)):
        if (out / name).exists():
            valid(where, out / name, lambda: check(out / name))
    for state in list_states(out):
        valid(where, state, lambda: check_state(state))


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


# ----------------------------------------------------------------------------- shared inputs


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("crash")
    (root / "tiny.json").write_text(json.dumps(TINY))
    corpus = root / "corpus"
    corpus.mkdir()
    for p in sorted(Path(json.__file__).parent.glob("*.py")):  # a few files of real Python
        (corpus / p.name).write_text(p.read_text())
    return root


def fresh_cache(root: Path) -> dict:
    """Each run its own token and tokenizer cache, so that a kill can land in their writing too."""
    cache = root / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    return {"EDGESMITH_CACHE": str(cache)}


def train_args(work: Path, out: Path, nproc: int = 1) -> list:
    return ["train", "--model", work / "tiny.json", "--data", work / "corpus", *TRAIN, "--nproc", nproc, "--out", out]


@pytest.fixture(scope="module")
def train_ref(work) -> Reference:
    out, env = work / "train-ref", fresh_cache(work / "train-ref-env")
    return reference(train_args(work, out), out, (out, work / "train-ref-env"), env)


@pytest.fixture(scope="module")
def compress_ref(work, train_ref) -> Reference:
    out = work / "compress-ref" / "q4"
    args = ["compress", train_ref.out / "checkpoint", *PASS, "--data", work / "corpus", "--out", out]
    return reference(args, out, (out.parent, work / "compress-ref-env"), fresh_cache(work / "compress-ref-env"))


@pytest.fixture(scope="module")
def export_ref(work, compress_ref) -> Reference:
    out = work / "export-ref" / "gguf"
    return reference(["export", compress_ref.out, "--format", "gguf", "--out", out], out, (out.parent,))


# ----------------------------------------------------------------------------- train


@pytest.mark.parametrize("trial", [0, 1])
def test_train_killed_then_resumed_matches_an_uninterrupted_run(work, train_ref, tmp_path, trial):
    # setup
    out, env = tmp_path / "run", fresh_cache(tmp_path)
    condition, delay, point = kill_point("train", train_ref, trial, (out, tmp_path / "cache"))
    # execute: kill, look, run again (resuming when a complete training state exists, as a user would)
    where = kill(Proc(train_args(work, out), env=env), condition, delay, point, (out, tmp_path / "cache"))
    check_train_dir(where, out)
    rerun = Proc(train_args(work, out) + (["--resume"] if list_states(out) else []), env=env)
    # assert
    assert rerun.wait() == 0, f"{where}: the rerun failed:\n{rerun.output[-3000:]}"
    check_train_dir(where, out)
    assert same_weights(out / "checkpoint", train_ref.out / "checkpoint"), f"{where}: weights differ from the reference"
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    reference_losses = [json.loads(line)["loss"] for line in (train_ref.out / "metrics.jsonl").read_text().splitlines()]
    assert losses == reference_losses, f"{where}: the loss curve differs from the reference"
    no_temporaries(where, out, tmp_path / "cache")


def test_two_rank_train_killed_leaves_no_rank_and_resumes(work, train_ref, tmp_path):
    # setup: kill once a random number of steps is logged (torchrun and its ranks: sessions of their own)
    rng = crash_rng("train-nproc2")
    steps, delay = rng.randint(1, 16), rng.uniform(0, 0.3)
    point = (f"train --nproc 2, seed {SEED} (EDGESMITH_CRASH_SEED): SIGKILL {delay:.3f} s after step {steps} "
             "is logged")
    out, env = tmp_path / "run", fresh_cache(tmp_path)
    # execute
    where = kill(Proc(train_args(work, out, nproc=2), env=env), after_file_lines(out / "metrics.jsonl", steps),
                 delay, point, (out, tmp_path / "cache"))
    check_train_dir(where, out)
    rerun = Proc(train_args(work, out, nproc=2) + (["--resume"] if list_states(out) else []), env=env)
    # assert: the same global batch trains the model one process does (to float reduction order)
    assert rerun.wait() == 0, f"{where}: the rerun failed:\n{rerun.output[-3000:]}"
    check_train_dir(where, out)
    a = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line)["loss"] for line in (train_ref.out / "metrics.jsonl").read_text().splitlines()]
    assert len(a) == len(b) and max(abs(x - y) / abs(y) for x, y in zip(a, b)) <= 1e-4, f"{where}: {a} vs {b}"
    no_temporaries(where, out, tmp_path / "cache")


# ----------------------------------------------------------------------------- compress and export


def _rerun_refusing_or_completing(where: str, args: list, out: Path, was_complete: bool, env=None) -> Proc:
    rerun = Proc(args, env=env)
    rc = rerun.wait()
    if was_complete and "--force" not in map(str, args):
        assert rc == 2 and "already exists (pass --force to replace it)" in rerun.output, \
            f"{where}: a complete --out must be refused without --force, got exit {rc}:\n{rerun.output[-2000:]}"
    else:
        assert rc == 0, f"{where}: the rerun failed:\n{rerun.output[-3000:]}"
    return rerun


@pytest.mark.parametrize("trial", [0, 1])
def test_compress_killed_leaves_no_half_checkpoint(work, train_ref, compress_ref, tmp_path, trial):
    # setup: trial 1 replaces an existing output (--force): the kill can land in the swap
    out, env = tmp_path / "q4", fresh_cache(tmp_path)
    args = ["compress", train_ref.out / "checkpoint", *PASS, "--data", work / "corpus", "--out", out]
    if trial == 1:
        shutil.copytree(compress_ref.out, out)
        args.append("--force")
    condition, delay, point = kill_point("compress", compress_ref, trial, (tmp_path,))

    def check():
        if out.exists():
            valid(where, out, lambda: (load_checkpoint(out), check_json(out / "compress_report.json")))
    # execute
    where = kill(Proc(args, env=env), condition, delay, point, (tmp_path,))
    check()
    _rerun_refusing_or_completing(where, args, out, out.exists(), env)
    # assert
    check()
    assert same_weights(out, compress_ref.out), f"{where}: weights differ from the reference"
    no_temporaries(where, tmp_path)


@pytest.mark.parametrize("trial", [0, 1])
def test_export_killed_leaves_no_half_artifact(export_ref, compress_ref, tmp_path, trial):
    # setup
    out = tmp_path / "gguf"
    args = ["export", compress_ref.out, "--format", "gguf", "--out", out]
    if trial == 1:
        shutil.copytree(export_ref.out, out)
        args.append("--force")
    condition, delay, point = kill_point("export", export_ref, trial, (tmp_path,))

    def check():
        if out.exists():
            valid(where, out, lambda: check_artifact(out))
    # execute
    where = kill(Proc(args), condition, delay, point, (tmp_path,))
    check()
    _rerun_refusing_or_completing(where, args, out, out.exists())
    # assert: the same files as the reference's, byte for byte
    check()
    files = {k: v["sha256"] for k, v in read_manifest(out)["files"].items()}
    assert files == {k: v["sha256"] for k, v in read_manifest(export_ref.out)["files"].items()}, where
    no_temporaries(where, tmp_path)


# ----------------------------------------------------------------------------- bench


def test_bench_killed_keeps_a_whole_results_file(export_ref, tmp_path):
    # setup: a results file and its plot from an earlier bench, which the killed run was replacing
    first = tmp_path / "first"
    args = ["bench", export_ref.out, *BENCH, "--json", first / "bench.json"]
    agent = child_running("devices.agent")
    ref = reference(args, first, (first,), events={"agent": agent,
                                                   "agent done": lambda p: "agent" in p.event_s and not agent(p)})
    out = tmp_path / "again"
    shutil.copytree(first, out)
    args = ["bench", export_ref.out, *BENCH, "--json", out / "bench.json"]
    # the kill lands while the agent process measures (it leads a session of its own: the orphan to
    # look for); a kill while the results are written is the run test's (its bench step writes them)
    window = ref.event_s["agent done"] - ref.event_s["agent"]
    delay = crash_rng("bench").uniform(0, window)
    point = (f"bench, seed {SEED} (EDGESMITH_CRASH_SEED): SIGKILL {delay:.3f} s after the bench agent started, "
             f"uniform in its life in the reference run, {window:.2f} s")

    def check():
        if (out / "bench.json").exists():
            valid(where, out / "bench.json",
                  lambda: [r["decode_tok_s"]["median"] for r in check_json(out / "bench.json")])
        if (out / "bench.png").exists():
            valid(where, out / "bench.png", lambda: check_png(out / "bench.png"))
    # execute
    where = kill(Proc(args), agent, delay, point, (out,))
    check()
    rerun = Proc(args)
    # assert
    assert rerun.wait() == 0, f"{where}: the rerun failed:\n{rerun.output[-3000:]}"
    check()
    results = check_json(out / "bench.json")
    assert [r["artifact"] for r in results] == [str(export_ref.out)], where
    no_temporaries(where, out)


# ----------------------------------------------------------------------------- run (the pipeline)

RECIPE = """
name = "crash"
description = "train, one pass, one export, bench, report: every stage, tiny"

[source.train]
model = "{model}"
data = "{corpus}"
nproc = 1
steps = 8
batch_size = 4
seq_len = 32
eval_tokens = 1024

[[pass]]
kind = "quantize"
method = "rtn"
bits = 4
group_size = 32

[compress]
calib_seq_len = 32
eval_seq_len = 32
eval_tokens = 1024

[export]
formats = ["gguf"]
max_seq_len = 128

[target]
device = "local"
prompt_len = 8
gen_len = 8
repeat = 1
"""
PROGRESS = r"edgesmith run |\[\d/\d |    \S"  # the header, each step's start and end, bench progress


def check_html(path: Path) -> None:
    assert path.read_text().endswith("</html>\n"), f"{path}: cut short"


def check_run_dir(where: str, out: Path) -> dict[str, str]:
    """Every final path is absent or complete; returns {step path: key} of the steps marked done."""
    done = {}
    for sub, check in (("checkpoints", load_checkpoint), ("artifacts", check_artifact)):
        for d in sorted((out / sub).iterdir()) if (out / sub).is_dir() else ():
            if not d.name.startswith("."):
                valid(where, d, lambda: (check(d), check_json(d / MARKER)))
                done[f"{sub}/{d.name}"] = check_json(d / MARKER)["key"]
    for f in sorted((out / "bench").glob("*.json")) if (out / "bench").is_dir() else ():
        if not f.name.startswith("."):
            valid(where, f, lambda: check_json(f))
    for name, check in (("run.json", check_json), ("recipe.toml", lambda p: tomllib.loads(p.read_text())),
                        ("report.html", check_html)):
        if (out / name).exists():
            valid(where, out / name, lambda: check(out / name))
    for png in (out / "report").glob("*.png") if (out / "report").is_dir() else ():
        valid(where, png, lambda: check_png(png))
    return done


def test_run_killed_resumes_and_leaves_nothing_half_done(work, tmp_path):
    # setup: kill after a random progress line of the run (and up to a second more)
    recipe = tmp_path / "crash.toml"
    recipe.write_text(RECIPE.format(model=work / "tiny.json", corpus=work / "corpus"))
    out, env = tmp_path / "run", fresh_cache(tmp_path)
    rng = crash_rng("run")
    k, delay = rng.randint(1, 12), rng.uniform(0, 1.0)  # line 12 starts the report
    point = f"run, seed {SEED} (EDGESMITH_CRASH_SEED): SIGKILL {delay:.3f} s after progress line {k}"
    # execute
    where = kill(Proc(["run", recipe, "--out", out], env=env), after_lines(k, PROGRESS), delay, point,
                 (out, tmp_path / "cache"))
    done_before = check_run_dir(where, out)
    rerun = Proc(["run", recipe, "--out", out], env=env)
    # assert: it completes, reusing every step finished before the kill
    assert rerun.wait() == 0, f"{where}: the rerun failed:\n{rerun.output[-3000:]}"
    done_after = check_run_dir(where, out)
    assert set(done_after) == {"checkpoints/00-train", "checkpoints/01-quantize-rtn", "artifacts/gguf"}, where
    steps = {s["path"]: s for s in check_json(out / "run.json")["steps"]}
    for path, key in done_before.items():
        assert steps[path]["cached"] and steps[path]["key"] == key, f"{where}: {path} was done but not reused"
    assert (out / "bench" / "local.json").is_file() and (out / "report.html").is_file(), where
    assert not (out / ".work").exists() or not any((out / ".work").iterdir()), f"{where}: .work left behind"
    no_temporaries(where, out, tmp_path / "cache")


# ----------------------------------------------------------------------------- the sweep itself

MAKE_TEMPS = ("import sys; from models.atomic import temp_path\n"
              "for kind in ('tmp', 'old'):\n"
              "    p = temp_path(sys.argv[1], kind); p.mkdir(); print(p, flush=True)\n"
              "sys.stdin.read()\n")


def test_the_next_writer_sweeps_a_dead_writers_temporaries_and_keeps_a_live_ones(tmp_path):
    # setup: temporaries of `out` (being written, being deleted) from a process that has exited, and
    # from one still running
    out = tmp_path / "artifact"
    argv = [sys.executable, "-c", MAKE_TEMPS, str(out)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    dead = subprocess.run(argv, input="", capture_output=True, text=True, env=env, check=True).stdout.split()
    live_proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        live = [live_proc.stdout.readline().strip() for _ in range(2)]
        # execute: the next write of `out` (any writer: a checkpoint, an export, a results file)
        replace_dir(temp_dir_for(out), out)
        # assert
        assert out.is_dir() and all(Path(p).is_dir() for p in live), "a live writer's work must be kept"
        assert not any(Path(p).exists() for p in dead), f"a dead writer's temporaries must be swept: {dead}"
    finally:
        live_proc.stdin.close()
        live_proc.wait()


def test_a_metrics_log_cut_short_by_a_kill_resumes_and_a_corrupt_one_is_named(tmp_path):
    # setup: a kill in the middle of an append leaves a last record without its newline
    records = [{"step": s, "loss": 5.0 - s / 10} for s in (1, 2, 3)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 4, "lo')
    # execute: a run resuming from the state of step 2
    history = Metrics(tmp_path, DistEnv(), resume_step=2).history
    # assert: the steps up to the state are kept, the rest (the torn one too) dropped from the file
    assert history == records[:2]
    assert path.read_text() == "".join(json.dumps(r) + "\n" for r in records[:2])
    path.write_text(json.dumps(records[0]) + "\n" + "garbage\n" + json.dumps(records[1]) + "\n")
    with pytest.raises(EdgesmithError, match=r"metrics.jsonl: line 2 is not a JSON record"):
        read_metrics(path)
