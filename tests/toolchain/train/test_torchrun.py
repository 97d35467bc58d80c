"""`toolchain.train.torchrun`: torchrun's own failure report (a traceback and a box of fields) is held
back unless EDGESMITH_DEBUG is set; the exit status is the failed rank's."""

import os
import subprocess
import sys

import pytest

FAILING_RANK = """
import os, sys
if os.environ["RANK"] == "1":
    print("edgesmith: error: rank one refuses", file=sys.stderr)
    sys.exit(2)
"""


@pytest.mark.parametrize("debug", [False, True])
def test_a_failed_rank_is_its_own_line_and_status(debug, tmp_path):
    # setup
    script = tmp_path / "rank.py"
    script.write_text(FAILING_RANK)
    env = {k: v for k, v in os.environ.items() if k != "EDGESMITH_DEBUG"}
    env.update(OMP_NUM_THREADS="1", **({"EDGESMITH_DEBUG": "1"} if debug else {}))
    # execute
    r = subprocess.run([sys.executable, "-m", "toolchain.train.torchrun", "--standalone", "--nproc-per-node=2",
                        str(script)], capture_output=True, text=True, timeout=120, env=env)
    # assert
    output = r.stdout + r.stderr
    assert "edgesmith: error: rank one refuses" in output
    if debug:
        assert r.returncode != 0 and "ChildFailedError" in output
    else:
        assert r.returncode == 2, output
        assert "Traceback" not in output and "ChildFailedError" not in output
        assert [line for line in output.splitlines() if line.strip()] == ["edgesmith: error: rank one refuses"]
