"""Complete VLM checkpoints with random weights, for the engine tests (vLLM) and the serving
benchmark: weights, a byte-level BPE tokenizer trained here on a few sentences, the
processor and a chat template, all saved by transformers, so an engine loads them from a
folder as it loads a real checkpoint. No model hub is needed.

Two sizes (`size`): "tiny" for tests (language models of head size 64: vLLM's CPU attention
takes 32, 64, 80, ... only), and the full shapes of the published models the benchmark
stands in for (Qwen2.5-VL-3B, LLaVA-OneVision-0.5B, LLaVA-1.5's tower with TinyLlama-1.1B),
made in bf16. A full-size model's
speed is its shape's; its answers mean nothing."""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch

CORPUS = ["a photo of a cat on a mat", "what is in the image? describe it in one sentence.",
          "the quick brown fox jumps over the lazy dog", "USER: ASSISTANT: user assistant system",
          "red green blue yellow black white, one two three four five six seven eight nine ten"] * 4
BASE_VOCAB = 300          # byte-level alphabet (256) plus merges; special tokens come after
TEXT = dict(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=2,
            vocab_size=320, max_position_embeddings=1024)

LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% elif message['role'] == 'assistant' %} ASSISTANT: {{ message['content'] }}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}")
ONEVISION_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# LLaVA-OneVision's anyres tilings, scaled to 56-px tiles: up to 3 tiles a side, and 4x4,
# whose grid needs the anyres_max_9 resize (a square image of 224 px or more takes it)
ONEVISION_PINPOINTS = [[56, 56], [56, 112], [112, 56], [112, 112], [56, 168], [168, 56], [112, 168], [168, 112],
                       [224, 224]]
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_tokenizer(specials: list[str], **roles):
    """A byte-level BPE tokenizer (ids below BASE_VOCAB) with `specials` after it; `roles`
    names them (bos_token="<s>", ...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BASE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **roles)


def _classic_llava_names(file: Path) -> None:
    """The tensor names llava-hf's published LLaVA and LLaVA-OneVision checkpoints use
    (vision_tower.vision_model.*),
    which transformers 5 loads and vLLM expects; transformers 5 itself saves
    vision_tower.embeddings.*, which vLLM 0.32 refuses."""
    from safetensors.torch import load_file, save_file
    tensors = {}
    for name, t in load_file(file).items():
        if name.startswith("vision_tower.") and not name.startswith("vision_tower.vision_model."):
            name = "vision_tower.vision_model." + name[len("vision_tower."):]
        tensors[name] = t.contiguous()
    save_file(tensors, file, metadata={"format": "pt"})


LLAVA_SIZES = {
    "tiny": dict(vision=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=3,
                             image_size=32, patch_size=8), text=TEXT),
    # LLaVA-1.5's CLIP ViT-L/14-336 with TinyLlama-1.1B's shape as the language model
    "tinyllama": dict(vision=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                                  num_hidden_layers=24, image_size=336, patch_size=14),
                      text=dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
                                num_hidden_layers=22, vocab_size=32000, max_position_embeddings=2048)),
}


def make_llava_vlm(path: Path, seed: int = 0, size: str = "tiny") -> Path:
    """LLaVA-1.5: "tiny", a 3-layer CLIP tower (32 px, 16 patches), the projector, a 2-layer
    Llama; "tinyllama", the published CLIP ViT-L/14-336 and TinyLlama-1.1B's shape.
    Tokenizer, CLIPImageProcessor and chat template beside it."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    shape = LLAVA_SIZES[size]
    tokenizer = make_tokenizer(["<s>", "</s>", "<unk>", "<pad>", "<image>"], bos_token="<s>", eos_token="</s>",
                               unk_token="<unk>", pad_token="<pad>")
    cfg = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", **shape["vision"], hidden_act="quick_gelu"),
        text_config=dict(model_type="llama", **shape["text"], bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    with _made_in(size, seed):
        LlavaForConditionalGeneration(cfg).eval().save_pretrained(path, safe_serialization=True)
    for file in path.glob("model*.safetensors"):
        _classic_llava_names(file)
    pixels = shape["vision"]["image_size"]
    images = CLIPImageProcessor(size={"shortest_edge": pixels}, crop_size={"height": pixels, "width": pixels},
                                image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])
    LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=shape["vision"]["patch_size"],
                   vision_feature_select_strategy="default", image_token="<image>", chat_template=LLAVA_TEMPLATE,
                   num_additional_image_tokens=1).save_pretrained(path)
    images.save_pretrained(path)       # preprocessor_config.json too, as older tools read it
    tokenizer.chat_template = LLAVA_TEMPLATE
    tokenizer.save_pretrained(path)
    return path


QWEN_SIZES = {
    "tiny": dict(vision=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, fullatt_block_indexes=[1]),
                 text=TEXT, mrope=[16, 8, 8], pixels=224),
    "3b": dict(vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                           fullatt_block_indexes=[7, 15, 23, 31]),
               text=dict(hidden_size=2048, intermediate_size=11008, num_attention_heads=16, num_key_value_heads=2,
                         num_hidden_layers=36, vocab_size=151936, max_position_embeddings=32768),
               mrope=[16, 24, 24], pixels=448),
}
# Qwen2.5-VL-3B's vision tower with Qwen2-0.5B's language model: optimum-intel's export of
# the whole 3B model needed more than this machine's 24 GB (killed at 23.7 GB resident)
QWEN_SIZES["3b-vision"] = dict(vision=QWEN_SIZES["3b"]["vision"], mrope=[8, 12, 12], pixels=448,
                               text=dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14,
                                         num_key_value_heads=2, num_hidden_layers=24, vocab_size=151936,
                                         max_position_embeddings=32768))
ONEVISION_SIZES = {
    "tiny": dict(vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                             image_size=56, patch_size=8), text=TEXT, pinpoints=ONEVISION_PINPOINTS),
    # SigLIP so400m (26 layers, as llava-hf's checkpoints keep) and Qwen2-0.5B, 384-px tiles up to 6x6
    "0.5b": dict(vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                             image_size=384, patch_size=14),
                 text=dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2,
                           num_hidden_layers=24, vocab_size=151936, max_position_embeddings=32768),
                 pinpoints=[[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]),
}


@contextmanager
def _made_in(size: str, seed: int):
    """Weights drawn from `seed`; a full-size model in bf16 (half the memory of fp32)."""
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32 if size == "tiny" else torch.bfloat16)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _save_processor_files(path: Path, tokenizer, template: str, processor: dict) -> None:
    """processor_config.json written by hand: transformers' processors want a video processor,
    which needs torchvision (not in the project's environment); engines load them from these."""
    (path / "processor_config.json").write_text(json.dumps(processor) + "\n")
    (path / "chat_template.jinja").write_text(template)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(path)


def make_qwen_vlm(path: Path, seed: int = 0, size: str = "tiny") -> Path:
    """Qwen2.5-VL: "tiny", a 2-block vision tower (window attention, 2x2 merge) at 224 px (64
    units) and a 2-layer Qwen2; "3b", Qwen2.5-VL-3B's shape at 448 px (256 units); "3b-vision",
    its vision tower with Qwen2-0.5B's language model. Tokenizer,
    Qwen2VLImageProcessor (min = max pixels: every image at that size) and chat template."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor

    shape = QWEN_SIZES[size]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    tokenizer = make_tokenizer(specials, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in specials}
    cfg = Qwen2_5_VLConfig(
        vision_config=dict(**shape["vision"], out_hidden_size=shape["text"]["hidden_size"], patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=112, in_channels=3),
        text_config=dict(model_type="qwen2_5_vl_text", **shape["text"], rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0, "mrope_section": shape["mrope"]},
            bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    with _made_in(size, seed):
        Qwen2_5_VLForConditionalGeneration(cfg).eval().save_pretrained(path, safe_serialization=True)
    pixels = shape["pixels"] ** 2
    Qwen2VLImageProcessor(min_pixels=pixels, max_pixels=pixels, patch_size=14, merge_size=2,
                          temporal_patch_size=2).save_pretrained(path)
    _save_processor_files(path, tokenizer, QWEN_TEMPLATE, {"processor_class": "Qwen2_5_VLProcessor"})
    return path


def make_qwen3_vlm(path: Path, seed: int = 0) -> Path:
    """Qwen3-VL, tiny: a 3-block vision tower (patch 16, 2x2 merge, DeepStack taps after 0
    and 1, a 4x4 position table interpolated) at 256 px (64 units) and a 2-layer Qwen3 with
    interleaved mRoPE. Tokenizer, Qwen2VLImageProcessor (min = max pixels) and chat template."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    tokenizer = make_tokenizer(specials, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in specials}
    cfg = Qwen3VLConfig(
        vision_config=dict(depth=3, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                           deepstack_visual_indexes=[0, 1]),
        text_config=dict(**{**TEXT, "max_position_embeddings": 2048}, head_dim=64, rope_parameters={
            "rope_type": "default", "rope_theta": 5e6, "mrope_section": [16, 8, 8], "mrope_interleaved": True},
            bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    with _made_in("tiny", seed):
        model = Qwen3VLForConditionalGeneration(cfg).eval()
        with torch.no_grad():   # the DeepStack mergers and position table away from their init
            for name, p in model.named_parameters():
                if "visual" in name:
                    p.normal_(0, 0.1 if p.dim() > 1 else 0.3)
        model.save_pretrained(path, safe_serialization=True)
    Qwen2VLImageProcessor(min_pixels=256 ** 2, max_pixels=256 ** 2, patch_size=16, merge_size=2, temporal_patch_size=2,
                          image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(path)
    _save_processor_files(path, tokenizer, QWEN_TEMPLATE, {"processor_class": "Qwen3VLProcessor"})
    return path


def make_onevision_vlm(path: Path, seed: int = 0, size: str = "tiny") -> Path:
    """LLaVA-OneVision: "tiny", a 4-layer SigLIP tower (56-px tiles, 7x7 patches, no CLS) with
    anyres tiling (ONEVISION_PINPOINTS) and a 2-layer Qwen2; "0.5b", LLaVA-OneVision-0.5B's
    shape. Tokenizer, LlavaOnevisionImageProcessor and chat template."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionImageProcessor

    shape = ONEVISION_SIZES[size]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
    tokenizer = make_tokenizer(specials, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in specials}
    cfg = LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", **shape["vision"], hidden_act="gelu_pytorch_tanh",
                           layer_norm_eps=1e-6, vision_use_head=False),
        text_config=dict(model_type="qwen2", **shape["text"], bos_token_id=None, eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        image_token_index=ids["<image>"], video_token_index=ids["<video>"], image_grid_pinpoints=shape["pinpoints"],
        vision_feature_layer=-1, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9")
    with _made_in(size, seed):
        LlavaOnevisionForConditionalGeneration(cfg).eval().save_pretrained(path, safe_serialization=True)
    for shard in path.glob("*.safetensors"):
        _classic_llava_names(shard)
    tile = shape["vision"]["image_size"]
    LlavaOnevisionImageProcessor(size={"height": tile, "width": tile}, image_grid_pinpoints=shape["pinpoints"],
                                 image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(path)
    _save_processor_files(path, tokenizer, ONEVISION_TEMPLATE, {
        "processor_class": "LlavaOnevisionProcessor", "num_image_tokens": (tile // shape["vision"]["patch_size"]) ** 2,
        "vision_feature_select_strategy": "full", "vision_aspect_ratio": "anyres_max_9", "image_token": "<image>",
        "video_token": "<video>"})
    return path
