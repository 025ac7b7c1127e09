"""Runs in vLLM's environment (the tests call it with .venv-vllm's Python): greedy tokens of
prompts with images through `vllm.LLM`, stock or with the evoexport plugin, one engine after
another in one process. Reads a JSON spec from argv[1], prints one JSON line of results.

spec: {"model": DIR, "runs": [{"name", "build": DIR|null, "embeds_build": DIR|null}],
       "prompts": [{"prompt": str, "images": [PNG path, ...], "error": bool (a refusal expected),
                    "video": {"frames": NPY path, "fps": float, "size": [H, W]|null}|null}],
       "max_tokens": n, "logprobs": n|null,
       "pixels_dir": DIR|null}
With logprobs, each answer also holds its first token's top-n log probabilities.
With pixels_dir, the checkpoint's image processor as vLLM loads it (transformers' torchvision
backend here) also writes each image's pixel values there as IMAGE_STEM.npz, for references
computed elsewhere on the very pixels vLLM saw; and the checkpoint's processor writes each
video's (its frames [T, H, W, 3] uint8, resized to `size` as the Qwen plugin resizes them)
as FRAMES_STEM.npz: pixel_values_videos (Qwen: also video_grid_thw, second_per_grid_ts).
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
    params = SamplingParams(temperature=0, max_tokens=spec.get("max_tokens", 8), logprobs=spec.get("logprobs"))
    results = {}
    for run in spec["runs"]:
        kwargs = {"hf_overrides": hf_overrides(run["build"], spec["model"])} if run.get("build") else {}
        if run.get("embeds_build"):
            kwargs["enable_mm_embeds"] = True
        videos = any(p.get("video") for p in spec["prompts"])
        llm = LLM(model=spec["model"], dtype="float32", max_model_len=512, enforce_eager=True, seed=0,
                  limit_mm_per_prompt={"image": 2, **({"video": 1} if videos else {})}, **kwargs)
        requests = []
        for p in spec["prompts"]:
            images = [Image.open(path).convert("RGB") for path in p.get("images", [])]
            if run.get("embeds_build"):
                images = [image_embeds_input(f) for f in _features(run["embeds_build"], spec["model"], images)]
            data = {"image": images[0] if len(images) == 1 else images} if images else {}
            if p.get("video"):
                data["video"] = _video(p["video"])
            requests.append({"prompt": p["prompt"], "multi_modal_data": data})
        # the good prompts in one batch; a prompt marked "error" alone after, its error recorded
        good = [r for r, p in zip(requests, spec["prompts"]) if not p.get("error")]
        answers = iter([_answer(o, spec) for o in llm.generate(good, params, use_tqdm=False)])
        results[run["name"]] = [_error(llm, r, params) if p.get("error") else next(answers)
                                for r, p in zip(requests, spec["prompts"])]
        del llm
        gc.collect()
    if spec.get("pixels_dir"):
        _save_pixels(spec["model"], {path for p in spec["prompts"] for path in p.get("images", [])}, spec["pixels_dir"])
        for p in spec["prompts"]:
            if p.get("video"):
                _save_video_pixels(spec["model"], p, spec["pixels_dir"])
    print(json.dumps(results))


def _answer(out, spec: dict) -> dict:
    logprobs = spec.get("logprobs")
    return {"tokens": list(out.outputs[0].token_ids), "prompt_tokens": len(out.prompt_token_ids),
            **({"first_logprobs": {str(t): p.logprob for t, p in out.outputs[0].logprobs[0].items()}}
               if logprobs else {})}


def _error(llm, request: dict, params) -> dict:
    """What vLLM says of a request the plugin must refuse (a client error: ValueError)."""
    try:
        llm.generate([request], params, use_tqdm=False)
    except ValueError as e:
        return {"error": str(e)}
    return {"error": None}


def _video(video: dict):
    """(frames [T, H, W, 3] uint8, metadata) as vLLM's video loader gives them."""
    import numpy as np
    frames = np.load(video["frames"])
    t = len(frames)
    return frames, {"fps": video["fps"], "duration": t / video["fps"], "total_num_frames": t,
                    "frames_indices": list(range(t)), "video_backend": "opencv", "do_sample_frames": False}


def _save_video_pixels(model, prompt: dict, out_dir):
    from pathlib import Path

    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor
    from transformers.video_utils import VideoMetadata

    from evoexport.integrations.vllm.qwen2_5_vl import _resized_frames
    frames, metadata = _video(prompt["video"])
    if prompt["video"].get("size"):         # the Qwen plugin resizes frames to the build's size
        frames = _resized_frames(frames, tuple(prompt["video"]["size"]), Image)
    processor = AutoProcessor.from_pretrained(model)
    extra = {}
    if type(processor).__name__.startswith("Qwen"):      # its time positions come from the metadata's fps
        extra = {"video_metadata": [VideoMetadata(**{k: v for k, v in metadata.items() if k != "do_sample_frames"})],
                 "do_sample_frames": False}
    out = processor(text=[prompt["prompt"]], videos=[frames], return_tensors="np", **extra)
    keys = [k for k in ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts") if k in out]
    np.savez(Path(out_dir) / f"{Path(prompt['video']['frames']).stem}.npz", **{k: np.asarray(out[k]) for k in keys})


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
