"""`bench --plot PNG`: latency per system and batch, with the FLOP-ideal line (Pillow only).

One group of bars per batch size, one bar per system (median ms per image, p90 as a
whisker), and a dashed line at the fastest unpruned system's time divided by the FLOP-ideal
speedup: where a pruned bar would end if pruning paid exactly its FLOPs.
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from .files import atomic_path

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (57, 59, 121), (99, 121, 57)]
H, LEFT, TOP, BOTTOM, BAR, GAP = 520, 80, 40, 60, 18, 40


def plot_bench(result: dict, path: str | Path) -> dict:
    """Draw `result` (from run_bench or run_cuda_bench) to `path`; returns the bar geometry."""
    rows = result["rows"]
    systems = list(dict.fromkeys(r["system"] for r in rows))
    batches = list(dict.fromkeys(r["batch"] for r in rows))
    colour = {s: PALETTE[i % len(PALETTE)] for i, s in enumerate(systems)}
    per_image = {(r["batch"], r["system"]): (r["median_ms"] / r["batch"], r["p90_ms"] / r["batch"]) for r in rows}
    top = max(p90 for _, p90 in per_image.values()) * 1.1
    legend_h = 16 * len(systems) + 26
    height = H + legend_h
    count = sum(1 for b in batches for s in systems if (b, s) in per_image)
    width = max(700, LEFT + GAP + count * (BAR + 4) + len(batches) * GAP + 40)
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    plot_h = H - TOP - BOTTOM
    y_of = lambda ms: TOP + plot_h * (1 - ms / top)   # noqa: E731
    for k in range(6):   # grid and axis labels
        ms = top * k / 5
        y = y_of(ms)
        d.line([LEFT, y, width - 20, y], fill=(225, 225, 225))
        d.text((8, y - 6), f"{ms:.4g}", fill="black")
    d.text((8, 8), "median ms per image (whisker: p90)", fill="black")
    bars, x = [], LEFT + GAP
    ideal = {s["batch"]: s["ideal_speedup"] for s in result["summary"]}
    for b in batches:
        group = [s for s in systems if (b, s) in per_image]
        x0 = x
        for s in group:
            med, p90 = per_image[(b, s)]
            d.rectangle([x, y_of(med), x + BAR - 1, y_of(0)], fill=colour[s])
            d.line([x + BAR // 2, y_of(med), x + BAR // 2, y_of(p90)], fill="black")
            bars.append({"batch": b, "system": s, "x": x, "top": y_of(med), "bottom": y_of(0), "ms_per_image": med})
            x += BAR + 4
        unpruned = min(per_image[(b, s)][0] for s in group if not s.startswith("pruned"))
        line_y = y_of(unpruned / ideal[b])
        for xx in range(int(x0) - 4, int(x), 8):
            d.line([xx, line_y, xx + 4, line_y], fill="black", width=2)
        d.text((x0, H - BOTTOM + 8), f"batch {b}", fill="black")
        bars.append({"batch": b, "system": "FLOP ideal", "y": line_y, "ms_per_image": unpruned / ideal[b]})
        x += GAP
    for i, s in enumerate(systems):   # legend
        y = H + 16 * i
        d.rectangle([LEFT, y, LEFT + 10, y + 10], fill=colour[s])
        d.text((LEFT + 16, y - 1), s, fill="black")
    d.text((LEFT, H + 16 * len(systems)), "- - - fastest unpruned / FLOP-ideal speedup", fill="black")
    with atomic_path(Path(path)) as tmp:
        img.save(tmp, format="PNG")
    return {"bars": bars, "size": img.size}
