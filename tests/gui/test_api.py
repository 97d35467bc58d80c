"""The same actions through `gradio_client`: every button has an api_name, so scripts reach the GUI's
train / compress / export / plan / generate / runs / cancel with the same checks (the workspace
guard included). Each job tab runs a recipe it writes into the workspace (gui/recipes.py)."""

import re
import time

import pytest

JOB_S = 120.0


@pytest.fixture(scope="module")
def client(gui_url):
    from gradio_client import Client

    return Client(gui_url, verbose=False)


def wait_done(client, api_name: str, job_id: str, *extra):
    deadline = time.monotonic() + JOB_S
    while time.monotonic() < deadline:
        out = client.predict(job_id, *extra, api_name=api_name)
        if any(f"**{s}**" in out[0] for s in ("done", "failed", "cancelled", "lost")):
            return out
        time.sleep(0.5)
    raise AssertionError(f"{api_name} {job_id}: not finished in {JOB_S} s: {out[0]}")


def test_endpoints_cover_every_tab(client):
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/train", "/train_status", "/compress", "/compress_status", "/export", "/export_status", "/plan",
            "/generate", "/runs", "/run", "/cancel", "/bench", "/bench_status", "/run_recipe"} <= names


def test_train_compress_export_through_the_api(client, gui_workspace):
    # train: a few steps of nano
    job, status, _ = client.predict("nano", "corpus", 6, 1, 2, 32, "runs/api-train", "", api_name="/train")
    assert "running" in status
    out = wait_done(client, "/train_status", job)
    assert "**done**" in out[0], out[3]
    plot = out[2]
    assert plot["columns"] == ["step", "loss"] and [r[0] for r in plot["data"]] == [1, 2, 3, 4, 5, 6]
    assert plot["datatypes"]["loss"] == "quantitative" and all(r[1] > 0 for r in plot["data"])
    assert (gui_workspace / "runs" / "api-train" / "checkpoints" / "00-train" / "edgesmith.json").is_file()
    assert "[source.train]" in (gui_workspace / "recipes" / "api-train.toml").read_text()
    assert (gui_workspace / "runs" / "api-train" / "report.html").is_file()  # the pipeline's report, for free
    # compress the fixture checkpoint: 8-bit RTN
    job, _, _ = client.predict("models/tiny", "rtn", 8, 32, "", "", "corpus", 32, 2048, "runs/api-q8", "",
                            api_name="/compress")
    out = wait_done(client, "/compress_status", job, "")
    assert "**done**" in out[0], out[4]
    rows = out[2]["data"]
    assert rows[0][0] == "quantize rtn" and rows[-1][0] == "total vs reference"
    assert float(rows[-1][6].rstrip(" %")) > 90  # same top p of an 8-bit model, in percent
    # export it to ONNX for a device profile
    job, _, _ = client.predict("runs/api-q8/checkpoints/01-quantize-rtn", ["onnx"], "fp32", 0, "raspberry-pi-5",
                            "runs/api-q8-export", "", api_name="/export")
    out = wait_done(client, "/export_status", job, "")
    assert "**done**" in out[0], out[5]
    parity = out[2]["data"]
    assert parity[0][0] == "onnx" and parity[0][2] == "onnxruntime" and parity[0][6] == "True"
    assert any(r[1] == "runs/api-q8-export/artifacts/onnx/model.onnx" for r in out[3]["data"])
    assert "target raspberry-pi-5" in out[4] and "decode bound" in out[4]


def test_paths_outside_the_workspace_are_refused(client, gui_workspace):
    for path in ("../outside/ckpt", "escape/ckpt", str(gui_workspace.parent / "outside" / "ckpt"), "/etc"):
        job, status, note = client.predict(path, "rtn", 4, 32, "", "", "corpus", 32, 2048, "runs/x", "",
                                           api_name="/compress")
        assert job == "" and "outside the workspace" in status and "Refused" in status, (path, status)
        assert note == status  # the note line keeps it (no poll writes there)
    _, status, _ = client.predict("models/tiny", ["gguf"], "fp32", 0, "", "../artifacts", "", api_name="/export")
    assert "outside the workspace" in status
    *_, status = client.predict("hi", "escape/ckpt", "none", 8, 0, "", "", 1.0, 0, api_name="/generate")
    assert "outside the workspace" in status
    assert not (gui_workspace.parent / "artifacts").exists()


def test_a_bad_recipe_value_is_refused_in_one_line_naming_the_key(client, gui_workspace):
    job, status, _ = client.predict("models/tiny", "rtn", 8, 32, "prune:method=heads,ratio=7", "", "corpus", 32, 2048,
                                 "runs/bad-ratio", "", api_name="/compress")
    assert job == "" and status.startswith("**Refused:**") and "ratio" in status and "\n" not in status, status
    assert not (gui_workspace / "runs" / "bad-ratio").exists()


def test_generate_streams_tokens(client):
    # a model with a long KV cache, 2000 tokens: seconds of decoding here, even through the fused kernels
    job = client.submit("def add(a, b):", "models/tiny-long", "none", 2000, 0, "", "", 1.0, 0, api_name="/generate")
    # the client patches values in place as differences arrive: follow the token count in the stats line
    counts = [int(re.search(r"(\d+) tokens", u[2]).group(1)) for u in job if "tokens" in u[2]]
    assert len(set(counts)) >= 10 and counts == sorted(counts)  # it streamed, in order
    final = job.outputs()[-1]
    assert "tok/s" in final[2] and "torch" in final[2] and final[4] == "Done."
    assert final[0].startswith("def add(a, b):") and len(final[0]) > len("def add(a, b):") + 10 and final[1] == ""
    # tokens faster than the page's update rate (25 a second) come in groups: fewer updates than tokens
    assert len(counts) < counts[-1], (len(counts), counts[-1])


def test_generate_refuses_bad_sampling_numbers_in_one_line(client):
    cases = [((96, "abc", "", "", 1.0, 0), "temperature: 'abc' is not a number"),
             ((96, -1, "", "", 1.0, 0), "temperature: '-1' must be >= 0"),
             ((96, 0.8, "0.5x", "", 1.0, 0), "top-k: '0.5x' is not a number"),
             ((96, 0.8, "", 1.5, 1.0, 0), "top-p: 1.5 must be in (0, 1] (1: no filter)"),
             ((96, 0.8, "", "", 0, 0), "repetition penalty: '0' must be > 0"),
             ((0, 0.8, "", "", 1.0, 0), "max new tokens: '0' must be >= 1")]
    for numbers, message in cases:
        a, b, stats_a, stats_b, status = client.predict("def add(a, b):", "models/tiny-gguf", "none", *numbers,
                                                        api_name="/generate")
        assert status == f"**Refused:** {message}" and (a, b, stats_a, stats_b) == ("", "", "", ""), (numbers, status)


def test_plan_and_runs(client):
    verdict, table, spec = client.predict("pixel-8", "nano", 1024, "4", api_name="/plan")
    assert "nano on pixel-8: fits" in verdict and "tok/s" in verdict
    assert any(r[0] == "max_context" for r in table["data"])
    verdict, table, _ = client.predict("pixel-8", "llama-3.2-1b", 0, "auto", api_name="/plan")  # a public shape
    assert "llama-3.2-1b on pixel-8" in verdict and any(r[0] == "max_context" for r in table["data"]), verdict
    runs, jobs = client.predict(api_name="/runs")
    assert any(j[1] == "train" for j in jobs["data"])
    summary, lineage, report, report_file = client.predict("runs/api-q8", api_name="/run")
    assert "compress_report.json" in summary and "models/tiny" in lineage and "quantize rtn 8-bit g32" in lineage
    assert report.startswith("<iframe") and "srcdoc=" in report and "data:image/png;base64," in report
    assert report_file and report_file.endswith("report.html")


def test_cancel_through_the_api(client):
    job, _, _ = client.predict("nano", "corpus", 100000, 1, 2, 32, "runs/api-long", "", api_name="/train")
    deadline = time.monotonic() + JOB_S
    while "train " not in client.predict(job, api_name="/train_status")[1]:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    status = client.predict(job, api_name="/cancel")
    assert "**cancelled**" in status


# ----------------------------------------------------------------------------- runtime options (issue 19)


@pytest.fixture(scope="module")
def onnx_q4(gui_workspace, artifact):
    """The runtime tests' ONNX int4 artifact (manifest runtime_options: accuracy_level 4), in the workspace."""
    import shutil

    dest = gui_workspace / "models" / "tiny-onnx-q4"
    if not dest.exists():
        shutil.copytree(artifact("onnx-q4"), dest)
    return "models/tiny-onnx-q4"


def test_playground_runs_the_manifest_options_or_the_accuracy_level_asked(client, onnx_q4):
    sampling = ("def add(a, b):", 8, 0, "", "", 1.0, 0)

    def stats(a, b, *runtime):
        out = client.predict(sampling[0], a, b, *sampling[1:], *runtime, api_name="/generate")
        assert out[4] == "Done.", out[4]
        return out[2], out[3]

    # default: the artifact's verified configuration
    default, _ = stats(onnx_q4, "none", "", "default", "default", "default")
    asked, _ = stats(onnx_q4, "none", "1", "0", "default", "default")
    # side by side with a GGUF: the accuracy level goes to the ONNX model, which each stats line shows
    a, b = stats(onnx_q4, "models/tiny-gguf", "", "0", "default", "off")
    assert "`onnxruntime`" in default and "accuracy_level=4" in default
    assert "accuracy_level=0 threads=1" in asked
    assert "accuracy_level=0" in a and "`llamacpp`" in b and "flash_attn=off" in b and "accuracy_level" not in b
    # an option neither model has: one line, nothing generated
    out = client.predict(sampling[0], onnx_q4, "none", *sampling[1:], "", "default", "fp16", "default",
                         api_name="/generate")
    assert out[4].startswith("**Refused:** --kv-cache: ") and "\n" not in out[4] and out[:4] == ("", "", "", "")


def test_benchmark_tab_shows_the_options_each_row_ran_with(client, onnx_q4):
    # execute: an ONNX int4 and a GGUF artifact, accuracy level 0 and one thread asked
    job, status, _ = client.predict([onnx_q4, "models/tiny-gguf"], "local", 8, 8, 1, "", "1", "0", "default",
                                    "default", api_name="/bench")
    assert job, status
    out = wait_done(client, "/bench_status", job, "")
    refused_job, refused, note = client.predict([onnx_q4], "local", 8, 8, 1, "", "", "default", "fp16", "default",
                                                api_name="/bench")
    # assert
    assert "**done**" in out[0], out[4]
    table = out[2]
    assert table["headers"][:4] == ["artifact", "format", "precision", "options"]
    rows = {r[0]: r[3] for r in table["data"]}
    assert rows["tiny-onnx-q4"] == "accuracy_level=0 threads=1", rows
    assert "threads=1" in rows["tiny-gguf"] and "accuracy_level" not in rows["tiny-gguf"], rows
    assert refused_job == "" and refused.startswith("**Refused:**") and "--kv-cache" in refused and note == refused
