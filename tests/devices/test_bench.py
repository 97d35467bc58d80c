"""`edgesmith bench`: locally (a fresh process per artifact), over ssh to a real sshd on loopback
(agent zipapp pushed and run with the device's Python), and over adb (a FAKE adb on PATH that
checks the exact commands and answers with recorded llama-bench output)."""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from devices.agent import main as agent_main
from devices.bench import bench, format_table, plot_results, read_results, write_results
from models.errors import EdgesmithError
from edgesmith.cli import main
from toolchain.export.manifest import write_manifest

FAKE_ADB = Path(__file__).parent / "fake_adb"
SMALL = dict(prompt_len=16, gen_len=16, repeat=2)
STATS = ("prefill_tok_s", "decode_tok_s", "ttft_ms")


def check_result(r: dict, fmt: str, device: str) -> None:
    assert r["format"] == fmt and r["device"] == device and r["bytes"] > 0
    for key in STATS:
        s = r[key]
        assert 0 < s["min"] <= s["median"] <= s["max"], (key, s)
    assert r["decode_bound_tok_s"] > 0 and r["bytes_per_token"] > 0
    assert r["roofline_fraction"] == pytest.approx(r["decode_tok_s"]["median"] / r["decode_bound_tok_s"])


def test_local_bench_cli_writes_json_and_plot(artifact, tmp_path, capsys):
    # setup
    out = tmp_path / "bench" / "local.json"
    # execute
    code = main(["bench", str(artifact("gguf")), "--prompt-len", "16", "--gen-len", "16", "--repeat", "2",
                 "--json", str(out)])
    # assert
    assert code == 0
    [r] = read_results(out)
    check_result(r, "gguf", "local")
    assert r["peak_rss_mb"]["median"] > 50 and r["backend"] == "llamacpp"
    assert out.with_suffix(".png").stat().st_size > 1000
    assert "roofline" in capsys.readouterr().out
    assert sorted(p.name for p in out.parent.iterdir()) == ["local.json", "local.png"]


def test_ssh_bench_gguf_and_onnx(sshd, artifact, tmp_path):
    # execute: no profile for a bare URI, so the agent measures the device's bandwidth too
    lines = []
    results = bench([artifact("gguf"), artifact("onnx")], sshd.uri, ssh_options=sshd.options,
                    python=sys.executable, on_line=lines.append, **SMALL)
    # assert
    assert [r["format"] for r in results] == ["gguf", "onnx"]
    for r, fmt in zip(results, ("gguf", "onnx")):
        check_result(r, fmt, sshd.uri)
        assert r["runner"] == "agent" and r["bandwidth_bytes_s"] > 1e8
        assert r["verified_on_device"] == 4  # verify's checks ran there: the manifest and each of its 3 files
    table = format_table(results)
    assert "gguf" in table and "onnx" in table
    png = plot_results(results, tmp_path / "ssh.png")
    assert png.stat().st_size > 1000


def test_ssh_bench_timeout_leaves_no_results_file(sshd, artifact, tmp_path, monkeypatch, capsys):
    # setup: the CLI reads extra ssh options from the environment
    monkeypatch.setenv("EDGESMITH_SSH_OPTS", " ".join(sshd.options))
    out = tmp_path / "never.json"
    # execute: 1 s is enough to connect, never enough to push, load and time the artifact
    code = main(["bench", str(artifact("onnx")), "--device", sshd.uri, "--prompt-len", "16", "--gen-len", "16",
                 "--timeout", "1", "--json", str(out)])
    # assert
    assert code == 2
    assert "timed out after 1 s" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_dead_host_bench_leaves_no_results_file(artifact, tmp_path, capsys):
    from tests.devices.conftest import free_port

    out = tmp_path / "never.json"
    code = main(["bench", str(artifact("gguf")), "--device", f"ssh://nobody@127.0.0.1:{free_port()}",
                 "--prompt-len", "16", "--gen-len", "16", "--timeout", "20", "--json", str(out)])
    assert code == 2 and "unreachable" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_adb_bench_through_fake_adb(artifact, tmp_path, monkeypatch):
    # setup
    log, root = tmp_path / "adb.log", tmp_path / "device"
    root.mkdir()
    monkeypatch.setenv("PATH", f"{FAKE_ADB}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_ADB_LOG", str(log))
    monkeypatch.setenv("FAKE_ADB_ROOT", str(root))
    gguf = artifact("gguf")
    # execute
    [r] = bench([gguf], "adb://R5CW1234", prompt_len=16, gen_len=16, repeat=3)
    # assert: exactly these adb commands, in this order (the pull lands in a scratch directory, since removed)
    wd = "/data/local/tmp/edgesmith"
    issued = [json.loads(line) for line in log.read_text().splitlines()]
    files = sorted(json.loads((gguf / "manifest.json").read_text())["files"])
    assert issued[:4] == [
        ["-s", "R5CW1234", "shell", f"mkdir -p {wd}"],
        ["-s", "R5CW1234", "push", str(gguf), f"{wd}/"],
        ["-s", "R5CW1234", "shell", "sha256sum " + " ".join(f"{wd}/gguf/{f}" for f in files)],
        ["-s", "R5CW1234", "shell", f"/data/local/tmp/llama-bench -m {wd}/gguf/model.gguf -p 16 -n 16 -r 3 -o json "
                                    f"> {wd}/llama-bench-gguf.json"],
    ]
    assert len(issued) == 5 and issued[4][:4] == ["-s", "R5CW1234", "pull", f"{wd}/llama-bench-gguf.json"]
    assert not Path(issued[4][4]).exists()
    assert r["runner"] == "llama-bench" and r["peak_rss_mb"] is None
    assert r["decode_tok_s"] == {"median": 4000.0, "min": 3902.4, "max": 4102.6}  # the recorded samples_ts
    assert r["prefill_tok_s"]["median"] == 13333.3
    assert r["ttft_ms"]["median"] == pytest.approx(16 / 13333.3 * 1e3)
    assert r["decode_bound_tok_s"] is None  # a bare adb URI has no profile and no agent to measure


def test_adb_bench_runs_a_pte_with_executorchs_llama_runner(artifact, tmp_path, monkeypatch):
    # setup: the FAKE adb answers llama_main with made-up statistics (prefill 16 tokens in 10 ms, 15 in 50 ms)
    log, root = tmp_path / "adb.log", tmp_path / "device"
    root.mkdir()
    monkeypatch.setenv("PATH", f"{FAKE_ADB}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_ADB_LOG", str(log))
    monkeypatch.setenv("FAKE_ADB_ROOT", str(root))
    pte = artifact("executorch")
    # execute
    [r] = bench([pte], "adb://R5CW1234", prompt_len=16, gen_len=16, repeat=2, options={"n_threads": 4})
    # assert: pushed, checked, then llama_main once per repetition with a 15-token prompt (+ its BOS) of the
    # artifact's own tokenizer, greedy, seq_len = prompt + generated, the thread count as --cpu_threads
    wd = "/data/local/tmp/edgesmith"
    issued = [json.loads(line) for line in log.read_text().splitlines()]
    assert issued[1] == ["-s", "R5CW1234", "push", str(pte), f"{wd}/"] and issued[2][3].startswith("sha256sum ")
    runs = [c for c in issued if c[2] == "shell" and "llama_main" in c[3]]
    assert len(runs) == 2
    words = __import__("shlex").split(runs[0][3])
    assert words[:5] == ["/data/local/tmp/llama_main", "--model_path", f"{wd}/executorch/model.pte",
                         "--tokenizer_path", f"{wd}/executorch/tokenizer.json"]
    assert words[7:] == ["--seq_len", "32", "--temperature", "0", "--num_bos", "1", "--warmup", "--cpu_threads", "4",
                         ">", f"{wd}/llama-main-executorch-0.txt"]
    from models.tokenizer import Tokenizer
    assert len(Tokenizer.load(pte).encode(words[6])) == 15
    assert r["runner"] == "llama_main" and r["peak_rss_mb"] is None
    assert r["prefill_tok_s"]["median"] == pytest.approx(1600.0) and r["decode_tok_s"]["median"] == pytest.approx(300.0)
    assert r["ttft_ms"]["median"] == pytest.approx(11.0)


def test_adb_profile_gives_the_roofline_and_refuses_other_formats(artifact, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"{FAKE_ADB}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_ADB_LOG", str(tmp_path / "adb.log"))
    monkeypatch.setenv("FAKE_ADB_ROOT", str(tmp_path))
    [r] = bench([artifact("gguf")], "pixel-8", prompt_len=16, gen_len=16, repeat=3)
    assert r["device"] == "pixel-8" and r["roofline_fraction"] == pytest.approx(4000.0 / r["decode_bound_tok_s"])
    with pytest.raises(EdgesmithError, match="adb bench runs GGUF artifacts through llama-bench.*'onnx'"):
        bench([artifact("onnx")], "pixel-8", prompt_len=16, gen_len=16, repeat=3)


def test_bad_bench_input_one_line(artifact, tmp_path):
    with pytest.raises(EdgesmithError, match="--device 'moon'; allowed: local, a profile"):
        bench([artifact("gguf")], "moon")
    with pytest.raises(EdgesmithError, match="exceeds the artifact's max_seq_len 128"):
        bench([artifact("gguf")], prompt_len=100, gen_len=100)
    with pytest.raises(EdgesmithError, match="--repeat 0 must be a positive integer"):
        bench([artifact("gguf")], repeat=0)


def test_write_results_is_atomic(tmp_path):
    out = write_results([{"a": 1}], tmp_path / "r.json")
    assert read_results(out) == [{"a": 1}] and [p.name for p in tmp_path.iterdir()] == ["r.json"]
    with pytest.raises(TypeError):
        write_results([{"a": object()}], tmp_path / "bad.json")
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_adb_push_that_corrupts_a_byte_stops_before_the_run(artifact, tmp_path, monkeypatch, capsys):
    """sha256 is checked again on the device after the push: a flipped byte in transit is one line
    naming the file, llama-bench never runs on it, and no results file is written."""
    # setup: the FAKE adb flips one byte of model.gguf as it lands on the "device"
    log = tmp_path / "adb.log"
    monkeypatch.setenv("PATH", f"{FAKE_ADB}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_ADB_LOG", str(log))
    monkeypatch.setenv("FAKE_ADB_ROOT", str(tmp_path / "device"))
    monkeypatch.setenv("FAKE_ADB_CORRUPT_PUSH", "model.gguf")
    (tmp_path / "device").mkdir()
    out = tmp_path / "results.json"
    # execute
    code = main(["bench", str(artifact("gguf")), "--device", "adb://R5CW1234", "--prompt-len", "16", "--gen-len", "16",
                 "--repeat", "3", "--json", str(out)])
    # assert
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and err.startswith("edgesmith: error: adb://R5CW1234: /data/local/tmp/edgesmith/gguf/model.gguf ")
    assert "transfer corrupted it" in err and str(artifact("gguf") / "model.gguf") in err
    assert not any("llama-bench" in line for line in log.read_text().splitlines())
    assert not out.exists()


def test_ssh_push_that_corrupts_a_byte_stops_before_the_run(sshd, artifact, tmp_path, monkeypatch):
    """The same over a real sshd: the push is real, then one byte of the copy on the device is flipped
    (through the same ssh connection) before the check runs."""
    import devices.bench
    from devices.transports import SshTransport

    # setup
    class CorruptingPushTransport(SshTransport):  # the real ssh push, then a byte flipped on the device
        def push(self, local, remote_dir, timeout=600):
            remote = super().push(local, remote_dir, timeout)
            if Path(local).is_dir():
                flip = "p='{0}/model.onnx'; b=bytearray(open(p,'rb').read()); b[len(b)//2]^=255; open(p,'wb').write(b)"
                self.check(self.run([sys.executable, "-c", flip.format(remote)], 30), "flip")
            return remote

    monkeypatch.setattr(devices.bench, "transport_for", lambda uri, opts=(): CorruptingPushTransport(uri, opts))
    # execute
    with pytest.raises(EdgesmithError) as e:
        bench([artifact("onnx")], sshd.uri, ssh_options=sshd.options, python=sys.executable, **SMALL)
    # assert
    message = str(e.value)
    assert message.startswith(f"{sshd.uri}: /tmp/edgesmith-device-") and "/onnx/model.onnx is not the file pushed" in message
    assert str(artifact("onnx") / "model.onnx") in message and "\n" not in message


def test_remote_bench_refuses_a_local_artifact_that_fails_its_sha256(sshd, artifact, tmp_path):
    """Before the push, too: the artifact on this machine is checked against its manifest."""
    import shutil

    # setup
    bad = tmp_path / "gguf"
    shutil.copytree(artifact("gguf"), bad)
    data = bytearray((bad / "model.gguf").read_bytes())
    data[-1] ^= 0xFF
    (bad / "model.gguf").write_bytes(bytes(data))
    # execute / assert
    with pytest.raises(EdgesmithError, match=r"model\.gguf.*sha256"):
        bench([bad], sshd.uri, ssh_options=sshd.options, python=sys.executable, **SMALL)


# ----------------------------------------------------------------------------- runtime options (issue 19)


def test_bench_cli_runs_each_artifact_in_its_manifest_options_unless_told_otherwise(artifact, tmp_path, capsys):
    """By default a row runs what its export verified (manifest runtime_options: ONNX int4 at accuracy level 4,
    a quantized GGUF with flash attention); the flags override it, each for the artifacts whose backend has it."""
    # setup
    arts = [str(artifact("onnx-q4")), str(artifact("gguf-q4"))]
    small = ["--prompt-len", "16", "--gen-len", "16", "--repeat", "1"]
    # execute: defaults, then overridden
    default_code = main(["bench", *arts, *small, "--json", str(tmp_path / "default.json")])
    default_out = capsys.readouterr().out
    asked_code = main(["bench", *arts, *small, "--accuracy-level", "0", "--flash-attn", "on", "--threads", "1",
                       "--json", str(tmp_path / "asked.json")])
    asked_out = capsys.readouterr().out
    # assert
    assert default_code == 0 and asked_code == 0
    onnx, gguf = read_results(tmp_path / "default.json")
    assert onnx["run_options"]["accuracy_level"] == 4 and onnx["options"] == {}
    assert gguf["run_options"]["flash_attn"] is False and gguf["backend"] == "llamacpp"
    assert "accuracy_level=4" in default_out and "flash_attn=off" in default_out and "options" in default_out
    onnx, gguf = read_results(tmp_path / "asked.json")
    assert onnx["options"] == {"accuracy_level": 0, "n_threads": 1} and onnx["run_options"]["accuracy_level"] == 0
    assert gguf["options"] == {"flash_attn": True, "n_threads": 1} and gguf["run_options"]["flash_attn"] is True
    assert onnx["run_options"]["n_threads"] == gguf["run_options"]["n_threads"] == 1
    assert "accuracy_level=0 threads=1" in asked_out and "flash_attn=on" in asked_out


def test_an_option_no_artifact_takes_is_one_line_exit_2(artifact, tmp_path, capsys):
    # execute: llama.cpp's KV cache type asked of an ONNX artifact
    code = main(["bench", str(artifact("onnx-q4")), "--kv-cache", "f16", "--prompt-len", "16", "--gen-len", "16",
                 "--json", str(tmp_path / "never.json")])
    # assert
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("edgesmith: error: --kv-cache: no artifact of this bench takes it") and "onnxruntime" in err[0]
    assert not (tmp_path / "never.json").exists()


def test_a_bad_option_value_comes_back_from_the_agent_as_one_line(artifact):
    # execute / assert: the backend refuses the value inside the agent's process; the caller gets its line
    with pytest.raises(EdgesmithError) as e:
        bench([artifact("gguf-q4")], options={"kv_cache": "q8"}, **SMALL)
    assert str(e.value).startswith("kv_cache 'q8'; allowed: f32, f16") and "\n" not in str(e.value)


def test_ssh_agent_runs_the_options_it_is_given(sshd, artifact):
    # execute
    results = bench([artifact("onnx-q4"), artifact("gguf-q4")], sshd.uri, ssh_options=sshd.options,
                    python=sys.executable, options={"accuracy_level": 0, "n_threads": 1}, **SMALL)
    defaults = bench([artifact("onnx-q4")], sshd.uri, ssh_options=sshd.options, python=sys.executable, **SMALL)
    # assert: what the sessions on the device ran with came back with the results
    onnx, gguf = results
    assert onnx["run_options"] == {"n_threads": 1, "accuracy_level": 0}
    assert gguf["run_options"]["n_threads"] == 1 and gguf["run_options"]["flash_attn"] is False  # its manifest's
    assert defaults[0]["run_options"]["accuracy_level"] == 4
    # a value the device's backend refuses: one line, naming the device
    with pytest.raises(EdgesmithError) as e:
        bench([artifact("onnx-q4")], sshd.uri, ssh_options=sshd.options, python=sys.executable,
              options={"accuracy_level": 7}, **SMALL)
    assert str(e.value).startswith(f"{sshd.uri}: accuracy_level 7; allowed:") and "\n" not in str(e.value)


def test_adb_maps_options_onto_llama_bench_flags_and_records_what_it_ran(artifact, tmp_path, monkeypatch):
    # setup
    log, root = tmp_path / "adb.log", tmp_path / "device"
    root.mkdir()
    monkeypatch.setenv("PATH", f"{FAKE_ADB}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_ADB_LOG", str(log))
    monkeypatch.setenv("FAKE_ADB_ROOT", str(root))
    gguf = artifact("gguf-q4")
    # execute: threads from the caller, flash attention (off) and the fp16 KV cache from the manifest
    [r] = bench([gguf], "adb://R5CW1234", prompt_len=16, gen_len=16, repeat=3, options={"n_threads": 2})
    # assert
    run = [json.loads(line) for line in log.read_text().splitlines() if "llama-bench " in line][0]
    assert run[3].startswith("/data/local/tmp/llama-bench -m /data/local/tmp/edgesmith/gguf-q4/model.gguf -p 16 "
                             "-n 16 -r 3 -o json -t 2 -fa 0 -ctk f16 -ctv f16 >"), run
    assert r["run_options"] == {"n_threads": 2, "flash_attn": False, "kv_cache": "f16"}  # as llama-bench reported
    assert r["options"] == {"n_threads": 2} and r["threads"] == 2
    assert "flash_attn=off kv_cache=f16 threads=2" in format_table([r])
    # llama-bench has no accuracy level: refused before anything is pushed
    pushes = log.read_text().count('"push"')
    with pytest.raises(EdgesmithError, match="--accuracy-level: no artifact of this bench takes it .*llama-bench"):
        bench([gguf], "adb://R5CW1234", prompt_len=16, gen_len=16, repeat=3, options={"accuracy_level": 0})
    assert log.read_text().count('"push"') == pushes


def test_the_agent_verifies_before_it_loads_and_refuses_in_one_line(artifact, tmp_path, capsys):
    # setup: a copy whose GGUF header asks for 2^62 tensors, resealed so that only the header check can refuse it
    d = tmp_path / "gguf"
    shutil.copytree(artifact("gguf"), d)
    data = bytearray((d / "model.gguf").read_bytes())
    data[8:16] = (1 << 62).to_bytes(8, "little")
    (d / "model.gguf").write_bytes(bytes(data))
    write_manifest(d, json.loads((d / "manifest.json").read_text()))
    # execute: the agent as a device runs it
    code = agent_main([str(d), "--prompt-len", "4", "--gen-len", "2", "--repeat", "1"])
    # assert
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("edgesmith: error:") and "model.gguf" in err[0]
