"""One running `edgesmith gui` for the GUI tests: a subprocess on a free port, with a temporary
workspace holding a small corpus, a trained tiny checkpoint and its GGUF artifact (the runtime
tests' fixtures, copied in), and a symlink that points out of the workspace (tests/gui/harness.py)."""

import pytest

from tests.gui.harness import REPO, fill_workspace, start_gui, stop_gui

SCREENSHOTS = REPO / "test-output" / "gui"


@pytest.fixture(scope="session")
def gui_workspace(tmp_path_factory, checkpoints, artifact):  # noqa: F811
    return fill_workspace(tmp_path_factory.mktemp("gui") / "workspace", checkpoints, artifact)


@pytest.fixture(scope="session")
def gui_url(gui_workspace):
    proc, url, _ = start_gui(gui_workspace)
    yield url
    stop_gui(proc, gui_workspace)


@pytest.fixture(scope="session")
def screenshots():
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS
