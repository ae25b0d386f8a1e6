"""One exception type for everything the user can fix, with the exit code the CLI returns.

Every message says what happened, why, and what to type instead. The CLI prints the message and
exits with `exit_code`; nothing else in the package prints errors or calls sys.exit.
"""

from __future__ import annotations

import signal

# Exit codes (documented in the README).
EXIT_USAGE = 2  # a flag or argument is wrong
EXIT_BAD_INPUT = 3  # the model, checkpoint or calibration data cannot be used
EXIT_RESOURCES = 4  # not enough memory, disk, or no network where one is needed
EXIT_INTERRUPTED = 130  # stopped by Ctrl-C, SIGTERM or SIGHUP

# Signals that stop a command the way Ctrl-C does (SIGTERM: a scheduler or `kill`; SIGHUP: the
# terminal closed); SIGHUP does not exist on Windows.
STOP_SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None)


class StreamPruneError(Exception):
    """An error the user can act on. `str(err)` is the whole message."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(StreamPruneError):
    exit_code = EXIT_USAGE


class BadInputError(StreamPruneError):
    exit_code = EXIT_BAD_INPUT


class ResourceError(StreamPruneError):
    exit_code = EXIT_RESOURCES


class Interrupted(StreamPruneError):
    """Stopped by Ctrl-C at a resume point; the message says how to resume."""

    exit_code = EXIT_INTERRUPTED
