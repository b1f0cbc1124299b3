"""Background worker threads that never keep their owner alive.

The engine's prefetch thread and the CPU device's link thread share this shape: the
thread holds only a weak reference to its owner, so an owner nobody closed is still
collected, and the owner's finalizer stops and joins the thread.
"""

from __future__ import annotations

import queue
import threading
import weakref
from typing import Any, Callable


def start_worker(owner: Any, jobs: queue.Queue, handle: Callable[[Any, Any], None], name: str) -> threading.Thread:
    """Start a daemon thread calling ``handle(owner, job)`` for each job until ``None``.

    Returns the thread; pair it with ``weakref.finalize(owner, stop_worker, jobs, thread)``.
    """
    thread = threading.Thread(target=_run, args=(jobs, weakref.ref(owner), handle), name=name, daemon=True)
    thread.start()
    return thread


def stop_worker(jobs: queue.Queue, thread: threading.Thread) -> None:
    """Ask a worker thread to finish and wait for it (not from the worker itself).

    Run at garbage collection and at interpreter exit: a worker woken while the interpreter
    is shutting down would be killed inside C++ frames (std::terminate), so it is joined
    while Python still runs.
    """
    jobs.put(None)
    if thread is not threading.current_thread() and thread.is_alive():
        thread.join(timeout=10)


def _run(jobs: queue.Queue, owner_ref: "weakref.ref[Any]", handle: Callable[[Any, Any], None]) -> None:
    while True:
        job = jobs.get()
        if job is None:
            return
        owner = owner_ref()
        if owner is None:
            return
        handle(owner, job)
        del owner
