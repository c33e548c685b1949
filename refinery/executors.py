"""Where the per-partition work runs: this machine's process pool, or a Ray cluster.

Every stage hands its independent pieces of work — a source file or byte range, a join bucket,
an evidence file to score or read for the exports — to `refinery.parallel.map_files`, and takes
their results back in job order; the merges, the receipts and the publish stay with the driver.
An executor only decides where those pieces run:

    local   a pool of worker processes on this machine (the default; `materialize.workers`)
    ray     Ray tasks (`run-all --executor ray [--ray-address ADDR]`, or `[executor]` in
            refinery.toml): on a running cluster (`ray start --head` there, then its address
            here); with no address, Ray's own choice — the cluster RAY_ADDRESS names or one
            `ray start` began on this machine, else a Ray instance started for the run

The outputs and receipt hashes are the same either way: a piece of work writes only its own
part files, named by its job number, and a piece Ray retries (its worker died) writes them again
from the start. Ray sees the workspace by its path: on a cluster it must be on a filesystem
every node mounts at the same path (NFS, Lustre, a cloud file share); object stores (s3://, gs://)
are not supported. Ray is an optional dependency: `pip install 'refinery[ray]'`.
"""

from __future__ import annotations

import contextlib
import hashlib
import pickle
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from refinery.errors import RefineryError

EXECUTORS = ("local", "ray")
#: A task whose worker process died is run again this many times (its part files are rewritten).
RAY_RETRIES = 3

_CURRENT: RayExecutor | None = None


class ExecutorUnavailable(RefineryError):
    """The executor asked for cannot be used here (Ray not installed, no cluster at the address)."""


class RayExecutor:
    def __init__(self, address: str | None):
        try:
            import ray
        except ImportError as e:
            raise ExecutorUnavailable(
                "--executor ray needs Ray, an optional dependency: pip install 'refinery[ray]' (or uv sync "
                "--extra ray); or run with --executor local") from e
        self.ray, self.started = ray, False
        if not ray.is_initialized():
            if address:
                _reachable(address)
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False,
                         configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise ExecutorUnavailable(f"cannot use the Ray cluster at {address}: {e} — start one there "
                                          "with `ray start --head`, or leave --ray-address out to run Ray on "
                                          "this machine") from e
            self.started = True
        self.task = ray.remote(max_retries=RAY_RETRIES, retry_exceptions=False)(_run_task)

    def map(self, fn: Callable[..., Any], jobs: Sequence[tuple[Any, ...]], sizes: Sequence[int],
            initializer: Callable[..., None] | None, initargs: tuple[Any, ...],
            on_done: Callable[[Any, int], None] | None) -> list[Any]:
        ray = self.ray
        init = (initializer, initargs) if initializer is not None else None
        order = sorted(range(len(jobs)), key=lambda i: -sizes[i])  # the largest start first, as locally
        refs = {self.task.remote(fn, init, jobs[i]): i for i in order}
        results: list[Any] = [None] * len(jobs)
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    i = refs[ref]
                    try:
                        results[i] = ray.get(ref)
                    except ray.exceptions.RayTaskError as e:
                        # the job's own exception, as the local pool raises it (its errno, its message)
                        raise (e.cause if isinstance(e.cause, BaseException) else e) from None
                    if on_done:
                        on_done(results[i], sizes[i])
        except BaseException:
            # stop the others before the driver removes their folders (they would write on into them)
            for ref in pending:
                ray.cancel(ref, force=True)
            if pending:
                ray.wait(pending, num_returns=len(pending), timeout=60)
            raise
        return results

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


def _reachable(address: str, timeout_s: float = 10.0) -> None:
    """Fail fast, with exit 2, when nothing listens at a cluster's address (Ray itself retries
    for minutes); `ray://host:port` (Ray Client) or `host:port` (a node's GCS)."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ExecutorUnavailable(f"--ray-address {address!r}: write it as ray://host:10001 (Ray Client) or "
                                  "host:6379 (on a node of the cluster)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ExecutorUnavailable(f"cannot reach a Ray cluster at {address}: {e.strerror or e} — start one there "
                                  "with `ray start --head`, or leave --ray-address out to run Ray on this "
                                  "machine") from e


#: In a Ray worker process: the digest of the initializer it last ran (a run's workers are set
#: up once, as a local pool's are; a later run with other settings sets them up again).
_READY: str | None = None


def _run_task(fn: Callable[..., Any], init: tuple[Callable[..., None], tuple[Any, ...]] | None,
              job: tuple[Any, ...]) -> Any:
    global _READY
    if init is not None:
        key = hashlib.sha256(pickle.dumps((init[0].__module__, init[0].__qualname__, init[1]))).hexdigest()
        if _READY != key:
            init[0](*init[1])
            _READY = key
    return fn(*job)


def current() -> RayExecutor | None:
    """The executor runs use now; None: the local process pool."""
    return _CURRENT


@contextlib.contextmanager
def using(kind: str, address: str | None = None) -> Iterator[None]:
    """Run what is inside on executor `kind` (refinery.parallel.map_files asks `current()`)."""
    global _CURRENT
    if kind not in EXECUTORS:
        raise ExecutorUnavailable(f"unknown executor {kind!r}: choose one of {', '.join(EXECUTORS)}")
    if kind == "local" or _CURRENT is not None:
        yield
        return
    _CURRENT = RayExecutor(address)
    try:
        yield
    finally:
        ex, _CURRENT = _CURRENT, None
        ex.close()
