"""`evoexport show`: what the selections keep and where they merge the rest, in pictures.

One strip of panels for an image: the photo as the model sees it (resized and cropped),
then one panel per prune point with the patches dropped by then dimmed and the kept ones
outlined, then the final merge groups: every original patch coloured by the kept token
it was merged into (black: dropped without merging). Drawn with Pillow alone.
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


def render(pixels: np.ndarray, pre: dict, grid: int, indices_per_point: list[np.ndarray],
           merges: list[np.ndarray]) -> Image.Image:
    """One image's strip: photo | kept after each point | merge groups."""
    photo = _display(pixels, pre)
    size = photo.shape[0]
    cell = size / grid
    panels = [Image.fromarray(photo)]
    for kept in indices_per_point:
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
    result = runner(pixels)
    to_np = runner.backend.to_numpy
    m = runner.manifest
    grid, pre = m["tower"]["grid"], m["preprocess"]
    strips = [render(pixels[b], pre, grid, [to_np(i)[b] for i in result.indices_per_point],
                     [to_np(mg)[b] for mg in result.merge_per_point]) for b in range(pixels.shape[0])]
    sheet = Image.new("RGB", (strips[0].width, sum(s.height + 8 for s in strips) - 8), "white")
    for i, s in enumerate(strips):
        sheet.paste(s, (0, i * (s.height + 8)))
    tmp = out.with_name(out.name + ".partial.png")
    sheet.save(tmp)
    tmp.replace(out)
    return {"images": len(strips), "points": len(result.indices_per_point), "size": sheet.size}
