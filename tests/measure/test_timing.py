"""The one timing helper: systems interleaved in rounds, warm-ups first, sync before every
clock read, and medians/p90 computed from exactly the recorded times (no timed assertions)."""
from __future__ import annotations

import statistics

import numpy as np
import pytest

from evoexport.measure.timing import stats, time_systems


def test_systems_are_interleaved_in_rounds_after_their_warm_ups():
    calls, syncs = [], []
    systems = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    out = time_systems(systems, iters=4, warmup=1, rounds=2, sync=lambda: syncs.append(len(calls)))
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 2
    assert len(syncs) == 1 + 8 and syncs[0] == 2          # once after the warm-ups, then after every timed call
    assert {k: v["iters"] for k, v in out.items()} == {"a": 4, "b": 4}


def test_default_is_one_call_per_system_per_round():
    calls = []
    time_systems({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, iters=3, warmup=0)
    assert calls == ["a", "b", "a", "b", "a", "b"]


def test_uneven_rounds_still_time_every_iteration():
    calls = []
    out = time_systems({"a": lambda: calls.append("a")}, iters=5, warmup=0, rounds=2)
    assert len(calls) == 5 and out["a"]["iters"] == 5


def test_statistics_come_from_the_recorded_times():
    out = time_systems({"a": lambda: sum(range(1000))}, iters=7, warmup=1)["a"]
    ts = out["times_ms"]
    assert out["median_ms"] == statistics.median(ts) and out["min_ms"] == min(ts)
    assert out["p90_ms"] == pytest.approx(float(np.percentile(ts, 90)))
    assert stats([1.0, 2.0, 3.0, 4.0])["median_ms"] == 2.5


class _Terminal:
    """A stream that says it is a terminal (tqdm's bar), recording what is written."""

    def __init__(self):
        self.text = ""

    def isatty(self):
        return True

    def write(self, s):
        self.text += s

    def flush(self):
        pass


def test_progress_is_plain_lines_off_a_terminal():
    import io

    from evoexport.progress import Progress

    out = io.StringIO()
    p = Progress(out)
    p("loading")
    p("calibrating stage_0: image 1/13")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[1].endswith("calibrating stage_0: image 1/13") and "\r" not in out.getvalue()


def test_progress_on_a_terminal_counts_steps_in_one_bar():
    from evoexport.progress import Progress

    term = _Terminal()
    p = Progress(term)
    p("loading llava")
    for i in range(1, 14):
        p(f"calibrating stage_0: image {i}/13")
    assert "13/13" in term.text and "\r" in term.text            # one bar, redrawn in place
    assert term.text.count("loading llava") == 1
    p("validating")
    assert p._bar is None and "validating" in term.text
