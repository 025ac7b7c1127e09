#!/usr/bin/env python3
"""Qwen2.5-VL-3B's shape in OpenVINO GenAI: GenAI unpruned and with its own pruning
(CDPruner, after the encoder, GenerationConfig.pruning_ratio = 50) against our keep-0.5
encoder. Ours cannot run inside GenAI (docs/llm.md says why), so the end-to-end figure for
it is COMPOSED: our chain's time on OpenVINO on the same 448x448 photo, plus GenAI's
language-model prefill at the same image-token count (CDPruner at 50 % gives the language
model as many image tokens as keep 0.5 does: 128 of 256), each measured. Backs
docs/performance.md ("Qwen2.5-VL-3B in GenAI: composed") and
docs/measurements/genai-qwen2.5-vl-3b-*.json.

    .venv/bin/python experiments/genai_qwen_bench.py --checkpoint CKPT --builds KEEP1 KEEP05 \
        --root /tmp/gq --rounds 3 --json OUT.json

CKPT: a Qwen2.5-VL checkpoint (evoexport.measure.random_vlm.make_qwen_vlm(size="3b") makes
one with random weights); KEEP1/KEEP05: its builds at keep 1.0 and 0.5 (448 px).
"""
from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

from genai_bench import GENAI_PYTHON, ROOT, export_once, stats   # this folder's sibling

PROMPT = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe the image.<|im_end|>\n" \
         "<|im_start|>assistant\n"
SIZE = 448


def genai_side(export: str, photo: str, rounds: int) -> dict:
    """Runs in GenAI's environment: one pipeline, requests alternating unpruned / CDPruner 50 %."""
    import numpy as np
    import openvino as ov
    import openvino_genai as og

    pipe = og.VLMPipeline(export, "CPU")
    configs = {}
    for name, ratio in (("genai unpruned", 0), ("genai CDPruner 50%", 50)):
        c = og.GenerationConfig()
        c.max_new_tokens, c.do_sample, c.apply_chat_template, c.ignore_eos = 1, False, False, True
        c.pruning_ratio = ratio
        configs[name] = c
    base = np.load(photo)
    samples, request = {name: [] for name in configs}, 0
    for r in range(rounds + 1):                           # round 0: warm-up
        for name, config in configs.items():
            image = base.copy()
            image[0, 0, 0] = request % 256                # one pixel changed: no cache skips work
            request += 1
            m = pipe.generate(PROMPT, images=[ov.Tensor(image[None])], generation_config=config).perf_metrics
            if r:
                embeddings = getattr(m, "get_prepare_embeddings_duration", None)
                samples[name].append({"ttft_ms": m.get_ttft().mean, "input_tokens": m.get_num_input_tokens(),
                                      "embeddings_ms": embeddings().mean if embeddings else None})
    out = {"genai": og.__version__, "openvino": ov.__version__,
           "inference_precision": str(ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT"))}
    for name, ss in samples.items():
        out[name] = {"ttft_ms": stats([s["ttft_ms"] for s in ss]), "input_tokens": ss[0]["input_tokens"],
                     "samples": ss}
        if ss[0]["embeddings_ms"] is not None:
            out[name]["embeddings_ms"] = stats([s["embeddings_ms"] for s in ss])
            out[name]["prefill_ms"] = stats([s["ttft_ms"] - s["embeddings_ms"] for s in ss])
    return out


def ours(builds: list[str], photo_png: Path, rounds: int) -> dict:
    """Our chains on OpenVINO (its defaults) on the photo, interleaved."""
    import evoexport
    from evoexport.inputs.image_files import load_image
    from evoexport.inputs.images import preprocess
    from evoexport.measure.timing import time_systems

    runners = {b: evoexport.load(b, backend="openvino") for b in builds}
    m = runners[builds[0]].manifest
    x = preprocess(load_image(photo_png), m.image_size, m.preprocess)[None]
    timed = time_systems({b: (lambda r=r: r(x)) for b, r in runners.items()}, iters=rounds * 2, warmup=1,
                         rounds=rounds)
    return {b: {"median": t["median_ms"], "p90": t["p90_ms"], "n": t["iters"],
                "tokens": runners[b].manifest.tokens_per_image} for b, t in timed.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--builds", nargs=2, metavar=("KEEP1", "KEEP05"))
    ap.add_argument("--root", type=Path, default=Path("/tmp/genai-qwen"))
    ap.add_argument("--weights", default="fp16", help="optimum-cli --weight-format (fp16 keeps a 3B model in memory)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--genai", nargs=2, metavar=("EXPORT", "PHOTO"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.genai:
        print(json.dumps(genai_side(*args.genai, args.rounds)))
        return
    import numpy as np
    from PIL import Image
    from skimage import data

    args.root.mkdir(parents=True, exist_ok=True)
    photo = Image.fromarray(data.astronaut()).resize((SIZE, SIZE), Image.BICUBIC)   # at the size: no resize later
    photo.save(args.root / "photo.png")
    np.save(args.root / "photo.npy", np.asarray(photo))
    subprocess.run([str(ROOT / "scripts" / "setup-env"), "--genai"], check=True)
    export = export_once(args.checkpoint, args.root / f"export-{args.weights}", args.weights)
    done = subprocess.run([str(GENAI_PYTHON), __file__, "--rounds", str(args.rounds), "--genai", str(export),
                           str(args.root / "photo.npy")], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    genai = json.loads(done.stdout.strip().splitlines()[-1])
    report = {"genai": genai, "ours_openvino": ours(args.builds, args.root / "photo.png", args.rounds),
              "weights": args.weights, "photo": f"astronaut at {SIZE}x{SIZE}"}
    report["composed"] = _compose(report, args.builds[1])
    from evoexport.measure.timing import cpu_info
    report["cpu"] = cpu_info()["cpu"]
    print(json.dumps({k: v for k, v in report.items() if k != "genai"}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


def _compose(report: dict, pruned_build: str) -> dict | None:
    """Our keep-0.5 TTFT, composed: our vision (OpenVINO) + GenAI's prefill at CDPruner's count."""
    cd = report["genai"]["genai CDPruner 50%"]
    if "prefill_ms" not in cd:
        return None
    ttft = report["ours_openvino"][pruned_build]["median"] + cd["prefill_ms"]["median"]
    unpruned = report["genai"]["genai unpruned"]["ttft_ms"]["median"]
    return {"ours_keep0.5_ttft_ms": ttft, "vs_genai_unpruned": unpruned / ttft,
            "vs_genai_cdpruner": cd["ttft_ms"]["median"] / ttft,
            "how": "our chain's median on OpenVINO + GenAI's measured prefill median (TTFT - embeddings) with CDPruner "
                   "at 50 %, the same image-token count"}


if __name__ == "__main__":
    main()
