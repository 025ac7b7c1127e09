"""Progress lines on stderr: elapsed time and what is happening now."""
from __future__ import annotations

import resource
import sys
import time


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far, in GB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def rss_gb() -> float:
    """Current resident memory of this process, in GB."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 1e9
    except OSError:
        return peak_rss_gb()


# Set by the CLI's SIGINT/SIGTERM handler. The handler also raises KeyboardInterrupt at
# once, but library code may swallow it (exporters that retry on any exception): every
# progress step and the build's final rename check this flag, so an interrupted build
# never completes.
_interrupted: list[int] = []


def mark_interrupted(signum: int) -> None:
    _interrupted.append(signum)


def clear_interrupted() -> None:
    _interrupted.clear()


def check_interrupted() -> None:
    if _interrupted:
        raise KeyboardInterrupt


class Progress:
    def __init__(self, stream=sys.stderr, enabled: bool = True):
        self.stream, self.enabled, self.t0 = stream, enabled, time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def __call__(self, message: str) -> None:
        check_interrupted()
        if self.enabled:
            print(f"[{self.elapsed:6.1f}s {rss_gb():4.1f}GB] {message}", file=self.stream, flush=True)
