"""`edgesmith gui`: check the options, confine the process to the workspace, launch the app.

Safe defaults: binds 127.0.0.1 unless told otherwise, never creates a public share link, analytics
and telemetry off (gui/__init__.py), authentication when `--auth USER:PASS` (or the
EDGESMITH_GUI_AUTH variable) is given, uploads limited in size, and Gradio's upload/cache folder,
edgesmith's caches and matplotlib's inside the workspace. The password is never printed or logged
and background jobs do not inherit the variable (toolchain.jobs.SECRET_ENV). Memory stays bounded
however long it serves (gui/bounds.py: Gradio's per-session state and per-event records), and
Gradio's cached copies of uploads and shown files are deleted after a day (gui/app.py CACHE_S).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import gui  # noqa: F401  (analytics and telemetry off before Gradio is imported)
from gui import bounds
from models.errors import EdgesmithError

LOOPBACK = ("127.0.0.1", "localhost", "::1")
DEFAULT_MAX_UPLOAD = "100mb"


def parse_auth(text: str | None) -> tuple[str, str] | None:
    """`USER:PASS` -> (user, password). The error never repeats the value (it holds a password)."""
    if text is None or text == "":
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise EdgesmithError("--auth: expected USER:PASS with a non-empty user and password")
    return user, password


def confine(workspace: Path) -> None:
    """Point Gradio's upload/cache folder and our caches into the workspace, before Gradio loads."""
    os.environ["GRADIO_TEMP_DIR"] = str(workspace / ".gradio")
    os.environ["EDGESMITH_CACHE"] = str(workspace / ".cache" / "edgesmith")
    os.environ["MPLCONFIGDIR"] = str(workspace / ".cache" / "matplotlib")
    # Gradio recomputes a summary table over every event it ever saw after each event, for a monitoring
    # page that is off here: never (gui/bounds.py prunes the rows themselves)
    os.environ["GRADIO_ANALYTICS_CACHE_FREQUENCY"] = str(10**12)


def serve(workspace: str | Path = ".", host: str = "127.0.0.1", port: int = 7860, auth: str | None = None,
          max_file_size: str | int = DEFAULT_MAX_UPLOAD) -> None:
    if not 0 < int(port) < 65536:
        raise EdgesmithError(f"--port: {port} must be in 1..65535")
    credentials = parse_auth(auth if auth is not None else os.environ.get("EDGESMITH_GUI_AUTH"))
    sessions = bounds.max_sessions()
    os.environ.pop("EDGESMITH_GUI_AUTH", None)
    ws = Path(workspace).expanduser()
    if ws.exists() and not ws.is_dir():
        raise EdgesmithError(f"--workspace: {ws} is not a directory")
    ws.mkdir(parents=True, exist_ok=True)
    ws = ws.resolve()
    confine(ws)
    if host not in LOOPBACK and credentials is None:
        print(f"edgesmith gui: warning: listening on {host} without --auth: anyone who reaches this port can "
              "train, export and read the workspace", file=sys.stderr)
    # Gradio (and gui.app, which imports it) only after confine(): Gradio reads GRADIO_TEMP_DIR at import
    import gradio as gr

    from gui.app import CSS, build_app

    demo = build_app(ws)
    print(f"edgesmith gui: workspace {ws}" + (f", login required (user {credentials[0]})" if credentials else ""),
          flush=True)
    demo.queue(default_concurrency_limit=4).launch(
        server_name=host, server_port=int(port), share=False, auth=credentials, max_file_size=max_file_size,
        allowed_paths=[str(ws)], show_error=True, ssr_mode=False, pwa=False, mcp_server=False,
        enable_monitoring=False, inbrowser=False, footer_links=["api"], state_session_capacity=sessions,
        app_kwargs={"lifespan": bounds.lifespan}, css=CSS,
        theme=gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                                font_mono=["ui-monospace", "monospace"]))
