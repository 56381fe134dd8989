"""What goes wrong for a user of `dpo`, and the exit status each outcome gives.

A ClientError is printed as one line on stderr (never a traceback) and exits with its `exit_code`.
"""
from __future__ import annotations

# Exit statuses (docs/client.md lists them).
EXIT_OK = 0
EXIT_ERROR = 1  # the command failed: an error from the API, an unreachable URL, a refused key, bad input
EXIT_USAGE = 2  # a command line that does not parse (click's own status)
EXIT_JOB_FAILED = 3  # `jobs watch` / `jobs create --watch`: the job ended `failed`
EXIT_JOB_CANCELLED = 4  # ... the job ended `cancelled`
EXIT_JOB_PAUSED = 5  # ... the job was paused: it waits for `dpo jobs resume`
EXIT_INTERRUPTED = 130  # Ctrl-C; the job itself goes on

JOB_EXIT = {"succeeded": EXIT_OK, "failed": EXIT_JOB_FAILED, "cancelled": EXIT_JOB_CANCELLED,
            "paused": EXIT_JOB_PAUSED}


class ClientError(Exception):
    """An error to show the user as one line: `message`, with the API's error `code` when there is one."""

    def __init__(self, message: str, code: str | None = None, status: int | None = None,
                 exit_code: int = EXIT_ERROR):
        super().__init__(message)
        self.message, self.code, self.status, self.exit_code = message, code, status, exit_code

    def line(self) -> str:
        text = " ".join(self.message.split())  # one line, whatever the message holds
        return f"dpo: {text} ({self.code})" if self.code else f"dpo: {text}"


class Unreachable(ClientError):
    """The API did not answer at all (refused, no route, DNS, timeout); a watcher may try again."""
