"""Command line: a thin layer over the library. The commands live in make.py (build,
engines, check), use.py (run, validate, show, info, models), measure.py (bench, eval) and
serving.py (triton, serve); this module runs them with one `error:` line for bad input."""
from __future__ import annotations

import sys

import click

from ..errors import EvoExportError
from . import make, measure, serving, use  # noqa: F401  (each adds its commands to the group)
from .group import cli


def _terminate(signum, frame):
    # SIGTERM (kill, timeouts, CI cancels) cleans up like Ctrl-C: the build's temporary
    # directory is removed and a previous build is left untouched. The flag makes sure of
    # it where a library swallows the KeyboardInterrupt (progress.check_interrupted).
    from ..progress import mark_interrupted
    mark_interrupted(signum)
    raise KeyboardInterrupt


def main(argv=None) -> int:
    """The CLI as a function: an exit code, one `error:` line for bad input. It leaves no
    process-wide state behind (a notebook or test may call it many times): the signal
    handlers it installs are restored and the interrupt flag cleared on return."""
    import signal
    import threading

    from ..progress import clear_interrupted
    previous = {}
    if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, _terminate)
    clear_interrupted()
    try:
        return _main(argv)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        clear_interrupted()


def _main(argv) -> int:
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
    except EvoExportError as e:
        click.echo(f"error: {e}", err=True)
        return 2
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        return 130
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1


def _entry() -> None:
    sys.exit(main())
