"""A build as the vision model of an OpenVINO GenAI VLMPipeline folder.

`optimum-cli export openvino --task image-text-to-text` writes a folder that
`openvino_genai.VLMPipeline(folder, "CPU")` runs: a tokenizer, the text embeddings, the
language model and one vision model, `openvino_vision_embeddings_model.xml`, which for
LLaVA-1.5 maps `pixel_values [B,3,H,W]` to `last_hidden_state [B,N,D]` (CLIP, layer -2,
projector). GenAI expands each `<image>` by that output's length at run time
(`visual_language/llava/classes.cpp`, `normalize_prompt`), so a vision model that outputs
the build's K < N tokens shortens the prompt by N - K and nothing else changes.

`write_genai_folder` copies the export with its vision model replaced by the build's whole
chain as one graph (export/fuse.py), converted to OpenVINO IR in the build's precision,
after checking that the two belong together:
- the export is complete (every model GenAI loads, each .bin as long as its .xml says) and
  of a model type GenAI runs with a build in it (LLaVA-1.5 only; `REFUSED` says why not
  the others);
- GenAI's preprocessing (its own, from the export's preprocessor_config.json) is the
  build's recipe;
- the export's vision weights are the build's: every weight tensor of the build's stage
  graphs is found among the export's vision constants (sha256 of its values at fp16
  precision, as laid out or transposed, so an fp16 or fp32 side compares equal; weights an
  int8 export compressed, dequantized, within 2 % relative error).
The folder is written aside and swapped in whole (files.atomic_dir).
"""
from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..errors import EvoExportError
from ..files import atomic_dir, read_json, write_json
from ..manifest import Manifest, read_manifest
from ..names import FEATURES, PIXELS

VISION = "openvino_vision_embeddings_model"
VISION_OUTPUT = "last_hidden_state"
MODELS = (VISION, "openvino_text_embeddings_model", "openvino_language_model", "openvino_tokenizer",
          "openvino_detokenizer")
PROCESSOR = "preprocessor_config.json"   # what GenAI reads; transformers 5 writes processor_config.json
PROVENANCE = "evoexport-genai.json"
SUPPORTED = {"llava": "llava"}           # the export's model_type -> the build family it takes
REFUSED = {
    "llava_onevision": "OpenVINO GenAI has no LLaVA-OneVision pipeline (its LLaVA-NeXT one packs every tile's full "
                       "grid with image_newline, which a pruned tile does not have); run the build through "
                       "`evoexport serve --engine vllm` or transformers (integrations.hf_llava.attach)",
    "llava_next": "GenAI's LLaVA-NeXT pipeline packs every tile's full grid with image_newline, which a pruned tile "
                  "does not have",
    "qwen2_5_vl": "GenAI computes Qwen2.5-VL's image-pad count and mRoPE positions from its own grid, so a vision model "
                  "that keeps fewer units fails its count check and would get a dense rectangle's positions "
                  "(docs/llm.md says what GenAI would need); GenAI's own pruning for it is CDPruner after the "
                  "encoder (GenerationConfig.pruning_ratio)",
}
REFUSED["qwen2_vl"] = REFUSED["qwen3_vl"] = REFUSED["qwen2_5_vl"]
MIN_WEIGHT_ELEMENTS = 256   # smaller constants (scales, shapes) are not weights worth matching


def write_genai_folder(build_dir, export_dir, out, progress=None, on_commit=None) -> Path:
    """Write `out`: `export_dir` (an optimum-cli OpenVINO export) with the build as its vision
    model, swapped in whole; `on_commit` runs the moment it is in place. Returns `out`."""
    say = progress or (lambda line: None)
    build_dir, export_dir = Path(build_dir), Path(export_dir)
    manifest = read_manifest(build_dir).require_images("evoexport genai", build_dir)
    _check_apart(Path(out), build_dir, export_dir)
    config, processor, processor_written = check_export(export_dir)
    check_family(manifest, config, export_dir)
    check_preprocessing(manifest, processor, export_dir)
    say(f"checking that {export_dir} holds the build's vision weights")
    vision = _read_ir(export_dir / f"{VISION}.xml")
    check_shapes(manifest, vision, export_dir)
    check_weights(build_dir, manifest, vision, export_dir)
    with atomic_dir(out, on_commit) as tmp:
        say(f"copying {export_dir}")
        for f in sorted(export_dir.iterdir()):
            if f.is_file() and not f.name.startswith((VISION + ".", ".")):
                shutil.copy2(f, tmp / f.name)
        if processor_written:
            write_json(tmp / PROCESSOR, processor)
        say(f"converting the build's chain to OpenVINO IR as {VISION}.xml ({manifest.precision})")
        _save_vision_ir(build_dir, manifest, tmp)
        write_json(tmp / PROVENANCE, {"build": str(build_dir.resolve()), "export": str(export_dir.resolve()),
                                      "model": manifest.model, "keep": manifest.keep,
                                      "tokens_per_image": manifest.tokens_per_image,
                                      "unpruned_tokens": manifest.num_patches, "precision": str(manifest.precision),
                                      "weights_sha256": manifest.weights_sha256})
    say(f"wrote {out}")
    return Path(out)


def _check_apart(out: Path, *inputs: Path) -> None:
    """The output may not be (or be inside) an input: the swap would replace what it reads."""
    out = out.expanduser().resolve()
    for given in inputs:
        given = given.expanduser().resolve()
        if out == given or given in out.parents:
            raise EvoExportError(f"--out {out} is {'' if out == given else 'inside '}{given}, an input; "
                                 "write the GenAI folder elsewhere")


def check_export(export_dir: Path) -> tuple[dict, dict, bool]:
    """The export's config.json and image processor config, after checking that every model
    GenAI loads is there whole. The third value: whether preprocessor_config.json must be
    written (transformers 5 exports carry the processor in processor_config.json only)."""
    if not export_dir.is_dir():
        raise EvoExportError(f"{export_dir} is not a folder (give the folder `optimum-cli export openvino` wrote)")
    if not (export_dir / "config.json").is_file():
        raise EvoExportError(f"{export_dir} has no config.json: not an optimum-cli OpenVINO export")
    for name in MODELS:
        _check_ir_files(export_dir / f"{name}.xml")
    config = read_json(export_dir / "config.json")
    if (export_dir / PROCESSOR).is_file():
        return config, read_json(export_dir / PROCESSOR), False
    combined = export_dir / "processor_config.json"
    processor = read_json(combined) if combined.is_file() else None
    processor = processor.get("image_processor") if isinstance(processor, dict) else None
    if not isinstance(processor, dict):
        raise EvoExportError(f"{export_dir} has no {PROCESSOR} (nor an image_processor in processor_config.json); "
                             "export from a checkpoint folder that has its image processor")
    return config, processor, True


def _check_ir_files(xml: Path) -> None:
    """An IR pair as written whole: the .xml there and a .bin at least as long as the
    furthest constant the .xml points into (an interrupted copy or export is shorter)."""
    if not xml.is_file():
        raise EvoExportError(f"{xml.parent} has no {xml.name}: not a complete OpenVINO GenAI export "
                             "(run optimum-cli export openvino --task image-text-to-text again)")
    text = xml.read_text(errors="replace")
    if not text.rstrip().endswith("</net>"):
        raise EvoExportError(f"{xml} is cut short (no closing </net>): export again")
    ends = [int(o) + int(s) for o, s in re.findall(r'offset="(\d+)"\s+size="(\d+)"', text)]
    binary = xml.with_suffix(".bin")
    have = binary.stat().st_size if binary.is_file() else -1
    if ends and have < max(ends):
        raise EvoExportError(f"{binary} is {'missing' if have < 0 else f'{have} bytes'}; {xml.name} needs "
                             f"{max(ends)}: a half-written export, export again")


def check_family(manifest: Manifest, config: dict, export_dir: Path) -> None:
    kind = config.get("model_type") if isinstance(config, dict) else None
    if kind in REFUSED:
        raise EvoExportError(f"{export_dir} is a {kind} export: {REFUSED[kind]}")
    if kind not in SUPPORTED:
        raise EvoExportError(f"{export_dir} is a {kind or 'unknown'} export; evoexport genai takes LLaVA-1.5 "
                             f"(model_type {', '.join(SUPPORTED)})")
    if manifest.family != SUPPORTED[kind]:
        raise EvoExportError(f"the build is of {manifest.model} ({manifest.family}); {export_dir} is a {kind} export")


def genai_recipe(processor: dict, where: str) -> dict:
    """What GenAI does to an image for LLaVA (`preprocess_clip_image_llava`), as a recipe:
    its own bicubic resize of the shortest edge, a centre crop, x/255, mean and std from the
    processor config. It never pads, and reads no do_* flag nor resample."""
    try:
        edge, crop = processor["size"]["shortest_edge"], processor["crop_size"]
        recipe = {"pad_to_square": False, "resize": {"shortest_edge": int(edge)},
                  "crop": {"height": int(crop["height"]), "width": int(crop["width"])}, "resample": "bicubic",
                  "rescale": 1 / 255, "mean": [float(v) for v in processor["image_mean"]],
                  "std": [float(v) for v in processor["image_std"]]}
    except (KeyError, TypeError, ValueError):
        raise EvoExportError(f"{where}: GenAI reads size.shortest_edge, crop_size.height/width, image_mean and "
                             "image_std for LLaVA; they are missing or not numbers") from None
    return recipe


def check_preprocessing(manifest: Manifest, processor: dict, export_dir: Path) -> None:
    """GenAI's preprocessing of the export must be the build's recipe, step for step."""
    from ..inputs.images import as_recipe
    ours = as_recipe(manifest.preprocess, manifest.image_size)
    theirs = genai_recipe(processor, str(export_dir / PROCESSOR))
    differ = [key for key in ("pad_to_square", "resize", "crop", "resample") if ours.get(key) != theirs[key]]
    differ += [key for key in ("rescale", "mean", "std")
               if not np.allclose(np.asarray(ours[key], float), np.asarray(theirs[key], float), rtol=0, atol=1e-6)]
    if differ:
        listed = "; ".join(f"{k}: build {ours.get(k)!r}, GenAI {theirs[k]!r}" for k in differ)
        raise EvoExportError(f"GenAI would preprocess images otherwise than the build was made for ({listed}); "
                             "build from the same checkpoint without --pad-to-square or --image-size")


def check_shapes(manifest: Manifest, vision, export_dir: Path) -> None:
    shape = vision.outputs[0].get_partial_shape()
    tokens, width = shape[1], shape[2]
    want = manifest.features["shape"][2]
    if width.is_static and width.get_length() != want:
        raise EvoExportError(f"{export_dir}'s vision model gives {width.get_length()}-wide features, the build {want}: "
                             "not the same model")
    if tokens.is_static and tokens.get_length() != manifest.num_patches:
        raise EvoExportError(f"{export_dir}'s vision model gives {tokens.get_length()} tokens per image; the build "
                             f"prunes {manifest.num_patches} patches (another image size or feature strategy)")


def check_weights(build_dir: Path, manifest: Manifest, vision, export_dir: Path) -> None:
    """Every weight of the build's stages among the export's vision constants: by
    fingerprint, or (weights an int8 export compressed) within the quantization's error."""
    exact, lossy = _export_weights(vision)
    missing, total = [], 0
    for name, a in _build_weights(build_dir, manifest):
        total += 1
        if fingerprints(a) & exact:
            continue
        layouts = _layouts(a)
        if not any(_close(layouts, b) for b in lossy.get(a.size, ())):
            missing.append(name)
    if missing or not total:
        raise EvoExportError(f"{export_dir} does not hold the build's vision weights ({len(missing)} of {total} "
                             f"weight tensors differ, e.g. {missing[:2]}): export the checkpoint the build was "
                             f"made from ({manifest.checkpoint or manifest.weights})")


def _build_weights(build_dir: Path, manifest: Manifest):
    """(name, float32 array) of each floating-point weight of the build's stage graphs, but
    those of one repeated value (a fresh LayerNorm's ones, a zero bias): they say nothing
    about whose weights these are, and OpenVINO folds multiplications by one and additions
    of zero away, so they are not in the export to be found."""
    import onnx
    from onnx import numpy_helper
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    for entry in manifest.stages:
        model = onnx.load(str(build_dir / entry["file"]), load_external_data=True)
        for t in model.graph.initializer:
            if t.data_type in floats and np.prod(t.dims) >= MIN_WEIGHT_ELEMENTS:
                a = numpy_helper.to_array(t).astype(np.float32)
                if a.min() != a.max():
                    yield t.name, a


def _export_weights(vision) -> tuple[set, dict]:
    """The export's vision weights: fingerprints of the floating-point ones, and the
    compressed ones (int8 weight compression: integer constant, Convert, optional zero point
    Subtract, scale Multiply) dequantized, by element count."""
    exact, lossy = set(), {}
    for op in vision.get_ordered_ops():
        if op.get_type_name() != "Constant" or np.prod(op.get_output_shape(0)) < MIN_WEIGHT_ELEMENTS:
            continue
        if op.get_output_element_type(0).is_real():
            exact |= fingerprints(_values(op))
        else:
            weight = _dequantized(op)
            if weight is not None:
                lossy.setdefault(weight.size, []).append(weight)
    return exact, lossy


def _dequantized(const):
    """The float weight an integer constant stands for, following its decompression nodes."""
    value, node = _values(const), const
    for _ in range(5):
        users = [t.get_node() for t in node.output(0).get_target_inputs()]
        if len(users) != 1:
            break
        node = users[0]
        kind = node.get_type_name()
        other = [_constant(node.input_value(i)) for i in range(node.get_input_size())][1:]
        if kind == "Subtract" and other[0] is not None:
            value = value - other[0]
        elif kind == "Multiply" and other[0] is not None:
            value = value * other[0]
        elif kind == "Reshape" and other[0] is not None:
            value = value.reshape([int(d) for d in other[0]])
        elif kind != "Convert":
            break
    return value if value.size == np.prod(const.get_output_shape(0)) else None


def _constant(output):
    """The value of a Constant, seen through Converts; None if it is not one."""
    node = output.get_node()
    while node.get_type_name() == "Convert":
        node = node.input_value(0).get_node()
    return _values(node) if node.get_type_name() == "Constant" else None


def _values(const) -> np.ndarray:
    """A Constant's values as float32. OpenVINO hands bf16 data out as float16 (same bits,
    other meaning): those bits are widened as bf16."""
    data = const.get_data()
    if const.get_output_element_type(0).get_type_name() == "bf16":
        return (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return data.astype(np.float32)


def _layouts(weight: np.ndarray) -> list[np.ndarray]:
    """A weight flat, as laid out and (2-D and up) with its last two axes swapped."""
    views = [weight] + ([np.swapaxes(weight, -1, -2)] if weight.ndim >= 2 else [])
    return [np.ascontiguousarray(v).reshape(-1) for v in views]


def _close(layouts: list[np.ndarray], theirs: np.ndarray, tolerance: float = 0.02) -> bool:
    """Equal within int8 weight compression's error (relative L2) in one of the layouts (a
    sample of 4096 values first: most candidates of the same size differ there already)."""
    theirs = theirs.reshape(-1)
    return any(all(np.linalg.norm(x - y) <= tolerance * (np.linalg.norm(x) or 1.0)
                   for x, y in ((flat[:4096], theirs[:4096]), (flat, theirs))) for flat in layouts)


def fingerprints(array) -> set[str]:
    """sha256 of a tensor's values rounded to fp16, flat and (2-D and up) with its last two
    axes swapped: how a weight is found again after an export that transposed or halved it."""
    a = np.asarray(array, dtype=np.float32)
    views = [a] + ([np.swapaxes(a, -1, -2)] if a.ndim >= 2 else [])
    return {hashlib.sha256(np.ascontiguousarray(v.astype(np.float16)).tobytes()).hexdigest() for v in views}


def _read_ir(xml: Path):
    import openvino as ov
    try:
        return ov.Core().read_model(str(xml))
    except RuntimeError as e:
        raise EvoExportError(f"OpenVINO cannot read {xml}: {str(e).splitlines()[0]}") from None


def _save_vision_ir(build_dir: Path, manifest: Manifest, folder: Path) -> None:
    """The build's chain as one OpenVINO model named as GenAI expects: `pixel_values` in,
    the features alone out as `last_hidden_state` (the decisions' branches drop away)."""
    import openvino as ov
    from ..export.fuse import fuse
    with tempfile.TemporaryDirectory(prefix=".fused-", dir=folder.parent) as scratch:
        source = build_dir
        if len(manifest.graphs) > 1:
            source = fuse(build_dir, Path(scratch) / "fused")
        onnx_file = source / read_manifest(source).graphs[0]["file"]
        chain = ov.convert_model(str(onnx_file))
        features = next(o for o in chain.outputs if FEATURES in o.get_names())
        value = features.get_node().input_value(0)
        value.get_tensor().set_names({VISION_OUTPUT})
        chain.inputs[0].get_tensor().set_names({PIXELS})
        vision = ov.Model([ov.opset13.result(value)], chain.get_parameters(), VISION)
        vision.set_rt_info(manifest.weights_sha256 or "", ["evoexport", "weights_sha256"])
        vision.set_rt_info(str(manifest.keep), ["evoexport", "keep"])
        ov.save_model(vision, str(folder / f"{VISION}.xml"), compress_to_fp16=False)
