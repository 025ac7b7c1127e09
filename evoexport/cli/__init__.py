"""Command line: a thin layer over the library. The commands live in make.py (build,
engines, check), use.py (run, validate, show, info, models), measure.py (bench, eval) and
serving.py (triton, serve); this module runs them with one `error:` line for bad input."""
from __future__ import annotations

import sys

import click

from ..errors import EvoExportError, OptionError
from . import make, measure, serving, use  # noqa: F401  (each adds its commands to the group)
from .group import cli


def _terminate(signum, frame):
    # SIGTERM (kill, timeouts, CI cancels) cleans up like Ctrl-C: the build's temporary
    # directory is removed and a previous build is left untouched. The flag makes sure of
    # it where a library swallows the KeyboardInterrupt (progress.check_interrupted).
    from ..progress import decided, mark_interrupted
    if decided():   # the output is in place (or the command is done): too late to stop, not a failure
        print("note: interrupt ignored: the command had already finished its work", file=sys.stderr, flush=True)
        return
    mark_interrupted(signum)
    raise KeyboardInterrupt


def _handle_signals() -> dict:
    """Our handler for SIGINT and SIGTERM; a signal this process was started ignoring (a job
    started in the background of a non-interactive shell ignores SIGINT) stays ignored, as
    Python itself leaves it."""
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread():   # handlers live in the main thread
        return {}
    return {sig: signal.signal(sig, _terminate) for sig in (signal.SIGTERM, signal.SIGINT)
            if signal.getsignal(sig) is not signal.SIG_IGN}


def main(argv=None) -> int:
    """The CLI as a function: an exit code, one `error:` line for bad input. It leaves no
    process-wide state behind (a notebook or test may call it many times): the signal
    handlers it installs are restored and the interrupt flag cleared on return."""
    import signal

    from ..progress import clear_interrupted
    previous = _handle_signals()
    clear_interrupted()
    try:
        return _main(argv)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        clear_interrupted()


def _main(argv) -> int:
    from ..progress import mark_decided
    try:
        cli.main(args=argv, prog_name="evoexport", standalone_mode=False)
        return 0
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.Abort:  # click's name for a KeyboardInterrupt (Ctrl-C, SIGTERM)
        click.echo("error: interrupted", err=True)
        return 130
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()}", err=True)
        return e.exit_code or 2
    except OptionError as e:   # the library names the option; the user typed a flag
        click.echo(f"error: {e.as_flag()}", err=True)
        return 2
    except EvoExportError as e:
        click.echo(f"error: {e}", err=True)
        return 2
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        return 130
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    finally:
        mark_decided()


def _entry() -> None:
    """The `evoexport` command. Once the command has returned, its exit status is final: a
    late Ctrl-C is ignored, and the process ends without Python's interpreter teardown, which
    spent 1-3 s collecting the modules of torch, transformers and onnxscript after the last
    line was printed (gdb: Py_FinalizeEx -> finalize_modules -> gc_collect), a window in which
    an interrupt turned a finished build into exit 130. Everything we write is flushed and
    closed (or renamed into place) before then; only the standard streams are left to flush."""
    import logging
    import os

    from ..progress import clear_interrupted
    _handle_signals()
    clear_interrupted()
    code = _main(None)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):   # a closed pipe: nothing more can be said
            pass
    os._exit(code)
