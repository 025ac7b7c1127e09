"""User-facing errors.

Anything raised as `EvoExportError` is a problem with the user's input or environment
(bad flag, broken checkpoint, tampered build). The CLI prints it as one line and exits
non-zero; everything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import re


class EvoExportError(Exception):
    """An error the user can fix; its message is printed as-is, on one line."""


class OptionError(EvoExportError):
    """A bad value of one option. The library names the option as its callers spell it
    (`keep`, `max_batch`); the CLI names the flag instead (`--keep`, `--max-batch`)."""

    def __init__(self, option: str, problem: str):
        self.option, self.problem = option, problem
        super().__init__(f"{option} {problem}")

    def as_flag(self) -> str:
        """The message with the option spelled as the CLI's flag (the flags are named after
        the options they fill)."""
        return f"--{self.option.replace('_', '-')} {self.problem}"


# lines of a library's error that say where in its sources it was raised, not what happened:
# OpenVINO's "Exception from src/...cpp:132:" and "Check '...' failed at src/...:563:",
# "FrontEnd API failed with GeneralFailure:"
_WHERE = re.compile(r"^(Exception from \S+:\d+:|Check '.*' failed at \S+:\d+:|FrontEnd API failed with \w+:)$")


def cause(error: BaseException, limit: int = 300) -> str:
    """A library's error message as one line that says what went wrong: the lines naming
    source locations dropped, the rest joined, whitespace collapsed, cut at `limit`."""
    lines = [line.strip() for line in str(error).splitlines()]
    kept = [line for line in lines if line and not _WHERE.match(line)] or [line for line in lines if line]
    text = " ".join(" ".join(kept).split()) or type(error).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."
