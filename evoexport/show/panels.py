"""`evoexport show`: what the selections keep and where they merge the rest, in pictures.

One strip of panels for an image (for a video, one column per sampled frame): the photo as the model sees it (resized and cropped);
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

from ..files import atomic_path
from .. import names
from ..names import Grid
from ..runtime.runner import final_owners

DIM = 0.25   # brightness left to a dropped patch


def _display(pixels: np.ndarray, pre: dict) -> np.ndarray:
    """Normalized pixels [3,H,W] back to uint8 RGB [H,W,3]; a video build's frame pair
    [6,H,W] by its first frame."""
    rgb = pixels[:3].transpose(1, 2, 0) * np.asarray(pre["std"]) + np.asarray(pre["mean"])
    return np.clip(rgb / float(pre.get("rescale", 1 / 255)), 0, 255).astype(np.uint8)


def heat(values: np.ndarray) -> np.ndarray:
    """[..] in [0, 1] -> RGB [.., 3]: black, red, yellow (red never decreases)."""
    v = np.clip(values, 0, 1)[..., None]
    return np.concatenate([np.minimum(1, 2 * v), np.maximum(0, 2 * v - 1), np.zeros_like(v)], axis=-1) * 255


def _cells(values: np.ndarray, grid: Grid, photo: np.ndarray) -> np.ndarray:
    """Per-token values [rows * cols, ...] blown up to the photo's pixels [H, W, ...]."""
    h, w = photo.shape[:2]
    cell = int(np.ceil(h / grid.rows))
    values = values.reshape(grid.rows, grid.cols, *values.shape[1:])
    ones = np.ones((cell, cell) + (1,) * (values.ndim - 2))
    return np.kron(values, ones)[:h, :w]


def _heat_panel(photo: np.ndarray, grid: Grid, entering: np.ndarray, importance: np.ndarray) -> Image.Image:
    values = np.zeros(grid.tokens)
    peak = importance.max() if importance.size and importance.max() > 0 else 1.0
    values[entering] = importance / peak
    colour = _cells(heat(values), grid, photo)
    return Image.fromarray((0.3 * photo + 0.7 * colour).astype(np.uint8))


def panels_for(pixels: np.ndarray, pre: dict, grid: Grid, indices_per_point: list[np.ndarray],
               merges: list[np.ndarray], importances: list[np.ndarray] | None = None,
               label: str | None = None) -> list[Image.Image]:
    """One image's panels: photo, (importance, kept) per point, merge groups."""
    photo = _display(pixels, pre)
    panels = [Image.fromarray(photo)]
    if label:
        draw = ImageDraw.Draw(panels[0])
        box = draw.textbbox((4, 2), label)
        draw.rectangle([box[0] - 2, box[1] - 1, box[2] + 2, box[3] + 1], fill=(0, 0, 0))
        draw.text((4, 2), label, fill=(255, 255, 255))
    entering = np.arange(grid.tokens)
    for i, kept in enumerate(indices_per_point):
        if importances is not None:
            panels.append(_heat_panel(photo, grid, entering, importances[i]))
            entering = kept
        panels.append(_kept_panel(photo, grid, kept))
    if merges:
        panels.append(_owner_panel(photo, grid, final_owners([m[None] for m in merges])[0]))
    return panels


def _owner_panel(photo: np.ndarray, grid: Grid, owner: np.ndarray) -> Image.Image:
    """Every patch tinted by the token that answers for it (black: none)."""
    hues = (np.arange(max(int(owner.max()), 0) + 1) * 0.61803) % 1.0     # golden-ratio hues: neighbours differ
    colours = np.array([colorsys.hsv_to_rgb(h, 0.85, 1.0) for h in hues]) * 255
    tint = _cells(np.where(owner[:, None] >= 0, colours[np.maximum(owner, 0)], 0), grid, photo)
    return Image.fromarray((0.45 * photo + 0.55 * tint).astype(np.uint8))


def _kept_panel(photo: np.ndarray, grid: Grid, kept: np.ndarray) -> Image.Image:
    cell = photo.shape[0] / grid.rows
    mask = np.full(grid.tokens, DIM)
    mask[kept] = 1.0
    panel = Image.fromarray((photo * _cells(mask, grid, photo)[..., None]).astype(np.uint8))
    draw = ImageDraw.Draw(panel)
    for p in kept:
        r, c = divmod(int(p), grid.cols)
        draw.rectangle([c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1], outline=(255, 210, 0))
    return panel


def frame_label(numbers) -> str:
    """'frame 36', or a video build's frame pair 'frames 36+37'."""
    n = np.atleast_1d(numbers)
    return f"frame {int(n[0])}" if n.size == 1 else "frames " + "+".join(str(int(x)) for x in n)


def temporal_columns(runner, groups: np.ndarray, frame_numbers: np.ndarray) -> list[list[Image.Image]]:
    """A temporal build on groups [B, G, 3, H, W] (a video build's: [B, G, 6, H, W], frame
    pairs): per frame, the frame, the patches it kept, and every patch tinted by the group's
    token that answers for it (a patch of a later frame tinted as in the anchor was answered
    by the anchor's token)."""
    out = runner.arrays(groups)
    m = runner.manifest
    grid, columns = m.grid, []
    frame_numbers = frame_numbers.reshape(groups.shape[0] * groups.shape[1], -1)    # a row per input
    for b in range(groups.shape[0]):
        for f in range(groups.shape[1]):
            photo = _display(groups[b, f], m.preprocess)
            kept = out[names.INDICES][b][(out[names.FRAMES][b] == f) & (out[names.INDICES][b] >= 0)]
            label = frame_label(frame_numbers[b * groups.shape[1] + f]) + (" (anchor)" if f == 0 else "")
            first = Image.fromarray(photo)
            draw = ImageDraw.Draw(first)
            draw.rectangle(draw.textbbox((4, 2), label), fill=(0, 0, 0))
            draw.text((4, 2), label, fill=(255, 255, 255))
            columns.append([first, _kept_panel(photo, grid, kept), _owner_panel(photo, grid, out[names.OWNERS][b, f])])
    return columns


def render(*args, **kwargs) -> Image.Image:
    """One image's strip: photo | (importance, kept) per point | merge groups."""
    return _sheet([panels_for(*args, **kwargs)])


HEADER = 30   # pixels above the panels of still images, for their column titles


def _sheet(rows: list[list[Image.Image]], gap: int = 8, row_labels: list[str] | None = None,
           col_labels: list[str] | None = None) -> Image.Image:
    """Panels laid out row by row, `gap` white pixels between them; `row_labels` go in a
    column on the left, `col_labels` in a band of HEADER pixels on top."""
    w, h = rows[0][0].size
    left, top = 0, HEADER if col_labels else 0
    if row_labels:
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        left = max(probe.textbbox((0, 0), line)[2] for text in row_labels for line in text.split("\n")) + 2 * gap
    sheet = Image.new("RGB", (left + len(rows[0]) * (w + gap) - gap, top + len(rows) * (h + gap) - gap), "white")
    draw = ImageDraw.Draw(sheet)
    for c, text in enumerate(col_labels or []):
        draw.multiline_text((left + c * (w + gap) + 2, 2), text, fill=(0, 0, 0))
    for r, row in enumerate(rows):
        if row_labels:
            draw.multiline_text((gap, top + r * (h + gap) + h // 2 - 10), row_labels[r], fill=(0, 0, 0))
        for c, panel in enumerate(row):
            sheet.paste(panel, (left + c * (w + gap), top + r * (h + gap)))
    return sheet


def panel_titles(schedule: list[dict], merged: bool) -> list[str]:
    """What each panel shows, in order: the photo, per prune point its importance and what it
    kept, then the merge groups."""
    titles = ["photo"]
    for p in schedule:
        titles += [f"importance\nafter layer {p['after_layer']}", f"kept {p['tokens']}\nafter layer {p['after_layer']}"]
    return titles + (["merge groups"] if merged else [])


def show(runner, pixels: np.ndarray, out: Path, frame_numbers: np.ndarray | None = None) -> dict:
    """Run a loaded build on pixels [B,3,H,W] and write the picture: one row of panels per
    image or, for a video's frames (`frame_numbers` given), a strip of frames: one column
    per frame, labelled with its number, one row per kind of panel."""
    m = runner.manifest
    if m.temporal:   # frames in groups: frame, kept, answered-by, one column per frame
        columns = temporal_columns(runner, pixels.reshape(-1, m.group, *pixels.shape[1:]), frame_numbers)
        sheet = _sheet([list(kind) for kind in zip(*columns)], row_labels=["frames", "kept", "answered by"])
        with atomic_path(out) as tmp:
            sheet.save(tmp, format="PNG")
        return {"images": len(columns), "points": m.prune_points, "panels": 3, "size": sheet.size, "header": 0}
    env = runner.run_all(pixels)
    to_np = runner.backend.to_numpy
    grid, pre, points = m.grid, m.preprocess, range(m.prune_points)
    indices = [to_np(env[names.indices(i)]) for i in points]
    merges = [to_np(env[names.merge(i)]) for i in points]
    importances = [to_np(env[names.stage_importance(i)]) for i in points]
    per_image = [panels_for(pixels[b], pre, grid, [x[b] for x in indices], [x[b] for x in merges],
                            [x[b] for x in importances],
                            label=None if frame_numbers is None else frame_label(frame_numbers[b]))
                 for b in range(pixels.shape[0])]
    titles = panel_titles(m.schedule, bool(indices))
    if frame_numbers is None:   # one row per image, each column titled
        sheet = _sheet(per_image, col_labels=titles)
    else:   # a strip of frames: frames across, one row per kind of panel, named on the left
        sheet = _sheet([list(kind) for kind in zip(*per_image)], row_labels=["frames", *titles[1:]])
    with atomic_path(out) as tmp:
        sheet.save(tmp, format="PNG")
    return {"images": len(per_image), "points": len(indices), "panels": len(per_image[0]), "size": sheet.size,
            "header": HEADER if frame_numbers is None else 0}
