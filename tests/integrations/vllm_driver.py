"""Runs in vLLM's environment (the tests call it with .venv-vllm's Python): greedy tokens of
prompts with images through `vllm.LLM`, stock or with the evoexport plugin, one engine after
another in one process. Reads a JSON spec from argv[1], prints one JSON line of results.

spec: {"model": DIR, "runs": [{"name", "build": DIR|null, "embeds_build": DIR|null}],
       "prompts": [{"prompt": str, "images": [PNG path, ...]}], "max_tokens": n,
       "pixels_dir": DIR|null}
With pixels_dir, the checkpoint's image processor as vLLM loads it (transformers' torchvision
backend here) also writes each image's pixel values there as IMAGE_STEM.npz, for references
computed elsewhere on the very pixels vLLM saw.
"""
import gc
import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")   # in-process engine: seconds, not a minute
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    from PIL import Image
    from vllm import LLM, SamplingParams

    from evoexport.integrations.vllm import hf_overrides, image_embeds_input

    spec = json.loads(open(sys.argv[1]).read())
    params = SamplingParams(temperature=0, max_tokens=spec.get("max_tokens", 8))
    results = {}
    for run in spec["runs"]:
        kwargs = {"hf_overrides": hf_overrides(run["build"], spec["model"])} if run.get("build") else {}
        if run.get("embeds_build"):
            kwargs["enable_mm_embeds"] = True
        llm = LLM(model=spec["model"], dtype="float32", max_model_len=512, enforce_eager=True, seed=0,
                  limit_mm_per_prompt={"image": 2}, **kwargs)
        requests = []
        for p in spec["prompts"]:
            images = [Image.open(path).convert("RGB") for path in p["images"]]
            if run.get("embeds_build"):
                images = [image_embeds_input(f) for f in _features(run["embeds_build"], spec["model"], images)]
            data = images[0] if len(images) == 1 else images
            requests.append({"prompt": p["prompt"], "multi_modal_data": {"image": data}})
        outs = llm.generate(requests, params, use_tqdm=False)
        results[run["name"]] = [{"tokens": list(o.outputs[0].token_ids), "prompt_tokens": len(o.prompt_token_ids)}
                                for o in outs]
        del llm
        gc.collect()
    if spec.get("pixels_dir"):
        _save_pixels(spec["model"], {path for p in spec["prompts"] for path in p["images"]}, spec["pixels_dir"])
    print(json.dumps(results))


def _save_pixels(model, paths, out_dir):
    from pathlib import Path

    import numpy as np
    from PIL import Image
    from transformers import AutoImageProcessor
    processor = AutoImageProcessor.from_pretrained(model)
    for path in paths:
        arrays = processor(images=[Image.open(path).convert("RGB")], return_tensors="np")
        np.savez(Path(out_dir) / f"{Path(path).stem}.npz", **{k: np.asarray(v) for k, v in arrays.items()})


def _features(build, model, images):
    """The build's features of each image, from the checkpoint's own image processor."""
    from transformers import AutoImageProcessor

    import evoexport
    pixels = AutoImageProcessor.from_pretrained(model)(images=images, return_tensors="np")["pixel_values"]
    return evoexport.load(build)(pixels.astype("float32")).features


if __name__ == "__main__":
    main()
