"""The one pool of worker threads that searches share: exact flat search (its chunk maxima)
and list-batched IVF search (its lists) split a call's work between the calling thread and
these. numpy and the numba kernel release the GIL, so threads use the CPUs."""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

# Threads a search uses, the calling one included: the CPUs this process may run on, at most 4.
WORKERS = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
_executor: tuple[int, ThreadPoolExecutor] | None = None
_executor_lock = threading.Lock()


def worker_pool() -> ThreadPoolExecutor | None:
    """The WORKERS - 1 threads beside the calling one (None on one CPU); a forked child gets its
    own (its parent's threads did not come along)."""
    global _executor
    if WORKERS < 2:
        return None
    with _executor_lock:
        if _executor is None or _executor[0] != os.getpid():
            _executor = (os.getpid(), ThreadPoolExecutor(WORKERS - 1, thread_name_prefix="vismem-search"))
        return _executor[1]
