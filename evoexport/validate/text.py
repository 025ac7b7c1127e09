"""A validation report (report.py) in words: the table `validate` and `build` print, and
what was compared and found."""
from __future__ import annotations

import sys


def _fmt(r: dict) -> str:
    if "error" in r:
        return r["error"]
    if "decisions" in r:
        return _fmt_decisions(r["decisions"])
    if "equal" in r:
        return "identical" if r["equal"] else "DIFFERENT"
    parts = [f"max|err| {r['max_abs']:.2e}"] if "max_abs" in r else []
    parts.append(f"rel {r['rel_err']:.2e}")
    if "cosine" in r:
        parts.append(f"cos {r['cosine']:.6f}")
    return "  ".join(parts)


def _fmt_decisions(d: dict) -> str:
    if d["invalid"]:
        return "INVALID: " + d["invalid"]
    text = f"{d['decisions']} decisions, {d['flips']} flipped"
    if d["flips"]:
        text += f" (worst margin {d['worst_margin']:.1e}{' <= ' if d['ok'] else ' > '}{d['tolerance']:.0e})"
    return text + f", {d['close_calls']} close"


def format_report(report: dict) -> str:
    ok = lambda flag: "yes" if flag else "NO"  # noqa: E731
    lines = [f"validation: {report['backend']} vs {report['reference']} on {report['batch']} photos "
             f"({', '.join(report['images'])}); weights: {report['weights']}; precision: {report['precision']}",
             f"  {'graph':<9} {'inputs':<11} {'tensor':<22} {'result':<58} ok"]
    for g in report["graphs"]:
        for r in g["outputs"]:
            lines.append(f"  {g['graph']:<9} {g['inputs']:<11} {r['tensor']:<22} {_fmt(r):<58} {ok(r['ok'])}")
    for label, chain in (("chain", report["end_to_end"]), ("batch 1", report["batch_consistency"]["single"])):
        for f in [chain["features"], *chain.get("deepstack", [])]:
            lines.append(f"  {label:<9} {'pixels':<11} {f['tensor'] + ' vs forced':<22} {_fmt(f):<58} {ok(f['ok'])}")
        for p in chain["points"]:
            lines.append(f"  {label:<9} {'pixels':<11} {'decisions @ point ' + str(p['point']):<22} "
                         f"{_fmt_decisions(p['decisions']):<58} {ok(p['ok'])}")
    b = report["batch_consistency"]
    text = f"rel {b['rel_err']:.2e} (same decisions)" if b["same_decisions"] else "decisions differ: checked as a run"
    lines.append(f"  {'batch 1':<9} {'pixels':<11} {'vs its batch row':<22} {text:<58} {ok(b['ok'])}")
    lines += ["", *describe(report), "",
              "validation PASSED" if report["passed"] else "validation FAILED (see the rows marked NO above)"]
    return "\n".join(lines)


def describe(report: dict) -> list[str]:
    """The report in words."""
    s, tol = report["summary"], report["tolerances"]
    n_graphs = len({g["graph"] for g in report["graphs"]})
    n_select = len({g["graph"] for g in report["graphs"] if g["inputs"] == "exact ties"})
    chain = report["end_to_end"]
    free = [p["free_running"] for p in chain["points"]]
    t = s["exact_ties"]
    words = [
        f"Compared: each of the {n_graphs} graphs on the reference's own inputs; the {n_select} selection graphs "
        "again on exact ties (duplicated tokens); the chain from the pixels against the reference re-run with the "
        "chain's decisions forced; the first photo alone against its batch row.",
        f"Decisions: {s['decisions']} checked, {_flips_in_words(s, tol)}; {s['close_calls']} were close calls "
        f"(the reference's own margin within the tolerance, {tol['decision_margin']:.0e}).",
        f"Exact ties: {t['decisions']} decisions on duplicated tokens, {_flips_in_words(t, tol)}.",
    ]
    sel = report.get("selection_tolerances")
    if sel and sel != tol:
        words.append(f"Selection graphs compute in fp32 in every build: on identical inputs they were held to fp32's "
                     f"tolerances (decision margin {sel['decision_margin']:.0e}); the {report['precision']} rows apply "
                     "to the stages and the chain.")
    if free:
        words.append(
            "Versus the free-running reference (information): "
            + ", ".join(f"point {p['point']}: {f['kept_differ']} of {f['kept_total']} kept positions and "
                        f"{f['merge_differ']} merge owners differ" for p, f in zip(chain["points"], free))
            + f"; feature cosine {chain['features_cosine_to_free_running']:.6f}.")
    return words


def _flips_in_words(s: dict, tol: dict) -> str:
    if s["not_near_ties"]:
        return (f"{s['flips']} differed from the reference's and {s['not_near_ties']} check(s) found decisions that "
                f"were NOT near-ties (worst margin {s['worst_margin']:.1e} > {tol['decision_margin']:.0e})")
    if not s["flips"]:
        return "none differed from the reference's"
    return (f"{s['flips']} differed from the reference's, all near-ties (worst margin {s['worst_margin']:.1e} "
            f"<= {tol['decision_margin']:.0e})")


def print_report(report: dict, file=sys.stdout) -> None:
    print(format_report(report), file=file)
