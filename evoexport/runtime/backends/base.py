"""What every backend is (Polygraphy's runner shape): one base class, and the options each
backend takes declared beside it, so the CLI reads them instead of keeping a table."""
from __future__ import annotations

from typing import ClassVar, NamedTuple


class Option(NamedTuple):
    """A keyword a backend's constructor takes; offered on the command line as `flag` where
    it has one (the others are for library callers)."""
    name: str
    help: str
    flag: str | None = None


class Backend:
    """A loaded build on one runtime.

    A backend has a `name`, the `precision` its encoder stages really compute in (which picks
    the validation tolerances), and three methods:

        as_input(numpy array) -> native value              (on the backend's device)
        run_graph(manifest graph entry, {input: value}) -> {output: value}
        to_numpy(native value) -> numpy array

    A backend that runs the whole chain in one call (a CUDA graph) says so with
    `runs_whole_chain` and implements `run_chain`. One that rebuilds the chain from the
    manifest and never opens a graph file says so with `reads_graph_files = False`. `close()`
    frees what the backend holds (engines, sessions); a backend is also a context manager."""

    name: ClassVar[str]
    options: ClassVar[tuple[Option, ...]] = ()
    reads_graph_files: ClassVar[bool] = True
    runs_whole_chain: ClassVar[bool] = False
    precision: str = "fp32"

    def as_input(self, array):
        raise NotImplementedError

    def run_graph(self, entry: dict, feeds: dict) -> dict:
        raise NotImplementedError

    def run_chain(self, value, outputs=None) -> dict:
        """The whole chain in one call: the tensors named in `outputs` (None: every one)."""
        raise NotImplementedError(f"backend {self.name} runs graph by graph")

    def to_numpy(self, value):
        raise NotImplementedError

    def close(self) -> None:
        """Free what the backend holds; it cannot run afterwards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
