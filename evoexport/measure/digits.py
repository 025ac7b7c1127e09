"""Does EvoPrune keep what matters? Accuracy of a trained digits ViT under token pruning.

Random weights cannot answer this, so `digits-vit` (models/vit_digits.py) is trained on
scikit-learn's digits (digits_train.py; the weights ship in data/digits-vit)
and classified from its CLS token while EvoPrune and its ablations prune its patch tokens.
The PyTorch reference Pipeline is evaluated, i.e. exactly what the exported graphs compute.
Used by tests/measure/test_digits.py and experiments/digits_accuracy.py (the table in docs/evoprune.md).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from ..models import default_params, load_tower
from ..prune.cost import tower_flops
from ..prune.selection import PruneParams
from ..prune.schedule import PrunePoint, default_schedule, parse_schedule
from ..pipeline.stages import Pipeline


CHECKPOINT = Path(__file__).resolve().parents[1] / "data" / "digits-vit"   # the trained weights, package data

# selection methods compared
EVOPRUNE = "evoprune"
ATTENTION_TOPK = "attention top-k"
RANDOM = "random"


@dataclass
class Result:
    method: str
    keep: float
    schedule: str
    merge: bool
    accuracy: float
    gflops: float


class DigitsBench:
    def __init__(self, checkpoint: str | Path = CHECKPOINT):
        self.tower = load_tower("digits-vit", checkpoint, quiet=True)
        head = load_file(Path(checkpoint) / "head.safetensors")
        self.head = torch.nn.Linear(self.tower.hidden_size, 10)
        self.head.load_state_dict(head)
        self.post_norm = self.tower._vision_model.post_layernorm
        _, _, x, y = digits_split()
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)

    def schedule(self, keep: float, first_layer: bool = False) -> list[PrunePoint]:
        t = self.tower
        if first_layer:  # one cut straight after layer 0
            return parse_schedule(f"0:{keep}", t.depth, t.num_patches)
        return default_schedule(t.depth, t.num_patches, keep)

    @torch.inference_mode()
    def accuracy(self, points: list[PrunePoint], params: PruneParams, rescore=None) -> float:
        pipe = Pipeline(self.tower, points, params)
        correct = 0
        for i in range(0, len(self.x), 128):
            feats = pipe.run(self.x[i:i + 128], rescore=rescore)["features"]
            logits = self.head(self.post_norm(feats[:, 0]))
            correct += int((logits.argmax(1) == self.y[i:i + 128]).sum())
        return correct / len(self.x)

    @torch.inference_mode()
    def build_accuracy(self, build_dir, backend: str = "onnxruntime", **options) -> float:
        """Accuracy of an exported build of these weights (any precision) on a backend."""
        from ..runtime.runner import load

        runner = load(build_dir, backend=backend, **options)
        if runner.manifest.weights_sha256 != self.tower.weights_info["weights_sha256"]:
            raise ValueError(f"{build_dir} was not built from the digits-vit weights")
        correct = 0
        for i in range(0, len(self.x), 128):
            feats = torch.as_tensor(runner.backend.to_numpy(runner(self.x[i:i + 128].numpy()).features))
            logits = self.head(self.post_norm(feats[:, 0]))
            correct += int((logits.argmax(1) == self.y[i:i + 128]).sum())
        return correct / len(self.x)

    def evaluate(self, method: str, keep: float, merge: bool = True, first_layer: bool = False,
                 seed: int = 0) -> Result:
        points = [] if keep == 1.0 else self.schedule(keep, first_layer)
        rescore = None
        if method == EVOPRUNE:
            params = dataclasses.replace(default_params("digits-vit"), merge=merge)
        else:  # plain top-k on a score: no redundancy, no diversity, no merge
            params = PruneParams(importance_ratio=1.0, redundancy_weight=0.0, merge=False)
            if method == RANDOM:
                g = torch.Generator().manual_seed(seed)
                rescore = lambda imp: torch.rand(imp.shape, generator=g)  # noqa: E731
        acc = self.accuracy(points, params, rescore)
        sched = ",".join(f"{p.after_layer}:{p.tokens}" for p in points) or "-"
        return Result(method, keep, sched, params.merge, acc, tower_flops(self.tower, points, params) / 1e9)


# The data: scikit-learn's digits as a 32 px ViT sees them (the digits-vit preset).
def digits_pixels(images: np.ndarray) -> np.ndarray:
    """scikit-learn digits [N, 8, 8] in 0..16 -> normalized pixel values float32 [N, 3, 32, 32]."""
    x = np.asarray(images, np.float32) / 16.0
    x = x.repeat(4, axis=1).repeat(4, axis=2)
    x = (x - 0.5) / 0.5
    return np.ascontiguousarray(np.repeat(x[:, None], 3, axis=1))


def digits_split(seed: int = 0):
    """(train_x, train_y, test_x, test_y): a fixed stratified 75/25 split of the 1797 digits."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    xtr, xte, ytr, yte = train_test_split(d.images, d.target, test_size=0.25, random_state=seed, stratify=d.target)
    return digits_pixels(xtr), ytr, digits_pixels(xte), yte
