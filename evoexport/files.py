"""Writing files so that nothing is lost: one atomic writer, and output paths checked
before long work starts.

A file is written beside its target under a hidden temporary name and renamed over it only
when complete, so an interrupt, a full disk or a crash leaves either the previous file or
the new one, never half of one.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from .errors import EvoExportError


def check_output_path(path: str | Path, what: str, suffix: str | None = None) -> Path:
    """Refuse an output path that cannot be written, before any work is done: its folder
    must exist and be writable, and the path must not be a directory."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise EvoExportError(f"{what} {path} is a directory; give a file path")
    if suffix and path.suffix.lower() != suffix:
        raise EvoExportError(f"{what} must be a {suffix} file, got {path}")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise EvoExportError(f"{what} {path}: folder {folder} does not exist")
    try:   # the way the real write will go: a temporary file beside the target
        fd, probe = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".probe", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise EvoExportError(f"{what} {path}: cannot write in {folder} ({e.strerror})") from None
    return path


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yields a temporary path beside `path` (same suffix, so writers that go by it still
    work); on success it replaces `path` in one rename, on any failure it is removed."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".partial{path.suffix}", dir=path.parent or ".")
    except OSError as e:
        raise EvoExportError(f"cannot write {path} ({e.strerror})") from None
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)   # mkstemp makes it private; outputs are meant to be shared
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):   # a full disk, a vanished folder: one line, the old file kept
            raise EvoExportError(f"cannot write {path} ({e.strerror or e})") from None
        raise


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write `data` (text as UTF-8) to `path` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())


def read_json(path: str | Path, hint: str = ""):
    """A JSON file given as input: its value, or one error line if it is not valid JSON
    (`hint`, e.g. "rebuild the engines", says what to do about it)."""
    import json
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvoExportError(f"{path} is not valid JSON: {e}" + (f"; {hint}" if hint else "")) from None
    except OSError as e:
        raise EvoExportError(f"{path} cannot be read ({e.strerror or e})") from None


def write_json(path: str | Path, value) -> None:
    import json
    atomic_write(path, json.dumps(value, indent=2) + "\n")


@contextlib.contextmanager
def atomic_dir(target: str | Path):
    """Yields a hidden temporary folder beside `target`; when the block completes, the folder
    replaces `target` (a previous one is removed only after the swap). On any failure or
    interrupt the temporary folder is removed and `target` is left as it was. Leftovers of
    runs that were killed (SIGKILL cannot clean up after itself) are cleared first."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-{os.getpid()}-", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; outputs are meant to be shared
    try:
        yield tmp
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(new: Path, target: Path) -> None:
    """SIGINT and SIGTERM are held back during the two renames: an interrupt between them would
    otherwise leave nothing at `target` while the cleanup deletes the new folder. A signal that
    arrives meanwhile is delivered when the swap is done.

    Held by swapping the Python handlers, not by masking the signals: a mask holds them for one
    thread only, and a process-directed signal goes to any thread that does not block it (tqdm's
    monitor, a compiler's workers), after which Python runs its handler in the main thread all
    the same. Python's handlers run only in the main thread; elsewhere this thread's mask is
    what there is."""
    import signal
    import threading

    held, pending, previous, mask = (signal.SIGINT, signal.SIGTERM), [], {}, None
    if threading.current_thread() is threading.main_thread():
        for sig in held:
            previous[sig] = signal.signal(sig, lambda signum, frame: pending.append(signum))
    else:
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, set(held))
    old = None
    try:
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.rename(target, old)
        try:
            os.rename(new, target)
        except OSError:
            if old is not None:
                os.rename(old, target)   # put the previous one back
            raise
    finally:
        for sig, handler in previous.items():   # None: a handler not set from Python
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for sig in dict.fromkeys(pending):   # each held signal once, now that the swap is done
            signal.raise_signal(sig)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_stale_partials(target: Path) -> None:
    for prefix in (f".{target.name}.partial-", f".{target.name}.old-"):
        for p in target.parent.glob(prefix + "*"):
            pid = p.name[len(prefix):].split("-")[0]
            if pid.isdigit() and not _alive(int(pid)):
                if prefix.endswith("old-") and not target.exists():
                    os.rename(p, target)  # killed mid-swap: the old one is the good one
                else:
                    shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
