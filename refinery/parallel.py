"""Per-file parallelism shared by the stages: files are independent, so each goes to a worker
process — or, with `run-all --executor ray`, to a Ray task (refinery.executors) — and the results
come back in job order, whatever order the workers finish in."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, TypeVar

R = TypeVar("R")


def map_files(fn: Callable[..., R], jobs: Sequence[tuple[Any, ...]], sizes: Sequence[int], *,
              workers: int, parallel_min_bytes: int,
              initializer: Callable[..., None] | None = None, initargs: tuple[Any, ...] = (),
              on_done: Callable[[R, int], None] | None = None) -> list[R]:
    """`[fn(*job) for job in jobs]`, in worker processes when the input is large enough.

    `sizes[i]` is job i's input size in bytes: it decides whether workers pay off and lets the
    largest jobs start first. `on_done(result, size)` is called as each job finishes.
    """
    from refinery import executors

    cluster = executors.current()
    if cluster is not None and jobs and sum(sizes) >= parallel_min_bytes:  # run-all --executor ray
        return cluster.map(fn, jobs, sizes, initializer, initargs, on_done)
    results: list[Any] = [None] * len(jobs)
    workers = min(workers or os.cpu_count() or 1, len(jobs))
    if workers <= 1 or sum(sizes) < parallel_min_bytes:
        if initializer:
            initializer(*initargs)
        for i, job in enumerate(jobs):
            results[i] = fn(*job)
            if on_done:
                on_done(results[i], sizes[i])
        return results
    with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker,
                             initargs=(os.getpid(), initializer, initargs)) as pool:
        order = sorted(range(len(jobs)), key=lambda i: -sizes[i])
        futures = {pool.submit(fn, *jobs[i]): i for i in order}
        for fut in as_completed(futures):
            i = futures[fut]
            results[i] = fut.result()
            if on_done:
                on_done(results[i], sizes[i])
    return results


def _init_worker(parent: int, initializer: Callable[..., None] | None, initargs: tuple[Any, ...]) -> None:
    # A worker whose parent was killed would otherwise wait forever for work: leave with it.
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    if initializer:
        initializer(*initargs)
