"""`bench --plot PNG`: latency per image for every system and batch, with the FLOP-ideal line,
drawn with matplotlib (no pyplot: no global state is touched).

One group of bars per batch size, one bar per system (median ms per image, p90 as an
error bar), and a dashed line over each group at the fastest unpruned system's time
divided by the FLOP-ideal speedup: where a pruned bar would end if pruning paid exactly
its FLOPs.
"""
from __future__ import annotations

from pathlib import Path

from ..files import atomic_path


def plot_bench(result: dict, path: str | Path) -> dict:
    """Draw `result` (from run_bench or run_cuda_bench) to `path`; returns each bar's place
    in the image (pixels, origin top left) and the figure's size."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = result["rows"]
    systems = list(dict.fromkeys(r["system"] for r in rows))
    batches = list(dict.fromkeys(r["batch"] for r in rows))
    per_image = {(r["batch"], r["system"]): (r["median_ms"] / r["batch"], r["p90_ms"] / r["batch"]) for r in rows}
    ideal = {s["batch"]: s["ideal_speedup"] for s in result.get("summary", []) if "ideal_speedup" in s}

    count = len(per_image)
    fig = Figure(figsize=(max(8.0, 0.28 * count + 5.0), 5.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colours = {s: f"C{i % 10}" for i, s in enumerate(systems)}   # past ten colours, hatching tells them apart
    hatches = {s: "" if i < 10 else "//" for i, s in enumerate(systems)}
    width, x, centres, drawn = 0.8, 0.0, [], []
    for b in batches:
        present = [s for s in systems if (b, s) in per_image]
        start = x
        for s in present:
            median, p90 = per_image[(b, s)]
            bar = ax.bar(x, median, width, yerr=[[0], [max(p90 - median, 0.0)]], capsize=3, color=colours[s],
                         hatch=hatches[s], edgecolor="black", linewidth=0.4, label=s if b == batches[0] else None,
                         align="edge")[0]
            drawn.append((b, s, median, bar))
            x += width + 0.1
        centres.append((start + x - 0.1) / 2)
        if b in ideal:
            unpruned = [per_image[(b, s)][0] for s in present if not s.startswith("pruned")]
            if unpruned:
                y = min(unpruned) / ideal[b]
                ax.hlines(y, start - 0.1, x, colors="black", linestyles="dashed", linewidth=1.2,
                          label="fastest unpruned / FLOP-ideal speedup" if b == batches[0] else None)
                drawn.append((b, "FLOP ideal", y, (start - 0.1, x)))
        x += 1.0
    ax.set_xticks(centres, [f"batch {b}" for b in batches])
    ax.set_ylabel("ms per image (median; error bar to p90)")
    ax.set_ylim(bottom=0)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    where = result.get("device") or result.get("gpu") or result.get("cpu") or ""
    ax.set_title(f"{result.get('model', 'build')} keep {result.get('keep', '?')}: latency per image"
                 + (f" ({where})" if where else ""))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.canvas.draw()
    bars = _placed(drawn, ax, fig.canvas.get_width_height()[1])
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png")
    return {"bars": bars, "size": fig.canvas.get_width_height()}


def _placed(drawn: list, ax, height: int) -> list[dict]:
    """Where each drawn bar (and FLOP-ideal line) landed, in pixels from the top left."""
    to_pixels = ax.transData.transform
    bars = []
    for b, s, value, artist in drawn:
        if s == "FLOP ideal":
            (x0, y), (x1, _) = to_pixels((artist[0], value)), to_pixels((artist[1], value))
            bars.append({"batch": b, "system": s, "ms_per_image": value, "y": height - y, "x": x0, "x_end": x1})
        else:
            box = artist.get_window_extent()
            bars.append({"batch": b, "system": s, "ms_per_image": value, "x": box.x0, "width": box.width,
                         "top": height - box.y1, "bottom": height - box.y0})
    return bars
