"""`evoexport show`: what the selections keep and where they merge the rest, in pictures.

One strip of panels for an image: the photo as the model sees it (resized and cropped);
then, per prune point, the attention importance of the tokens entering it as a heat map
(black to red to yellow; patches gone by then stay black) and the kept patches outlined
with the dropped ones dimmed; then the final merge groups, every original patch coloured
by the kept token it was merged into (black: dropped without merging). Pillow alone.
"""
from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

DIM = 0.25   # brightness left to a dropped patch


def _display(pixels: np.ndarray, pre: dict) -> np.ndarray:
    """Normalized pixels [3,H,W] back to uint8 RGB [H,W,3]."""
    rgb = pixels.transpose(1, 2, 0) * np.asarray(pre["std"]) + np.asarray(pre["mean"])
    return np.clip(rgb / float(pre.get("rescale", 1 / 255)), 0, 255).astype(np.uint8)


def final_owner(merges: list[np.ndarray]) -> np.ndarray:
    """[N] final kept slot of every original patch (-1: dropped without a merge)."""
    owner = np.arange(merges[0].shape[0]) if merges else np.zeros(0, int)
    for merge in merges:
        owner = np.where(owner >= 0, merge[np.maximum(owner, 0)], -1)
    return owner


def heat(values: np.ndarray) -> np.ndarray:
    """[..] in [0, 1] -> RGB [.., 3]: black, red, yellow (red never decreases)."""
    v = np.clip(values, 0, 1)[..., None]
    return np.concatenate([np.minimum(1, 2 * v), np.maximum(0, 2 * v - 1), np.zeros_like(v)], axis=-1) * 255


def _heat_panel(photo: np.ndarray, grid: int, entering: np.ndarray, importance: np.ndarray) -> Image.Image:
    size = photo.shape[0]
    cell = int(np.ceil(size / grid))
    values = np.zeros(grid * grid)
    peak = importance.max() if importance.size and importance.max() > 0 else 1.0
    values[entering] = importance / peak
    colour = heat(values).reshape(grid, grid, 3)
    colour = np.kron(colour, np.ones((cell, cell, 1)))[:size, :size]
    return Image.fromarray((0.3 * photo + 0.7 * colour).astype(np.uint8))


def render(pixels: np.ndarray, pre: dict, grid: int, indices_per_point: list[np.ndarray],
           merges: list[np.ndarray], importances: list[np.ndarray] | None = None) -> Image.Image:
    """One image's strip: photo | (importance, kept) per point | merge groups."""
    photo = _display(pixels, pre)
    size = photo.shape[0]
    cell = size / grid
    panels = [Image.fromarray(photo)]
    entering = np.arange(grid * grid)
    for i, kept in enumerate(indices_per_point):
        if importances is not None:
            panels.append(_heat_panel(photo, grid, entering, importances[i]))
            entering = kept
        mask = np.full(grid * grid, DIM)
        mask[kept] = 1.0
        scale = np.kron(mask.reshape(grid, grid), np.ones((int(np.ceil(cell)),) * 2))[:size, :size]
        panel = Image.fromarray((photo * scale[..., None]).astype(np.uint8))
        draw = ImageDraw.Draw(panel)
        for p in kept:
            r, c = divmod(int(p), grid)
            draw.rectangle([c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1], outline=(255, 210, 0))
        panels.append(panel)
    if merges:
        owner = final_owner(merges)
        hues = (np.arange(owner.max() + 1) * 0.61803) % 1.0     # golden-ratio hues: neighbours differ
        colours = np.array([colorsys.hsv_to_rgb(h, 0.85, 1.0) for h in hues]) * 255
        tint = np.where(owner[:, None] >= 0, colours[np.maximum(owner, 0)], 0).reshape(grid, grid, 3)
        tint = np.kron(tint, np.ones((int(np.ceil(cell)), int(np.ceil(cell)), 1)))[:size, :size]
        panels.append(Image.fromarray((0.45 * photo + 0.55 * tint).astype(np.uint8)))
    strip = Image.new("RGB", (len(panels) * (size + 8) - 8, size), "white")
    for i, panel in enumerate(panels):
        strip.paste(panel, (i * (size + 8), 0))
    return strip


def show(runner, pixels: np.ndarray, out: Path) -> dict:
    """Run a loaded build on pixels [B,3,H,W] and write one strip per image, stacked."""
    env = runner.run_all(pixels)
    to_np = runner.backend.to_numpy
    m = runner.manifest
    grid, pre, points = m["tower"]["grid"], m["preprocess"], range(len(m["schedule"]))
    indices = [to_np(env[f"indices_{i}"]) for i in points]
    merges = [to_np(env[f"merge_{i}"]) for i in points]
    importances = [to_np(env[f"stage{i}_importance"]) for i in points]
    strips = [render(pixels[b], pre, grid, [x[b] for x in indices], [x[b] for x in merges], [x[b] for x in importances])
              for b in range(pixels.shape[0])]
    sheet = Image.new("RGB", (strips[0].width, sum(s.height + 8 for s in strips) - 8), "white")
    for i, s in enumerate(strips):
        sheet.paste(s, (0, i * (s.height + 8)))
    tmp = out.with_name(out.name + ".partial.png")
    sheet.save(tmp)
    tmp.replace(out)
    return {"images": len(strips), "points": len(indices), "panels": 2 + 2 * len(indices), "size": sheet.size}
