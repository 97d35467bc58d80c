"""`edgesmith gui`: the Gradio app over the workspace."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> None:
    # gradio takes seconds to import and only this command needs it: imported here, not at the top
    from gui.server import serve

    serve(workspace=args.workspace, host=args.host, port=args.port, auth=args.auth, max_file_size=args.max_upload)


def register(sub) -> None:
    ui = sub.add_parser("gui", help="the Gradio app: every step in a browser (binds 127.0.0.1 by default)")
    ui.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    ui.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    ui.add_argument("--workspace", default=".", metavar="DIR", help="the only directory the app reads and writes "
                    "(default: the current directory)")
    ui.add_argument("--auth", default=None, metavar="USER:PASS", help="require a login (or set EDGESMITH_GUI_AUTH, "
                    "which keeps the password out of the process list)")
    ui.add_argument("--max-upload", default="100mb", metavar="SIZE", help="largest upload, e.g. 20mb (default 100mb)")
    ui.set_defaults(func=run)
