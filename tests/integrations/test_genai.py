"""OpenVINO GenAI's VLMPipeline with a build as its vision model (`evoexport genai`), in
GenAI's own environment (scripts/setup-env --genai), on the tiny LLaVA-1.5 checkpoint and
an `optimum-cli export openvino` of it made here. Greedy token ids are compared with GenAI's
own export at keep 1.0 and with attach() + transformers' generate() at keep 0.5.

The refusals are here rather than in tests/test_bad_input.py because each needs a real
export, which only GenAI's environment can make."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from evoexport.export.build import build
from evoexport.measure.random_vlm import make_llava_vlm
from tests.helpers import assert_one_error_line, cli
from tests.integrations.conftest import QUIET, genai_drive, generate, optimum_export, photo

PROMPT = "USER: <image>what is in the image? ASSISTANT:"   # GenAI writes K image tokens and "\n" for <image>
TOKENS = 16                                               # the tiny tower's patches


@pytest.fixture(scope="module")
def genai_export(genai_python, llava, tmp_path_factory):
    """The checkpoint's optimum-cli export and `evoexport genai` folders made from it."""
    ckpt, builds, _ = llava
    root = tmp_path_factory.mktemp("genai")
    export = optimum_export(genai_python, ckpt, root / "export")
    fp16 = build("llava", 0.5, checkpoint=str(ckpt), out=root / "build-keep0.5-fp16", precision="fp16", validate=False,
                 progress=QUIET).path
    # transformers 5 keeps the image processor in processor_config.json only; GenAI reads
    # preprocessor_config.json, which `genai` then writes
    combined = _damaged(export, root, "export-combined", lambda d: (d / "preprocessor_config.json").unlink())
    sources = {"keep1": (builds[1.0], export), "keep0.5": (builds[0.5], export), "keep0.5-fp16": (fp16, export),
               "keep0.5-combined": (builds[0.5], combined)}
    for name, (build_dir, source) in sources.items():
        code, err, _ = cli("genai", build_dir, "--from", source, "--out", root / name)
        assert code == 0, err
    return export, {name: root / name for name in sources}


def transformers_tokens(ckpt: Path, build_dir: Path | None, image: Path, k: int) -> list[int]:
    """transformers' generate() on GenAI's prompt text, its own tower (no build) or attach()."""
    from transformers import AutoTokenizer, CLIPImageProcessor, LlavaForConditionalGeneration

    from evoexport.integrations.hf_llava import attach
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    pixels = CLIPImageProcessor.from_pretrained(ckpt)(images=[Image.open(image)], return_tensors="pt")["pixel_values"]
    model = LlavaForConditionalGeneration.from_pretrained(ckpt).eval()
    if build_dir is not None:
        attach(model, build_dir)
    ids = tokenizer(PROMPT.replace("<image>", "<image>" * k + "\n"), return_tensors="pt").input_ids
    return generate(model, input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels)


def test_vlmpipeline_answers_with_k_image_tokens(genai_python, llava, genai_export, tmp_path):
    """32x32 photos (the crop size: GenAI's own bicubic resize, which is not Pillow's, does not
    move a pixel) for token equality; a 40x50 one for the token count after a resize."""
    ckpt, _, square = llava
    export, folders = genai_export
    wide = photo(tmp_path / "wide.png", 40, 50, seed=2)
    images = [square, photo(tmp_path / "square2.png", 32, seed=3), wide]
    got = genai_drive(genai_python, tmp_path, [{"name": "export", "folder": str(export)},
                                               *({"name": n, "folder": str(f)} for n, f in folders.items())],
                      [{"prompt": PROMPT, "image": str(p)} for p in images])
    k = 8
    for i, image in enumerate(images):
        assert got["keep1"][i] == got["export"][i]                               # GenAI's own tower, same answer
        for pruned in ("keep0.5", "keep0.5-fp16", "keep0.5-combined"):
            assert got[pruned][i]["input_tokens"] == got["export"][i]["input_tokens"] - (TOKENS - k)
    for i, image in enumerate(images[:2]):
        assert got["export"][i]["tokens"] == transformers_tokens(ckpt, None, image, TOKENS)
        assert got["keep0.5"][i]["tokens"] == transformers_tokens(ckpt, llava[1][0.5], image, k)
    assert got["keep0.5-combined"] == got["keep0.5"]
    assert got["keep0.5"][0]["tokens"] != got["export"][0]["tokens"]   # so the equality above says something


def test_the_folder_holds_the_build_in_its_precision(genai_export):
    import openvino as ov
    _, folders = genai_export
    types = {}
    for name in ("keep0.5", "keep0.5-fp16"):
        model = ov.Core().read_model(str(folders[name] / "openvino_vision_embeddings_model.xml"))
        types[name] = {str(op.get_output_element_type(0)) for op in model.get_ordered_ops()
                       if op.get_type_name() == "Constant" and op.get_output_element_type(0).is_real()}
        assert [o.get_any_name() for o in model.outputs] == ["last_hidden_state"]
        assert model.outputs[0].get_partial_shape()[1].get_length() == 8
    assert "<Type: 'float16'>" not in types["keep0.5"] and "<Type: 'float16'>" in types["keep0.5-fp16"]
    provenance = json.loads((folders["keep0.5"] / "evoexport-genai.json").read_text())
    assert (provenance["tokens_per_image"], provenance["unpruned_tokens"]) == (8, TOKENS)


def _damaged(export: Path, root: Path, name: str, damage) -> Path:
    copy = root / name
    shutil.copytree(export, copy)
    damage(copy)
    return copy


def _edit_json(file: Path, **changes) -> None:
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


def test_refusals_are_one_error_line_and_write_nothing(llava, genai_export, tmp_path):
    ckpt, builds, _ = llava
    export, folders = genai_export
    other = build("llava", 0.5, checkpoint=str(make_llava_vlm(tmp_path / "other-ckpt", seed=1)), out=tmp_path / "other",
                  validate=False, progress=QUIET).path
    padded = build("llava", 0.5, checkpoint=str(ckpt), out=tmp_path / "padded", pad_to_square=True, validate=False,
                   progress=QUIET).path
    cut_bin = _damaged(export, tmp_path, "cut", lambda d: (d / "openvino_language_model.bin").write_bytes(
        (d / "openvino_language_model.bin").read_bytes()[:1000]))
    no_tokenizer = _damaged(export, tmp_path, "no-tokenizer", lambda d: (d / "openvino_tokenizer.xml").unlink())
    qwen = _damaged(export, tmp_path, "qwen", lambda d: _edit_json(d / "config.json", model_type="qwen2_5_vl"))
    onevision = _damaged(export, tmp_path, "onevision",
                         lambda d: _edit_json(d / "config.json", model_type="llava_onevision"))
    mean = _damaged(export, tmp_path, "mean", lambda d: _edit_json(d / "preprocessor_config.json",
                                                                   image_mean=[0.5, 0.5, 0.5]))
    combined_list = _damaged(export, tmp_path, "combined-list", lambda d: (
        (d / "preprocessor_config.json").unlink(), (d / "processor_config.json").write_text("[1, 2]")))
    cases = [(other, export, "does not hold the build's vision weights"),
             (padded, export, "pad_to_square"),
             (builds[0.5], cut_bin, "half-written export"),
             (builds[0.5], no_tokenizer, "has no openvino_tokenizer.xml"),
             (builds[0.5], qwen, "image-pad count and mRoPE positions"),
             (builds[0.5], onevision, "no LLaVA-OneVision pipeline"),
             (builds[0.5], mean, "mean"),
             (builds[0.5], tmp_path / "nowhere", "is not a folder"),
             (builds[0.5], combined_list, "no preprocessor_config.json"),
             (tmp_path / "no-build", export, "")]
    for build_dir, source, msg in cases:
        code, err, _ = cli("genai", build_dir, "--from", source, "--out", tmp_path / "out")
        assert_one_error_line(code, err, msg)
        assert not (tmp_path / "out").exists()
    for out in (export, export / "inside", builds[0.5]):          # the output may not replace an input
        code, err, _ = cli("genai", builds[0.5], "--from", export, "--out", out)
        assert_one_error_line(code, err, "an input")
    assert not (export / "evoexport-genai.json").exists() and not (export / "inside").exists()
    before = (folders["keep0.5"] / "openvino_vision_embeddings_model.bin").read_bytes()
    code, err, _ = cli("genai", other, "--from", export, "--out", folders["keep0.5"])   # a good folder stays
    assert_one_error_line(code, err, "vision weights")
    assert (folders["keep0.5"] / "openvino_vision_embeddings_model.bin").read_bytes() == before


def test_an_int8_export_takes_the_build(genai_python, llava, tmp_path):
    """optimum-intel's --weight-format int8 compresses the vision weights too: they are found
    again dequantized (within the compression's error), and other weights are still refused."""
    ckpt, builds, square = llava
    int8 = tmp_path / "export-int8"
    optimum_export(genai_python, ckpt, int8, weights="int8")
    code, err, _ = cli("genai", builds[0.5], "--from", int8, "--out", tmp_path / "keep0.5-int8")
    assert code == 0, err
    other = build("llava", 0.5, checkpoint=str(make_llava_vlm(tmp_path / "other-ckpt", seed=1)), out=tmp_path / "other",
                  validate=False, progress=QUIET).path
    code, err, _ = cli("genai", other, "--from", int8, "--out", tmp_path / "refused")
    assert_one_error_line(code, err, "does not hold the build's vision weights")
    got = genai_drive(genai_python, tmp_path, [{"name": "int8", "folder": str(int8)},
                                               {"name": "keep0.5", "folder": str(tmp_path / "keep0.5-int8")}],
                      [{"prompt": PROMPT, "image": str(square)}])
    assert got["keep0.5"][0]["input_tokens"] == got["int8"][0]["input_tokens"] - 8
