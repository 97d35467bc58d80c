"""The trainer as users run it: real torchrun ranks on gloo, SIGKILL and --resume, bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models.checkpoint import load_checkpoint
from edgesmith.cli import main
from toolchain.train.launch import usable_cores

from .conftest import edgesmith

COMMON = ("--batch-size", 4, "--seq-len", 32, "--lr", 3e-3, "--warmup", 2)


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_process_ddp_matches_one_process_at_the_same_global_batch(tiny_json, corpus, tmp_path):
    # setup / execute
    one = edgesmith("train", "--model", tiny_json, "--data", corpus, "--steps", 20, *COMMON, "--out", tmp_path / "one")
    two = edgesmith("train", "--model", tiny_json, "--data", corpus, "--steps", 20, *COMMON, "--nproc", 2,
                    "--out", tmp_path / "two")
    # assert
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 20
    assert a[-1] < a[0] - 0.5  # it trains
    assert max(abs(x - y) / abs(x) for x, y in zip(a, b)) <= 1e-4
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["world_size"] == 2
    assert (tmp_path / "two" / "loss.png").stat().st_size > 1000


def test_two_process_fsdp_trains_and_its_checkpoint_loads_in_one_process(tiny_json, corpus, tmp_path):
    # setup / execute
    run = edgesmith("train", "--model", tiny_json, "--data", corpus, "--steps", 12, *COMMON, "--nproc", 2,
                    "--strategy", "fsdp", "--grad-ckpt", "--save-every", 12, "--out", tmp_path / "fsdp")
    assert run.returncode == 0, run.stderr
    probe = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(Path(__file__).parent / "fsdp_logits.py"), tiny_json, tmp_path / "fsdp", tmp_path / "logits.safetensors"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert probe.returncode == 0, probe.stderr
    # assert: the sharded model's logits equal those of the HF checkpoint loaded in one process
    assert losses(tmp_path / "fsdp")[-1] < losses(tmp_path / "fsdp")[0] - 0.3
    sharded = load_file(str(tmp_path / "logits.safetensors"))["logits"]
    model = load_checkpoint(tmp_path / "fsdp" / "checkpoint").model
    torch.set_num_threads(1)
    with torch.no_grad():
        single = model(torch.arange(64).remainder(300).view(2, 32))
    assert torch.equal(single, sharded)


def test_sigkill_then_resume_is_bitwise_equal_to_an_uninterrupted_run(tiny_json, corpus, tmp_path):
    # setup
    args = ("train", "--model", tiny_json, "--data", corpus, "--steps", 60, *COMMON, "--save-every", 10, "--keep", 2)
    full = edgesmith(*args, "--out", tmp_path / "full")
    assert full.returncode == 0, full.stderr
    # execute: kill -9 once step 25 is logged (the newest complete state is then step 20)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "edgesmith", *map(str, args), "--out", tmp_path / "cut"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    metrics = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 25:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    assert proc.wait() == -signal.SIGKILL, "the run must be killed mid-way"
    assert not (tmp_path / "cut" / "checkpoint").exists()
    states = sorted(p.name for p in (tmp_path / "cut" / "state").iterdir() if not p.name.startswith("."))
    assert 1 <= len(states) <= 2 and states[-1] < "step-00000060"
    resumed = edgesmith(*args, "--out", tmp_path / "cut", "--resume")
    # assert
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    a = load_file(str(tmp_path / "full" / "checkpoint" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "checkpoint" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "full") == losses(tmp_path / "cut")
    kept = sorted(p.name for p in (tmp_path / "full" / "state").iterdir())
    assert kept == ["step-00000050", "step-00000060"]  # --keep 2


def _ranks_of(run: Path) -> list[int]:
    """pids of the ranks training into `run`: their command line names it, without the launcher's --nproc."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        launcher = b"--nproc" in cmd or b"torch.distributed.run" in cmd
        if proc.name.isdigit() and str(run).encode() in cmd and not launcher:
            pids.append(int(proc.name))
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux's prctl")
def test_sigkill_of_the_launcher_stops_its_ranks(tiny_json, corpus, tmp_path):
    # setup: a 2-rank run far longer than the test
    out = tmp_path / "run"
    args = ("train", "--model", tiny_json, "--data", corpus, "--steps", 100000, *COMMON, "--nproc", 2, "--out", out)
    proc = subprocess.Popen([sys.executable, "-m", "edgesmith", *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").is_file() and len(_ranks_of(out)) >= 2):
        time.sleep(0.1)
    assert len(_ranks_of(out)) >= 2, "the ranks must be training"
    # execute: kill -9 the `edgesmith` process (torchrun's parent), as a crash or the OOM killer would
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # assert: no rank goes on writing into the run
    deadline = time.time() + 60
    while time.time() < deadline and _ranks_of(out):
        time.sleep(0.2)
    left = _ranks_of(out)
    for pid in left:  # a failing run must not leave them training
        os.kill(pid, signal.SIGKILL)
    assert left == []


@pytest.fixture(scope="module")
def nano_state(tmp_path_factory, corpus):
    """A finished 2-step run of a different model (vocab 384), to resume from by mistake."""
    out = tmp_path_factory.mktemp("other")
    cfg = out / "other.json"
    cfg.write_text(json.dumps({"vocab_size": 384, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                               "ffn_dim": 128, "max_seq_len": 64}))
    assert main(["train", "--model", str(cfg), "--data", str(corpus), "--steps", "2", "--batch-size", "2",
                 "--seq-len", "32", "--save-every", "2", "--out", str(out / "run")]) == 0
    return out / "run"


@pytest.mark.parametrize("args, message", [
    (["--model", "huge"], "unknown model size 'huge'; allowed: nano, micro, small"),
    (["--data", "{tmp}/missing"], "missing: no such file or directory (corpus)"),
    (["--batch-size", "3", "--nproc", "2"], "--batch-size: 3 does not divide into 2 process(es) x 1 accumulation"),
    (["--batch-size", "4", "--grad-accum", "3"], "--batch-size: 4 does not divide into 1 process(es) x 3"),
    (["--precision", "fp8"], "--precision: 'fp8' is not supported; allowed: fp32, bf16"),
    (["--strategy", "zero"], "--strategy: 'zero' is not supported; allowed: ddp, fsdp"),
    (["--resume"], "--resume: {tmp}/out/state holds no training-state checkpoint"),
])
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, corpus, args, message):
    before = sorted(tmp_path.rglob("*"))
    argv = ["train", "--data", str(corpus), "--steps", "2", "--out", str(tmp_path / "out")]
    assert main(argv + [a.format(tmp=tmp_path) for a in args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message.format(tmp=tmp_path) in lines[0], lines
    assert sorted(tmp_path.rglob("*")) == before, "nothing written"


def test_resuming_another_models_state_is_refused(nano_state, tiny_json, corpus, capsys):
    argv = ["train", "--model", str(tiny_json), "--data", str(corpus), "--steps", "4", "--batch-size", "2",
            "--seq-len", "32", "--out", str(nano_state), "--resume"]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "was made by another model (vocab_size differ)" in lines[0], lines


def test_more_ranks_than_cores_warns_and_runs(tiny_json, corpus, tmp_path):
    n = usable_cores() + 1
    run = edgesmith("train", "--model", tiny_json, "--data", corpus, "--steps", 2, "--batch-size", n,
                    "--seq-len", 32, "--nproc", n, "--out", tmp_path / "over")
    assert run.returncode == 0, run.stderr
    assert f"warning: --nproc {n} is more than the {usable_cores()} usable CPU cores" in run.stderr
    assert json.loads((tmp_path / "over" / "summary.json").read_text())["world_size"] == n
