"""The default int8 calibration set: real photos that ship inside scikit-image's wheel.

Validation uses astronaut, coffee and chelsea (images.SAMPLE_PHOTOS); calibration uses
*other* photos, so an int8 build is never checked on the images it was calibrated on.
They are copied into calib/ (or the user cache, for an installed package) on first use,
so a repository checkout keeps no binary copies. See calib/README.md.
"""
from __future__ import annotations

import os
from pathlib import Path

# scikit-image data bundled in its wheel (no download): name -> what it shows (licence as skimage states it)
CALIB_PHOTOS = {
    "rocket": "DSCOVR launch on a Falcon 9 (SpaceX, public domain)",
    "stereo_motorcycle": "a motorcycle, left view of a stereo pair (Middlebury stereo data)",
    "hubble_deep_field": "Hubble eXtreme Deep Field (NASA, public domain)",
    "retina": "a human retina (CC0)",
    "immunohistochemistry": "stained tissue under a microscope (no known copyright restrictions)",
    "coins": "Greek coins from Pompeii (grey; no known copyright restrictions)",
    "camera": "a man with a camera (grey; CC0)",
    "cell": "a cell floating in saline (grey; CC0)",
    "page": "a scanned page of text (grey)",
    "brick": "a brick wall (grey; CC0 texture)",
    "grass": "grass (grey; CC0 texture)",
    "gravel": "gravel (grey; CC0 texture)",
    "horse": "a horse silhouette (black and white; CC0)",
}


def materialize(preferred: Path) -> Path:
    """The calibration folder, with every photo above in it. A fill that was interrupted is
    completed on the next use (each photo is written atomically, and completeness is every
    name being present, not any PNG being there)."""
    folder = preferred if os.access(preferred if preferred.exists() else preferred.parent, os.W_OK) else \
        Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")) / "evoexport" / "calib"
    folder.mkdir(parents=True, exist_ok=True)
    missing = [name for name in CALIB_PHOTOS if not (folder / f"{name}.png").is_file()]
    if missing:
        import numpy as np
        from PIL import Image
        from skimage import data

        from ..files import atomic_path
        for name in missing:
            array = getattr(data, name)()
            if isinstance(array, tuple):   # a stereo pair (and its disparity): the left view
                array = array[0]
            if array.dtype == bool:
                array = array.astype(np.uint8) * 255
            with atomic_path(folder / f"{name}.png") as tmp:
                Image.fromarray(array).save(tmp, format="PNG")
    return folder
