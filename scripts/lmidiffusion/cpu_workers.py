"""Threads for the LMI layer on the CPU: one intra-op thread, and independent chunks spread over helper threads.

The layer's ops are many and small; under OpenMP each ends in a barrier, and on a shared, busy CPU a barrier waits
for a descheduled thread (docs/method.md, "Computing LMI fast", step 5).
"""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

# Upper bound on the CPU threads used for independent chunks (see cpu_threading).
MAX_CPU_WORKERS = 8
_THREAD_STATE = threading.local()


@contextlib.contextmanager
def cpu_threading(device: torch.device):
    """On the CPU: one intra-op thread, and as many chunk workers as the caller had intra-op threads.

    The layer's ops are many and small (~1 MB chunks); with OpenMP each one ends in a barrier, and on a shared,
    busy CPU a barrier waits for a descheduled thread, which can make a call many times slower (docs/method.md,
    "Computing LMI fast"). Independent chunks on plain threads do not wait on each other. The caller's setting is
    restored on exit (``torch.set_num_threads`` is scoped to the call); nested uses keep the outermost setting.
    """
    if device.type != "cpu":
        yield 1
        return
    active = getattr(_THREAD_STATE, "workers", None)
    if active is not None:
        yield active
        return
    threads = torch.get_num_threads()
    _THREAD_STATE.workers = max(1, min(threads, MAX_CPU_WORKERS))
    torch.set_num_threads(1)
    try:
        yield _THREAD_STATE.workers
    finally:
        _THREAD_STATE.workers = None
        torch.set_num_threads(threads)


_POOL: tuple[int, ThreadPoolExecutor] | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    """Persistent helper threads for :func:`run_tasks` (recreated in a forked child, which inherits none)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL[0] != os.getpid():  # a forked child inherits no threads
            _POOL = (os.getpid(), ThreadPoolExecutor(MAX_CPU_WORKERS - 1, thread_name_prefix="lmi"))
        return _POOL[1]


def run_tasks(fn, tasks: list, workers: int) -> None:
    """Calls ``fn(task)`` for every task, on ``workers`` threads that pull tasks in order (one intra-op thread each)."""
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            fn(task)
        return
    lock = threading.Lock()
    pending = iter(tasks)
    errors: list[BaseException] = []
    # grad and inference modes are thread-local: a helper thread would otherwise record a graph, or refuse to
    # write into the caller's inference tensors
    grad_enabled, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def loop() -> None:
        torch.set_num_threads(1)  # OpenMP/MKL thread counts are per thread (the caller restores its own on exit)
        with torch.inference_mode(inference), torch.set_grad_enabled(grad_enabled):
            while not errors:
                with lock:
                    task = next(pending, None)
                if task is None:
                    return
                try:
                    fn(task)
                except BaseException as exc:  # re-raised in the calling thread
                    errors.append(exc)

    helpers = [_pool().submit(loop) for _ in range(min(workers, len(tasks)) - 1)]
    loop()
    for future in helpers:
        future.result()
    if errors:
        raise errors[0]
