"""The Playground's session pool (gui/sessions.py) over real sessions: each stream has its own, a
request takes all it needs at once, idle ones are kept up to the bound, a failed load frees its slot."""

import threading
import time

import pytest

import runtimes
from gui.sessions import SessionPool
from models.errors import EdgesmithError


def test_each_borrower_gets_its_own_session_and_idle_ones_are_reused(checkpoints):
    # setup
    pool, loads = SessionPool(keep=4, copies=2, wait_s=0.5), []

    def load(path):
        loads.append(path)
        return runtimes.load(path)

    # execute
    (_, a), (_, b) = lent = pool.borrow([checkpoints["float"]] * 2, load)
    with pytest.raises(EdgesmithError, match="busy"):
        pool.borrow([checkpoints["float"]], load)  # both copies are out
    pool.give_back(lent)
    (_, again), = pool.borrow([checkpoints["float"]], load)
    # assert
    assert a is not b and again in (a, b) and len(loads) == 2 and pool.loaded() == 2


def test_a_request_waits_for_all_it_needs_then_gets_it(checkpoints):
    # setup: one copy out; a request for two copies of the same model must wait for it
    pool = SessionPool(keep=4, copies=2, wait_s=30)
    first = pool.borrow([checkpoints["float"]], runtimes.load)
    got = []
    waiter = threading.Thread(target=lambda: got.append(pool.borrow([checkpoints["float"]] * 2, runtimes.load)))
    # execute
    waiter.start()
    time.sleep(0.5)
    waiting = not got
    pool.give_back(first)
    waiter.join(timeout=30)
    # assert
    assert waiting and len(got) == 1 and len({id(s) for _, s in got[0]}) == 2


def test_idle_sessions_beyond_the_bound_are_closed_least_recently_used_first(checkpoints, artifact):
    # setup
    pool = SessionPool(keep=2, copies=2)
    gguf = pool.borrow([artifact("gguf")], runtimes.load)
    pool.give_back(gguf)
    # execute: two more models; the GGUF session is the least recently used
    pool.give_back(pool.borrow([checkpoints["float"], checkpoints["q4"]], runtimes.load))
    # assert: two left loaded, the llama.cpp context of the closed one freed
    assert pool.loaded() == 2 and gguf[0][1]._ctx is None


def test_a_failed_load_frees_its_slot(checkpoints, tmp_path):
    # setup
    pool = SessionPool(keep=4, copies=2, wait_s=0.5)
    # execute
    with pytest.raises(EdgesmithError):
        pool.borrow([checkpoints["float"], tmp_path / "missing"], runtimes.load)
    lent = pool.borrow([checkpoints["float"]] * 2, runtimes.load)  # both copies free again
    # assert
    assert len(lent) == 2 and pool.loaded() == 2
