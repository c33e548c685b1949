"""The `refinery` command line. Exit codes: 0 ok, 1 a check failed, 2 bad usage or input.

One module per command group (pipeline, checks, review, data, train, replay) over the shared parts in
common; the commands call refinery.api and the stage modules, imported inside each command, so
`refinery --help` stays fast and never imports the training stack.
"""

from __future__ import annotations

import os
import sys

# each module registers its commands on `app` as it is imported: this order is --help's
from refinery.cli import pipeline, checks, review, data, train, replay  # noqa: F401, I001
from refinery.cli.common import app
from refinery.errors import EXIT_OK

__all__ = ["app", "main"]


class _ReaderMayLeave:
    """sys.stdout or sys.stderr, except that once the reader of the pipe has gone (`refinery
    run-all | head`) the rest of the output is dropped instead of raising BrokenPipeError in
    whatever was printing: the work goes on — a run is not failed for it — and the command's
    exit code stands."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._drop()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._drop()

    def _drop(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())  # what is still buffered goes there too
        os.close(devnull)

    @property
    def buffer(self):
        """The binary stream underneath (`--json` writes bytes), with the same care."""
        return _ReaderMayLeave(self._stream.buffer)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def main() -> None:
    from refinery.training.blas import relaunch_if_slow

    relaunch_if_slow(sys.argv[1:])  # train and replay: once more, with an optimised BLAS preloaded
    sys.stdout, sys.stderr = _ReaderMayLeave(sys.stdout), _ReaderMayLeave(sys.stderr)
    try:
        app()
    except BrokenPipeError:  # a write that went around the wrappers: the reader left, nothing failed
        sys.exit(EXIT_OK)
