"""Keep a long-running `edgesmith gui` bounded in memory: prune what Gradio keeps per event and per session.

Gradio 6.17 keeps for the life of the server: every event, with its request and its inputs, in the
queue's `event_ids_to_events`; an analytics row per event in `event_analytics`; the asyncio task
that ran each event (`_asyncio_tasks`); an entry per session in `pending_event_ids_session`; the
last-use time of every session; the id of every cancelled event (`iterators_to_reset`); and per
session a `SessionState`, a copy of the app's configuration (about 300 KB for this app) up to
`state_session_capacity` sessions (10000 by default: 3 GB); a message queue per session (about
5 KB) for the last 2000 sessions.

`serve` (gui/server.py) passes `state_session_capacity=max_sessions()` and the `lifespan` below,
which starts a task in the server's event loop that calls `prune` every PRUNE_S seconds. Gradio
changes these structures in that loop, so pruning there does not interleave with its changes (and
each structure is copied before it is walked).
Only what is finished goes: an event still queued, running, or whose result its client has not
read yet is kept, with its analytics row. A session's own records (its set of pending events, its
message queue) go only once Gradio has dropped the session's state, and only when it has no such
event, nothing waits on its queue (no open stream) and nothing is in it: dropping the queue of a
session in use can cut its open stream (its page then waits forever). Nothing else (files, jobs) is
touched here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os

from models.errors import EdgesmithError

PRUNE_S = 2.0
MAX_ANALYTICS = 200  # newest analytics rows kept (only Gradio's monitoring page reads them; it is off)
DEFAULT_MAX_SESSIONS = 64  # browser/API sessions whose Gradio state is kept (~300 KB each)
SESSIONS_ENV = "EDGESMITH_GUI_SESSIONS"


def max_sessions() -> int:
    """How many sessions' Gradio state is kept: EDGESMITH_GUI_SESSIONS, default 64. The oldest
    session beyond it loses its state (its page shows the defaults again on its next event)."""
    text = os.environ.get(SESSIONS_ENV, "")
    if not text:
        return DEFAULT_MAX_SESSIONS
    if not text.isdigit() or int(text) < 1:
        raise EdgesmithError(f"{SESSIONS_ENV}: {text!r} must be a whole number >= 1")
    return int(text)


def _live_events(queue) -> set[str]:
    live = set()
    for event_queue in list(queue.event_queue_per_concurrency_id.values()):
        live.update(e._id for e in list(event_queue.queue))
    for job in list(queue.active_jobs):
        live.update(e._id for e in job or ())
    for ids in list(queue.pending_event_ids_session.values()):
        live.update(ids)
    return live


def prune(app) -> dict[str, int]:
    """Drop what Gradio keeps of finished events and forgotten sessions; returns the counts dropped."""
    queue = app.get_blocks()._queue
    live = _live_events(queue)
    dropped = {"events": 0, "analytics": 0, "tasks": 0, "sessions": 0, "queues": 0, "last_used": 0, "resets": 0}
    for event_id in [e for e in list(queue.event_ids_to_events) if e not in live]:
        queue.event_ids_to_events.pop(event_id, None)
        dropped["events"] += 1
    old = [e for e in list(queue.event_analytics) if e not in live]
    for event_id in old[:max(0, len(old) - MAX_ANALYTICS)]:  # insertion order: oldest first
        queue.event_analytics.pop(event_id, None)
        dropped["analytics"] += 1
    running = [t for t in queue._asyncio_tasks if not t.done()]
    dropped["tasks"] = len(queue._asyncio_tasks) - len(running)
    queue._asyncio_tasks[:] = running
    # a session's own records go once Gradio has dropped its state (the oldest beyond the capacity):
    # a page in use sends an event every second (its timer), which keeps its state among the newest
    holder = app.state_holder
    kept = set(list(holder.session_data))
    for session, ids in list(queue.pending_event_ids_session.items()):
        if not ids and session not in kept:
            queue.pending_event_ids_session.pop(session, None)
            dropped["sessions"] += 1
    for session, messages in list(queue.pending_messages_per_session.items()):
        if session not in kept and not queue.pending_event_ids_session.get(session) and messages.empty() \
                and not messages._getters:
            queue.pending_messages_per_session.pop(session, None)
            dropped["queues"] += 1
    for session in [s for s in list(holder.time_last_used) if s not in holder.session_data]:
        holder.time_last_used.pop(session, None)
        dropped["last_used"] += 1
    stale = [e for e in list(app.iterators_to_reset) if e not in queue.event_ids_to_events]
    app.iterators_to_reset.difference_update(stale)
    dropped["resets"] = len(stale)
    return dropped


async def _pruning(app) -> None:
    while True:
        await asyncio.sleep(PRUNE_S)
        try:
            prune(app)
        except Exception as e:  # a Gradio whose internals moved: say so once, keep serving
            print(f"edgesmith gui: warning: cannot bound Gradio's per-event memory ({type(e).__name__}: {e})",
                  flush=True)
            return


@contextlib.asynccontextmanager
async def lifespan(app):
    """The FastAPI lifespan (launch(app_kwargs={"lifespan": lifespan})): the pruning task runs while
    the server does."""
    task = asyncio.create_task(_pruning(app))
    try:
        yield
    finally:
        task.cancel()
