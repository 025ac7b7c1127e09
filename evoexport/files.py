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
        return json.loads(Path(path).read_text(), parse_constant=_not_json)
    except (ValueError, UnicodeDecodeError) as e:   # JSONDecodeError is a ValueError
        raise EvoExportError(f"{path} is not valid JSON: {e}" + (f"; {hint}" if hint else "")) from None
    except OSError as e:
        raise EvoExportError(f"{path} cannot be read ({e.strerror or e})") from None


def _not_json(name: str):
    # Python's json reads NaN and Infinity, which JSON does not have: a NaN image_std or an
    # infinite size would pass a type check and poison every later number
    raise ValueError(f"{name} is not a JSON number")


def write_json(path: str | Path, value) -> None:
    import json
    atomic_write(path, json.dumps(value, indent=2) + "\n")


class NpzRows:
    """An .npz whose arrays arrive a block of rows at a time (a video's frames, batch by batch)
    and never sit in memory whole: each array is appended to a .npy file beside the target
    (its header written first, for the full row count), and `commit()` stores them in the .npz
    (as numpy.savez does, uncompressed) and renames it into place. Leaving the block without
    commit, or on an error, removes everything.

        with NpzRows(path, rows=N) as out:
            for chunk in chunks: out.append(chunk)     # {name: array [n, ...]}
            out.commit(extra)                          # {name: array} stored whole
    """

    def __init__(self, path: str | Path, rows: int):
        self.path, self.rows, self.filled = Path(path), rows, 0
        self.shapes: dict = {}        # name -> [rows, ...]
        self._files: dict = {}
        self._dtypes: dict = {}
        self._scratch: Path | None = None

    def __enter__(self):
        try:
            self._scratch = Path(tempfile.mkdtemp(prefix=f".{self.path.stem}.", suffix=".partial",
                                                  dir=self.path.parent or "."))
        except OSError as e:
            raise EvoExportError(f"cannot write {self.path} ({e.strerror})") from None
        return self

    def __exit__(self, *exc):
        for f in self._files.values():
            f.close()
        shutil.rmtree(self._scratch, ignore_errors=True)

    def append(self, chunk: dict) -> None:
        import numpy as np
        n = len(next(iter(chunk.values())))
        if self.filled + n > self.rows:
            raise ValueError(f"{self.filled + n} rows for an .npz of {self.rows}")
        try:
            for name, value in chunk.items():
                value = np.ascontiguousarray(value)
                if name not in self._files:
                    self._start(name, value)
                if value.dtype != self._dtypes[name] or [self.rows, *value.shape[1:]] != self.shapes[name]:
                    raise ValueError(f"{name}: a block of {value.dtype} {list(value.shape)} after {self.shapes[name]}")
                value.tofile(self._files[name])
        except OSError as e:
            raise EvoExportError(f"cannot write {self.path} ({e.strerror or e})") from None
        self.filled += n

    def _start(self, name: str, value) -> None:
        from numpy.lib import format as npy
        f = open(self._scratch / f"{name}.npy", "wb")
        self._files[name], self._dtypes[name] = f, value.dtype
        self.shapes[name] = [self.rows, *value.shape[1:]]
        npy.write_array_header_2_0(f, {"descr": npy.dtype_to_descr(value.dtype), "fortran_order": False,
                                       "shape": tuple(self.shapes[name])})

    def commit(self, extra: dict | None = None) -> None:
        import zipfile

        import numpy as np
        if self.filled != self.rows:
            raise ValueError(f"{self.filled} of {self.rows} rows written")
        for f in self._files.values():
            f.close()
        with atomic_path(self.path) as tmp:
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                for name in self._files:
                    zf.write(self._scratch / f"{name}.npy", arcname=f"{name}.npy")
                for name, value in (extra or {}).items():
                    with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                        np.lib.format.write_array(f, np.asarray(value), allow_pickle=False)


def check_output_dir(path: str | Path, what: str) -> Path:
    """Refuse a folder path that cannot be created, before any work is done: no part of it
    may be a file, and the deepest folder that exists must be writable."""
    path = Path(path).expanduser()
    if path.is_file():
        raise EvoExportError(f"{what} {path} is a file; give a folder")
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing != path and not existing.is_dir():
        raise EvoExportError(f"{what} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise EvoExportError(f"{what} {path}: cannot write in {existing}")
    return path


@contextlib.contextmanager
def atomic_dir(target: str | Path, on_commit=None):
    """Yields a hidden temporary folder beside `target`; when the block completes, the folder
    replaces `target` (a previous one is removed only after the swap). On any failure or
    interrupt the temporary folder is removed and `target` is left as it was. Leftovers of
    runs that were killed (SIGKILL cannot clean up after itself) are cleared first.

    One writer at a time: a second process that asks for the same `target` while the first
    is writing it is refused at once, naming the first (a lock beside the target).
    `on_commit()` runs the moment the new folder is in place, before a signal held during the
    swap is delivered (the CLI uses it to say that the command has succeeded)."""
    target = Path(target)
    check_output_dir(target, "output folder")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EvoExportError(f"cannot create {target.parent} ({e.strerror or e})") from None
    with _writer_lock(target):
        _remove_stale_partials(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-{os.getpid()}-", dir=target.parent))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; outputs are meant to be shared
        try:
            yield tmp
            _replace_dir(tmp, target, on_commit)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


@contextlib.contextmanager
def _writer_lock(target: Path):
    """An exclusive lock on `.NAME.lock` beside the target, held while the folder is written
    (flock: released by the kernel if the process dies). The lock file is removed on the way
    out; a process that opened it just before is told by the inode check to open it again."""
    import fcntl

    path = target.parent / f".{target.name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise EvoExportError(f"{target} is being written by another process (pid {holder}); wait for it to "
                                 "finish, or write somewhere else") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)   # the holder removed the file after we opened it: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def _replace_dir(new: Path, target: Path, on_commit=None) -> None:
    """SIGINT and SIGTERM are held back during the two renames: an interrupt between them would
    otherwise leave nothing at `target` while the cleanup deletes the new folder. A signal that
    arrives meanwhile is delivered when the swap is done, after `on_commit()`.

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
    old, committed = None, False
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
        committed = True
        if on_commit is not None:
            on_commit()
    finally:
        for sig, handler in previous.items():   # None: a handler not set from Python
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if committed and old is not None:
            shutil.rmtree(old, ignore_errors=True)
        for sig in dict.fromkeys(pending):   # each held signal once, now that the swap is done
            signal.raise_signal(sig)


def _remove_stale_lock(target: Path) -> None:
    """A lock file left by a writer that was killed (the kernel dropped its lock, SIGKILL
    left the file): removed when nobody holds it. Our own lock is another open file, so a
    writer never removes the lock it holds."""
    import fcntl
    path = target.parent / f".{target.name}.lock"
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with contextlib.suppress(OSError):
            os.unlink(path)
    except BlockingIOError:
        pass
    finally:
        os.close(fd)


def _remove_stale_partials(target: Path) -> None:
    _remove_stale_lock(target)
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
