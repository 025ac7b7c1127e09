"""The interface every model family implements, and nothing of any family.

`TowerSpec` sizes a tower (recorded in the manifest). `BaseTower` is what the stage
builder, the selections, the exporters and the cost model see: `embed`, `layers`,
`project`, `probe_attention` and the sizes. `Family` is what a family module registers
(models/registry.py): its tower class and how to make a spec and load weights.
"""
from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import nn

from ..errors import EvoExportError
from ..names import Grid, size_hw


@dataclass
class TowerSpec:
    """Everything that sizes a tower; recorded in the manifest."""
    vision: dict            # CLIPVisionConfig.to_dict() (full depth, as in the checkpoint)
    projector: dict | None  # {"out_features", "act", "bias"}
    feature_layer: int
    select_strategy: str
    preprocess: dict
    # pixels fed to the tower, where the config's image_size differs (DINOv2): an int (a
    # square) or (height, width) (a Qwen build at one of the processor's non-square grids)
    input_size: int | tuple | None = None
    # a pruned token is a unit x unit block of patches (Qwen2.5-VL: 2, its patch merger's
    # 2x2 units); budgets, indices and the spatial term count units
    unit: int = 1
    # the layers the default schedule prunes after, where the family has a reason to choose
    # them (Qwen2.5-VL: its full-attention blocks); None: DEFAULT_PRUNE_DEPTHS
    prune_layers: tuple | None = None
    # frames per input, stacked on the channel axis: 1 for images; Qwen2.5-VL video builds
    # take its temporal patches of 2 frames ([B, 6, S, S], frame t's RGB then frame t+1's)
    frames: int = 1

    @property
    def input_hw(self) -> tuple[int, int]:
        """(height, width) in pixels of what the tower takes."""
        return size_hw(self.input_size or self.vision["image_size"])

    @property
    def token_grid(self) -> Grid:
        """The grid of prunable tokens (patches, or units of unit x unit patches)."""
        h, w = self.input_hw
        step = self.vision["patch_size"] * self.unit
        return Grid(h // step, w // step)

    @property
    def depth(self) -> int:
        """Number of encoder layers actually run (up to the feature layer)."""
        n = self.vision.get("num_hidden_layers", self.vision.get("depth"))
        fl = self.feature_layer
        run = fl if fl >= 0 else n + 1 + fl
        if not 1 <= run <= n:
            raise EvoExportError(f"feature layer {fl} is outside a {n}-layer encoder")
        return run


class BaseTower(nn.Module):
    """What every family's tower shares. A family supplies `embed`, `layers`, `project`,
    `probe_attention` and its sizes; the stage builder, the selections and the exporters
    see only this interface."""

    spec: TowerSpec
    has_cls: bool
    weights_info: dict
    resizable = False   # takes --image-size (position embeddings interpolated at build time)
    any_grid = False    # takes non-square sizes too (Qwen: the processor's own grids)
    # the probe's query: "cls" (CLS's row, towers with CLS) or "mean" (mean patch query: towers
    # without CLS always; `evoexport eval` also sets it on DINOv2 to measure that rule)
    importance_query = "cls"

    def _set_sizes(self, *, hidden: int, heads: int, mlp: int, image_size, patch: int, out_features: int,
                   drop_cls: bool) -> None:
        """The sizes the stage builder, the cost model and the manifest read."""
        # the patch convolution drops a remainder (SigLIP-384: 27 patches of 14 px, 6 px unused)
        self.has_cls = True   # CLIP and DINOv2; SigLIP sets False (the selection handles both)
        self.hidden_size, self.num_heads, self.mlp_size = hidden, heads, mlp
        height, width = size_hw(image_size)
        self.image_size = image_size            # an int (a square), or (height, width)
        self.image_hw = (height, width)
        self.grid = Grid(height // patch, width // patch)
        self.num_patches = self.grid.tokens
        self.out_features, self.drop_cls = out_features, drop_cls
        self.weights_info = {}

    def hf_forward(self, device="cpu", dtype=None):
        """transformers' own model carrying this tower's weights: fn(pixel_values) -> features
        (baselines and parity checks)."""
        raise NotImplementedError

    @staticmethod
    def _config(config_cls, spec: TowerSpec):
        """transformers' config for the layers actually run (up to the feature layer), SDPA attention."""
        cfg = config_cls.from_dict({**spec.vision, "num_hidden_layers": spec.depth})
        cfg._attn_implementation = "sdpa"
        return cfg

    @property
    def depth(self) -> int:
        return len(self.layers)

    @property
    def input_channels(self) -> int:
        return 3 * self.spec.frames

    @property
    def compute_dtype(self) -> torch.dtype:
        return next(p.dtype for n, p in self.layers[0].named_parameters() if n.endswith("weight") and p.dim() == 2)

    def probe_attention(self, index: int) -> tuple[nn.Module, int, float]:
        """(attention module with q_proj and k_proj, heads, logit scale) of layer `index`."""
        raise NotImplementedError

    # What a family whose prunable token is not one sequence position overrides
    # (models/qwen2_5_vl.py): the stage builder calls these and nothing else of the family.
    positional = False        # stages after a prune point take the kept indices (rotary, windows)
    patches_per_token = 1     # sequence positions per prunable token (Qwen2.5-VL: 4)
    mlp_matrices = 2          # fc1, fc2; a gated MLP has 3 (cost model)

    # DeepStack (Qwen3-VL): blocks whose output also leaves the encoder through its own merger
    taps: tuple = ()

    def tap_features(self, j: int, hidden: torch.Tensor) -> torch.Tensor:
        """Tap j from the hidden states [B, T, D] after its block: [B, N, D_out]."""
        raise NotImplementedError

    def attention_keys(self, layer: int, positions: int, pruned: bool) -> int:
        """Keys each query meets in `layer` (cost model): all positions, unless windowed."""
        return positions

    def projector_flops(self, tokens: int) -> int:
        """FLOPs of the output head on `tokens` kept tokens (cost model)."""
        if getattr(self, "projector", None) is None:
            return 0
        d, out = self.hidden_size, self.out_features
        return 2 * tokens * (d * out + out * out)

    def run_layers(self, hidden: torch.Tensor, first: int, last: int, key_bias: torch.Tensor | None,
                   positions: torch.Tensor | None, probe: bool, square_mask: bool = False) -> torch.Tensor:
        """Layers [first, last) over `hidden` [B, T, D]. `key_bias` [B, T]: added to every
        query's logit for that key (log token size: proportional attention). `positions`
        [B, K]: the kept tokens' original indices (positional families only). `probe`: the
        last layer's q and k reach the stage's probe (the hooks on probe_attention's q_proj,
        k_proj fire in every layer's forward here)."""
        mask = None
        if key_bias is not None:
            mask = key_bias[:, None, None, :]
            if square_mask:
                # ONNX's Attention op (opset 23) in ONNX Runtime wants the mask's query axis
                # spelled out: [B, 1, T, T] rather than [B, 1, 1, T]; same numbers
                mask = mask.expand(-1, -1, mask.shape[-1], -1)
            mask = mask.to(hidden.dtype)   # once per stage, not once per layer
        for layer in self.layers[first:last]:
            hidden = layer(hidden, mask)
        return hidden

    def key_bias(self, log_sizes: torch.Tensor) -> torch.Tensor:
        """[B, K] log size of each kept token -> [B, T] bias of each sequence position as a key."""
        if self.has_cls:
            return torch.cat([torch.zeros_like(log_sizes[:, :1]), log_sizes], dim=1)
        return log_sizes

    def to_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """The stage's hidden states [B, T, D] as the selection's tokens [B, c+N, D']."""
        return hidden

    def from_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Inverse of to_tokens: a selection's kept tokens back to sequence positions."""
        return tokens

    def token_importance(self, importance: torch.Tensor) -> torch.Tensor:
        """[B, T - c] importance of each patch position -> [B, N] of each prunable token."""
        return importance

    def reduced_precision_copy(self, dtype: torch.dtype, fp32_norms: bool = True) -> "BaseTower":
        """A copy whose weights and math are in `dtype` (fp16/bf16 builds), except LayerNorm,
        which keeps fp32 weights and statistics: CLIP's activation outliers would otherwise
        lose their mean and variance to rounding. `fp32_norms=False` leaves LayerNorm in
        `dtype` (the GPU chain: PyTorch's CUDA kernel accumulates its statistics in fp32
        anyway, and the casts around an fp32 island cost ~10% of a layer there)."""
        twin = copy.deepcopy(self).to(dtype)
        for module in twin.modules():
            # deepcopy copies hooks too: the stages' q/k capture hooks would write the
            # twin's activations into the fp32 pipeline's stages. The twin's own pipeline
            # registers its own.
            module._forward_hooks.clear()
            module._forward_pre_hooks.clear()
        for module in list(twin.modules()):
            for name, child in module.named_children():
                if isinstance(child, nn.LayerNorm) and fp32_norms:
                    setattr(module, name, Float32LayerNorm.from_layer_norm(child))
                elif isinstance(child, nn.Conv2d):   # ONNX Conv has no bf16; pixels keep full precision
                    setattr(module, name, Float32Conv2d.from_conv(child, dtype))
        return twin

    def state_sha256(self) -> str:
        h = hashlib.sha256()
        for name, t in sorted(self.state_dict().items()):
            t = t.detach().contiguous().cpu()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()


class Float32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 inside a reduced-precision tower (a Cast island in the ONNX)."""

    @classmethod
    def from_layer_norm(cls, ln: nn.LayerNorm) -> "Float32LayerNorm":
        out = cls(ln.normalized_shape, eps=ln.eps, elementwise_affine=ln.elementwise_affine)
        out.load_state_dict({k: v.float() for k, v in ln.state_dict().items()})
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


class Float32Conv2d(nn.Conv2d):
    """The patch embedding of a reduced-precision tower, computed in fp32 on the fp32 pixels;
    its output joins the tower's dtype."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, out_dtype: torch.dtype) -> "Float32Conv2d":
        out = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                  conv.dilation, conv.groups, conv.bias is not None)
        out.load_state_dict({k: v.float() for k, v in conv.state_dict().items()})
        out.out_dtype = out_dtype
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(self.out_dtype)


class Family(NamedTuple):
    """What a model family module supplies to the generic loader."""
    tower: type
    spec_from_preset: Callable
    spec_from_checkpoint: Callable
    load_weights: Callable
