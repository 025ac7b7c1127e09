"""Progress lines on stderr: elapsed time and what is happening now."""
from __future__ import annotations

import re
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
# Set once a command's outcome is decided (its output committed, or the command returned): an
# interrupt after that cannot undo the work, so it must not turn success into failure.
_decided: list[bool] = []


def mark_interrupted(signum: int) -> None:
    _interrupted.append(signum)


def mark_decided() -> None:
    _decided.append(True)


def decided() -> bool:
    return bool(_decided)


def clear_interrupted() -> None:
    _interrupted.clear()
    _decided.clear()


def check_interrupted() -> None:
    if _interrupted:
        raise KeyboardInterrupt


_COUNTER = re.compile(r"(\d+)\s*/\s*(\d+)")


class Progress:
    """Progress of long work on stderr. Not a terminal (logs, CI, pipes): one plain line per
    step, elapsed time and memory first. A terminal: the same lines, and steps that count
    ("image 9/13", "[3/7]") drive one tqdm bar in place instead of a line each."""

    def __init__(self, stream=None, enabled: bool = True, bar: bool | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled, self.t0 = enabled, time.perf_counter()
        isatty = getattr(self.stream, "isatty", lambda: False)
        self.tty = enabled and (isatty() if bar is None else bar)
        self._bar = None

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def __call__(self, message: str) -> None:
        check_interrupted()
        if not self.enabled:
            return
        line = f"[{self.elapsed:6.1f}s {rss_gb():4.1f}GB] {message}"
        if not self.tty:
            print(line, file=self.stream, flush=True)
            return
        from tqdm import tqdm

        counted = _COUNTER.search(message)
        if counted is None:
            self.close()
            tqdm.write(line, file=self.stream)
            return
        done, total = int(counted[1]), int(counted[2])
        if self._bar is None:
            import shutil
            width = shutil.get_terminal_size((100, 20)).columns or 100
            utf = str(getattr(self.stream, "encoding", "") or "").lower().replace("-", "").startswith("utf8")
            self._bar = tqdm(total=total, file=self.stream, leave=True, ncols=width, ascii=not utf,
                             bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]")
        self._bar.total = total
        self._bar.set_description_str(f"[{self.elapsed:6.1f}s {rss_gb():4.1f}GB] {message}", refresh=False)
        self._bar.n = min(done, total)
        self._bar.refresh()

    def close(self) -> None:
        """End the bar on a terminal (the next plain line starts clean)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
