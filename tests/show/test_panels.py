"""`evoexport show`: the picture says what the build kept."""
from __future__ import annotations

import numpy as np
from PIL import Image

import evoexport
from evoexport.cli import main
from evoexport.inputs.images import sample_batch
from evoexport.manifest import read_manifest
from evoexport.runtime.runner import final_owners
from evoexport.show.panels import HEADER, DIM


def test_show_dims_exactly_the_dropped_patches_and_colours_merge_groups(tiny_build, tmp_path, capsys):
    out = tmp_path / "kept.png"
    assert main(["show", str(tiny_build), "--output", str(out)]) == 0
    assert "3 image(s) x 6 panels" in capsys.readouterr().out
    m = read_manifest(tiny_build).data
    size, grid = m["tower"]["image_size"], m["tower"]["grid"]
    sheet = np.asarray(Image.open(out).convert("RGB")).astype(float)
    assert sheet.shape == (HEADER + 3 * (size + 8) - 8, 6 * (size + 8) - 8, 3)
    assert (sheet[:HEADER] < 128).any(axis=2).sum() > 50        # the column titles are written on top
    sheet = sheet[HEADER:]
    x = sample_batch(size, m["preprocess"])
    runner = evoexport.load(tiny_build)
    result, env = runner(x), runner.run_all(x)
    cell = size // grid
    photo, panel = sheet[:size, :size], sheet[:size, 2 * (size + 8): 3 * size + 16]
    # the heat map of point 0: the most important patch is the reddest
    heat = sheet[:size, size + 8: 2 * size + 8]
    red = np.array([(heat[r * cell + 3, c * cell + 3, 0] - 0.3 * photo[r * cell + 3, c * cell + 3, 0]) / 0.7
                    for r in range(grid) for c in range(grid)])
    assert abs(red[int(np.argmax(env["stage0_importance"][0]))] - 255) <= 2
    kept = set(result.indices_per_point[0][0].tolist())
    for p in range(grid * grid):
        r, c = divmod(p, grid)
        inner = (slice(r * cell + 1, (r + 1) * cell - 1), slice(c * cell + 1, (c + 1) * cell - 1))
        want = photo[inner] if p in kept else photo[inner] * DIM
        assert np.abs(panel[inner] - want).max() <= 1.0, p
    # the merge panel: patches with the same final owner share one colour
    owner = final_owners([mg[:1] for mg in result.merge_per_point])[0]
    merged = sheet[:size, 5 * (size + 8):]
    tint = (merged - 0.45 * photo) / 0.55
    means = {}
    for p in range(grid * grid):
        r, c = divmod(p, grid)
        means.setdefault(int(owner[p]), []).append(tint[r * cell + 2, c * cell + 2])
    for colours in means.values():
        assert np.ptp(np.array(colours), axis=0).max() <= 3.0


def test_show_refuses_a_non_png_output(tiny_build, tmp_path, capsys):
    assert main(["show", str(tiny_build), "--output", str(tmp_path / "x.jpg")]) == 2
    assert "must be a .png" in capsys.readouterr().err
