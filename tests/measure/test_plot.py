"""`bench --plot`: bars in proportion to the measured latencies, the FLOP-ideal line where
the fastest unpruned time divided by the ideal speedup puts it (on real bench JSON)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evoexport.cli import main
from evoexport.measure.plot import plot_bench

from tests.helpers import MEASURED


@pytest.mark.parametrize("name", ["bench-cuda-h200-run2.json", "bench-llava-keep0.5-all-precisions-amd-epyc.json"])
def test_bars_follow_the_latencies_and_the_ideal_line_the_flops(name, tmp_path):
    result = json.loads((MEASURED / name).read_text())
    geometry = plot_bench(result, tmp_path / "plot.png")
    img = np.asarray(Image.open(tmp_path / "plot.png").convert("RGB"))
    assert img.shape[:2] == geometry["size"][::-1]
    bars = [b for b in geometry["bars"] if b["system"] != "FLOP ideal"]
    assert len(bars) == len(result["rows"])
    unit = [(b["bottom"] - b["top"]) / b["ms_per_image"] for b in bars]
    assert max(unit) - min(unit) < 1e-6                      # one scale for every bar
    for b in bars:                                           # each bar is filled in its own colour
        inside = img[int((b["top"] + b["bottom"]) / 2), int(b["x"]) + 3]
        assert tuple(inside) != (255, 255, 255)
    for s in result["summary"]:
        rows = [r for r in result["rows"] if r["batch"] == s["batch"] and not r["system"].startswith("pruned")]
        line = next(b for b in geometry["bars"] if b["system"] == "FLOP ideal" and b["batch"] == s["batch"])
        fastest = min(r["median_ms"] / r["batch"] for r in rows)
        assert line["ms_per_image"] == pytest.approx(fastest / s["ideal_speedup"])


def test_plot_must_be_a_png(tiny_build, tmp_path, capsys):
    assert main(["bench", str(tiny_build), "--plot", str(tmp_path / "x.svg")]) == 2
    assert "--plot must be a .png" in capsys.readouterr().err
