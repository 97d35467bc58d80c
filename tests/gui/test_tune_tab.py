"""The Tune tab's actions without a browser: the form becomes an `edgesmith tune` job whose candidates, Pareto
plot and choice come back through the poll; a bad form value is one line and starts nothing."""

import shutil

import pytest

from gui.actions import Actions
from gui.tune_tab import tune_poll, tune_start
from tests.conftest import TEXT


@pytest.fixture
def act(tmp_path, checkpoints):
    a = Actions(tmp_path / "ws")
    shutil.copytree(checkpoints["float"], a.ws.root / "models" / "tiny")
    corpus = a.ws.root / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"doc{i}.txt").write_text(TEXT[(13 * i) % 200:] + TEXT[: (13 * i) % 200])
    return a


def test_the_tune_tab_runs_tune_and_shows_candidates_and_the_plot(act):
    # execute
    job_id, status = tune_start(act, "models/tiny", "local", "0.1", "", "", ["gguf"], "rtn", 2, "", "corpus")
    assert job_id, status
    job = act.jobs.wait(job_id, timeout_s=600)
    status, bar, table, plot, log, key = tune_poll(act, job_id)
    # assert
    assert job.status == "done", act.jobs.log(job_id, 40)
    assert list(table.columns)[:4] == ["", "candidate", "size MB", "mean KLD"] and len(table) >= 2
    assert (table[""] == "chosen").sum() == 1 and table["candidate"].iloc[0] == "4-bit x4"
    assert plot and plot.endswith("pareto.png")
    assert (act.ws.root / "tune" / "tiny-local" / "recipe.toml").is_file() and not (act.ws.root / "runs").exists()


@pytest.mark.parametrize("field, value, message", [
    (2, "abc", "max size: 'abc' is not a number"), (4, "-1", "max KLD: '-1' must be > 0"),
    (0, "../outside", "is outside the workspace")])
def test_a_bad_form_value_is_one_line_and_starts_nothing(act, field, value, message):
    form = ["models/tiny", "local", "", "", "", ["gguf"], "rtn", 2, "", "corpus"]
    form[field] = value
    job_id, status = tune_start(act, *form)
    assert job_id == "" and message in status and "\n" not in status.strip()
    assert act.jobs.list() == []
