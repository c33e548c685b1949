"""One root for the errors a user can meet, each with its exit code: the CLI maps them once.

    RefineryError   bad usage or input (exit 2): the message names the file, setting or fix
    └─ CheckFailed  a check failed (exit 1): nothing was published, or the workspace is not sound

Errors inside one row (a field of the wrong type, a broken line) are not raised this far: the
row is quarantined with a reason and the run goes on.
"""

from __future__ import annotations

EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT = 0, 1, 2
EXIT_INTERRUPTED = 130  # the shell's code for Ctrl-C (128 + SIGINT)


class RefineryError(Exception):
    """Bad usage or input: exit 2, the message says what to fix."""

    exit_code = EXIT_BAD_INPUT
    headline = "error"

    def report(self) -> str:
        """The line the CLI prints."""
        return f"{self.headline}: {self}"


class CheckFailed(RefineryError):
    """A check failed: exit 1."""

    exit_code = EXIT_CHECK_FAILED
    headline = "CHECK FAILED"


class AccountingError(CheckFailed):
    """Rows in ≠ rows out + quarantined for some file or export: a bug, never a data problem.
    Nothing was published."""

    headline = "ACCOUNTING CHECK FAILED, nothing was published"


def exit_code(err: BaseException) -> int:
    """The exit code a command stopped by `err` ends with (an unexpected exception: 2)."""
    if isinstance(err, RefineryError):
        return err.exit_code
    return EXIT_INTERRUPTED if isinstance(err, KeyboardInterrupt) else EXIT_BAD_INPUT
