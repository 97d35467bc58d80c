"""torchrun for our ranks, without its own failure report.

`python -m toolchain.train.torchrun ARGS` is `torchrun ARGS`, except that when a rank fails it exits
with that rank's status instead of raising torchrun's ChildFailedError report (a traceback and a box
of fields): each rank has printed its own one-line `edgesmith: error: ...` already. With
EDGESMITH_DEBUG=1 torchrun's report and its elastic-agent log lines are printed as usual.
"""

from __future__ import annotations

import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun, parse_args, run

    argv = sys.argv[1:] if argv is None else argv
    os.environ["EDGESMITH_TORCHRUN_PID"] = str(os.getpid())  # the ranks die with this process (launch.py)
    if os.environ.get("EDGESMITH_DEBUG", "").lower() in ("1", "true", "yes", "on"):
        torchrun(argv)
        return 0
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(parse_args(argv))
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        return failure.exitcode if failure.exitcode and failure.exitcode > 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
