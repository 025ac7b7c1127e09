"""Tiny but complete VLM checkpoints for the engine tests (vLLM): weights, a byte-level BPE
tokenizer trained here on a few sentences, the processor and a chat template, all saved by
transformers, so an engine loads them from a folder as it loads a real checkpoint. The
language models have head size 64 (vLLM's CPU attention takes 32, 64, 80, ... only)."""
from __future__ import annotations

import json
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
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
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
    """The tensor names llava-hf's published checkpoints use (vision_tower.vision_model.*),
    which transformers 5 loads and vLLM expects; transformers 5 itself saves
    vision_tower.embeddings.*, which vLLM 0.32 refuses."""
    from safetensors.torch import load_file, save_file
    tensors = {}
    for name, t in load_file(file).items():
        if name.startswith("vision_tower.") and not name.startswith("vision_tower.vision_model."):
            name = "vision_tower.vision_model." + name[len("vision_tower."):]
        tensors[name] = t.contiguous()
    save_file(tensors, file, metadata={"format": "pt"})


def make_llava_vlm(path: Path, seed: int = 0) -> Path:
    """LLaVA-1.5 in miniature: a 3-layer CLIP tower (32 px, 16 patches), the projector, a
    2-layer Llama; tokenizer, CLIPImageProcessor and chat template beside it."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = make_tokenizer(["<s>", "</s>", "<unk>", "<pad>", "<image>"], bos_token="<s>", eos_token="</s>",
                               unk_token="<unk>", pad_token="<pad>")
    torch.manual_seed(seed)
    cfg = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_attention_heads=4,
                           num_hidden_layers=3, image_size=32, patch_size=8, hidden_act="quick_gelu"),
        text_config=dict(model_type="llama", **TEXT, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    LlavaForConditionalGeneration(cfg).eval().save_pretrained(path, safe_serialization=True)
    _classic_llava_names(path / "model.safetensors")
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])
    LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
                   image_token="<image>", chat_template=LLAVA_TEMPLATE, num_additional_image_tokens=1).save_pretrained(path)
    images.save_pretrained(path)       # preprocessor_config.json too, as older tools read it
    tokenizer.chat_template = LLAVA_TEMPLATE
    tokenizer.save_pretrained(path)
    return path


def make_qwen_vlm(path: Path, seed: int = 0) -> Path:
    """Qwen2.5-VL in miniature: a 2-block vision tower (window attention, 2x2 merge) at 224 px
    (64 units), a 2-layer Qwen2; tokenizer, Qwen2VLImageProcessor and chat template."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    tokenizer = make_tokenizer(specials, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in specials}
    torch.manual_seed(seed)
    cfg = Qwen2_5_VLConfig(
        vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=TEXT["hidden_size"],
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[1], in_channels=3),
        text_config=dict(model_type="qwen2_5_vl_text", **TEXT, rope_parameters={"rope_type": "default",
                         "rope_theta": 10000.0, "mrope_section": [16, 8, 8]}, bos_token_id=None, eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    Qwen2_5_VLForConditionalGeneration(cfg).eval().save_pretrained(path, safe_serialization=True)
    images = Qwen2VLImageProcessor(min_pixels=224 * 224, max_pixels=224 * 224, patch_size=14, merge_size=2,
                                   temporal_patch_size=2)
    # the processor written by hand: transformers' Qwen2_5_VLProcessor wants a video processor,
    # which needs torchvision (not in the project's environment); engines load it from these
    images.save_pretrained(path)
    (path / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2_5_VLProcessor"}) + "\n")
    (path / "chat_template.jinja").write_text(QWEN_TEMPLATE)
    tokenizer.chat_template = QWEN_TEMPLATE
    tokenizer.save_pretrained(path)
    return path
