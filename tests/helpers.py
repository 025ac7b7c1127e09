"""What several test modules share: the repository root, the CLI run as a user runs it,
the one-error-line check, a clip maker, and ways to damage a build."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEASURED = ROOT / "docs" / "measurements"
CLI = [sys.executable, "-m", "evoexport.cli"]


def cli(*args, cwd=None):
    proc = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd)
    return proc.returncode, proc.stderr.strip().splitlines(), proc.stdout


def assert_one_error_line(code, err, msg):
    """Exit 2; stderr ends with exactly one 'error:' line (progress lines may come before)."""
    assert code == 2, err
    assert not any("Traceback" in line for line in err), err
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and err[-1] == errors[0], err
    assert msg in errors[0], err


def rehash_build(build: Path) -> None:
    """Recompute every sha256 in the manifest, as a careless (or hostile) edit would."""
    from evoexport.manifest import Manifest, sha256_file
    m = json.loads((build / "manifest.json").read_text())
    for g in Manifest(m).graphs:
        g["sha256"] = sha256_file(build / g["file"])
        if g.get("data_file"):
            g["data_sha256"] = sha256_file(build / g["data_file"])
    (build / "manifest.json").write_text(json.dumps(m))


def rename_tensor(build: Path, file: str, old: str, new: str) -> None:
    import onnx
    model = onnx.load(str(build / file), load_external_data=False)
    for value in [*model.graph.input, *model.graph.output]:
        if value.name == old:
            value.name = new
    for node in model.graph.node:
        node.input[:] = [new if x == old else x for x in node.input]
        node.output[:] = [new if x == old else x for x in node.output]
    onnx.save(model, str(build / file))


def swap_graphs(build: Path, a: str, b: str) -> None:
    (build / a).rename(build / "swap.tmp")
    (build / b).rename(build / a)
    (build / "swap.tmp").rename(build / b)




def hostile_importance(imp, pattern: str, g):
    """Importance scores as hostile as a selection may meet: exact ties, NaN, +-inf, all
    equal (other patterns leave `imp` as it is)."""
    import torch
    if pattern == "ties":
        return torch.round(imp * 3) / 3
    imp = imp.clone()
    if pattern == "nan":
        imp[torch.rand(imp.shape, generator=g) < 0.4] = float("nan")
    elif pattern == "inf":
        imp[torch.rand(imp.shape, generator=g) < 0.3] = float("inf")
        imp[torch.rand(imp.shape, generator=g) < 0.3] = -float("inf")
    elif pattern == "equal":
        imp[:] = 0.05
    return imp


def split_vision_and_language(path: Path) -> Path:
    """A checkpoint saved by transformers re-sharded so its vision tensors and its language
    model's sit in files of their own (loaders must never open the language model's)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    parts = {"vision.safetensors": {k: v for k, v in tensors.items() if "visual" in k},
             "language.safetensors": {k: v for k, v in tensors.items() if "visual" not in k}}
    for name, part in parts.items():
        save_file({k: v.contiguous() for k, v in part.items()}, path / name, metadata={"format": "pt"})
    weight_map = {k: name for name, part in parts.items() for k in part}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path
