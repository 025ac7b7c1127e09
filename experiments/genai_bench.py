#!/usr/bin/env python3
"""The whole VLM in OpenVINO GenAI's VLMPipeline on a CPU: GenAI's own export of LLaVA-1.5
(CLIP ViT-L/14-336 and projector, TinyLlama-1.1B's shape, random weights) against the same
export with a keep-0.5 build dropped in by `evoexport genai`. Backs docs/performance.md
("The whole VLM in OpenVINO GenAI") and docs/measurements/genai-llava-*.json.

    .venv/bin/python experiments/genai_bench.py --root /tmp/gb --rounds 6 --json OUT.json

Prepares under --root (once; kept): the checkpoint, the keep-0.5 build, optimum-cli exports
(fp32 and, with --int8, int8 weights) and their `evoexport genai` folders. Then, in GenAI's
environment (.venv-genai), per export: both pipelines loaded in one process, requests
interleaved (unpruned, pruned, unpruned, ...), one warm-up each. Every request carries the
astronaut photo with one pixel changed, so no cache can skip work; greedy, EOS ignored, a
fixed number of new tokens. Reported per system: TTFT and the time GenAI spent making the
input embeddings (vision encoder + text embeddings), median and p90; decode tokens/s;
input tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENAI_PYTHON = ROOT / ".venv-genai" / "bin" / "python"
PROMPT = "USER: <image>\nDescribe the image in detail. ASSISTANT:"


def prepare(root: Path, int8: bool) -> dict:
    """{name: (unpruned folder, pruned folder)} for each export precision."""
    from evoexport.export.build import build
    from evoexport.integrations.genai import write_genai_folder
    from evoexport.measure.random_vlm import make_llava_vlm
    from evoexport.progress import Progress

    say = Progress()
    ckpt = root / "llava-tinyllama"
    if not (ckpt / "config.json").is_file():
        say("making the random LLaVA-1.5 (CLIP ViT-L/14-336) + TinyLlama-1.1B-shape checkpoint")
        make_llava_vlm(ckpt, size="tinyllama")
    pruned = root / "keep0.5"
    if not (pruned / "manifest.json").is_file():
        build("llava", 0.5, checkpoint=str(ckpt), out=pruned, validate=False, progress=say)
    subprocess.run([str(ROOT / "scripts" / "setup-env"), "--genai"], check=True)
    pairs = {}
    for weights in ["fp32"] + (["int8"] if int8 else []):
        export = export_once(ckpt, root / f"export-{weights}", weights, say)
        folder = root / f"genai-{weights}-keep0.5"
        if not (folder / "evoexport-genai.json").is_file():
            write_genai_folder(pruned, export, folder, progress=say)
        pairs[weights] = (str(export), str(folder))
    return pairs


def export_once(ckpt: Path, export: Path, weights: str, say=print) -> Path:
    """optimum-cli's export of `ckpt`, unless one was written whole (an interrupted or killed
    one is exported again)."""
    import shutil

    from evoexport.errors import EvoExportError
    from evoexport.integrations.genai import check_export
    try:
        check_export(export)
        return export
    except EvoExportError:
        shutil.rmtree(export, ignore_errors=True)
    say(f"optimum-cli export openvino --weight-format {weights}")
    subprocess.run([str(GENAI_PYTHON.parent / "optimum-cli"), "export", "openvino", "--model", str(ckpt), "--task",
                    "image-text-to-text", "--weight-format", weights, str(export)], check=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return export


def stats(values: list[float]) -> dict:
    import numpy as np
    return {"median": float(np.median(values)), "p90": float(np.percentile(values, 90)), "n": len(values)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path("/tmp/genai-bench"))
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--int8", action="store_true", help="also optimum-intel's int8-weight export")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--time", nargs=2, metavar=("UNPRUNED", "PRUNED"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.time:
        print(json.dumps(_time(*args.time, args.rounds, args.new_tokens, args.root / "photo.npy")))
        return
    args.root.mkdir(parents=True, exist_ok=True)
    pairs = prepare(args.root, args.int8)
    _save_photo(args.root / "photo.npy")
    results = {}
    for weights, (unpruned, pruned) in pairs.items():
        done = subprocess.run([str(GENAI_PYTHON), __file__, "--root", str(args.root), "--rounds", str(args.rounds),
                               "--new-tokens", str(args.new_tokens), "--time", unpruned, pruned],
                              capture_output=True, text=True, check=True)
        results[weights] = json.loads(done.stdout.strip().splitlines()[-1])
        _print(weights, results[weights])
    from evoexport.measure.timing import cpu_info
    report = {"cpu": cpu_info()["cpu"], "threads": os.cpu_count(), "prompt": PROMPT, "rounds": args.rounds,
              "new_tokens": args.new_tokens, "exports": results}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


def _save_photo(path: Path) -> None:
    import numpy as np
    from skimage import data
    np.save(path, data.astronaut())


def _time(unpruned: str, pruned: str, rounds: int, new_tokens: int, photo: Path) -> dict:
    import numpy as np
    import openvino as ov
    import openvino_genai as og

    pipes = {"genai unpruned": og.VLMPipeline(unpruned, "CPU"), "genai + evoexport keep 0.5": og.VLMPipeline(pruned, "CPU")}
    config = og.GenerationConfig()
    config.max_new_tokens, config.min_new_tokens, config.do_sample = new_tokens, new_tokens, False
    config.ignore_eos, config.apply_chat_template = True, False
    base = np.load(photo)
    samples = {name: [] for name in pipes}
    request = 0
    for r in range(rounds + 1):                      # round 0: warm-up
        for name, pipe in pipes.items():
            image = base.copy()
            image[0, 0, 0] = request % 256           # one pixel changed: no cache skips work
            request += 1
            out = pipe.generate(PROMPT, images=[ov.Tensor(image[None])], generation_config=config)
            m = out.perf_metrics
            if r:
                samples[name].append({"ttft_ms": m.get_ttft().mean, "tokens_per_s": m.get_throughput().mean,
                                      "input_tokens": m.get_num_input_tokens(),
                                      "embeddings_ms": _embeddings_ms(m)})
    core = ov.Core()
    return {"genai": og.__version__, "openvino": ov.__version__,
            "inference_precision": str(core.get_property("CPU", "INFERENCE_PRECISION_HINT")),
            "systems": {name: {"ttft_ms": stats([s["ttft_ms"] for s in ss]),
                               "embeddings_ms": stats([s["embeddings_ms"] for s in ss if s["embeddings_ms"]]),
                               "tokens_per_s": stats([s["tokens_per_s"] for s in ss]),
                               "input_tokens": ss[0]["input_tokens"], "samples": ss}
                        for name, ss in samples.items()}}


def _embeddings_ms(metrics) -> float | None:
    """GenAI's time to make the input embeddings (vision encoder, text embeddings, merge)."""
    get = getattr(metrics, "get_prepare_embeddings_duration", None)
    return get().mean if get else None


def _print(weights: str, result: dict) -> None:
    systems = result["systems"]
    names = list(systems)
    print(f"{weights} export (GenAI {result['genai']}, inference precision {result['inference_precision']})")
    for name in names:
        s = systems[name]
        print(f"  {name:<28} input tokens {s['input_tokens']:4d}  TTFT median {s['ttft_ms']['median']:8.0f} ms "
              f"p90 {s['ttft_ms']['p90']:8.0f}  decode {s['tokens_per_s']['median']:.2f} tok/s")
    ratio = systems[names[0]]["ttft_ms"]["median"] / systems[names[1]]["ttft_ms"]["median"]
    print(f"  TTFT speedup (median): {ratio:.2f}x")


if __name__ == "__main__":
    main()
