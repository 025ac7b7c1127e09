"""`scripts/gpu-probe`: the GPU measurements in one command (gpu_probe.py says what each
section measures).

    scripts/gpu-probe OUT [--device cuda|cpu] [--budget-s S] [--sections a,b,...]
    scripts/gpu-probe --check OUT        # on a CPU, afterwards: validate the dumped decisions

Writes OUT/probe.json after every section (a run cut short still returns data),
OUT/bench-cuda.json in `evoexport bench --device cuda`'s format, and OUT/dump-*.npz.
"""
import argparse
import json
import sys

from ..errors import EvoExportError
from ..progress import Progress
from . import gpu_probe


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--budget-s", type=float, default=None, help="seconds the sections may take (cuda: 330)")
    ap.add_argument("--sections", default=None, help=f"comma-separated, of: {', '.join(gpu_probe.SECTIONS)}")
    ap.add_argument("--check", action="store_true", help="validate OUT's dumps against the fp32 reference (CPU)")
    args = ap.parse_args()
    try:
        if args.check:
            result = gpu_probe.check_dump(args.out)
            for name, r in result.items():
                flips = sum(p["decisions"]["flips"] for p in r["points"])
                near = sum(p["decisions"]["near_ties"] for p in r["points"])
                print(f"{name}: {'PASSED' if r['passed'] else 'FAILED'} against the fp32 reference "
                      f"({r['precision']} tolerances): features cosine {r['features']['cosine']:.6f}, "
                      f"{flips} decision flips ({near} within the near-tie margin)")
            return 0 if all(r["passed"] for r in result.values()) else 1
        sections = args.sections.split(",") if args.sections else None
        unknown = [s for s in sections or [] if s not in gpu_probe.SECTIONS]
        if unknown:
            raise EvoExportError(f"unknown section(s) {', '.join(unknown)}; sections: {', '.join(gpu_probe.SECTIONS)}")
        data = gpu_probe.run_probe(args.out, args.device, args.budget_s, sections, Progress())
    except EvoExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"sections_s": data["probe"]["sections"], "errors": {k: v for k, v in data["errors"].items()
                      if not k.endswith("_traceback")}, "skipped": data["skipped"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
