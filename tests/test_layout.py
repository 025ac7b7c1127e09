"""The package reads as the data flow: subpackages by pipeline step, imports pointing down
it with no cycle (function-level imports counted), no module over 400 lines, families
found only through the registry."""
from __future__ import annotations

import ast
import importlib
import warnings
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "evoexport"

def _families() -> set[str]:
    """The family modules, as the registry knows them: a new family is covered by itself."""
    from evoexport.models.registry import family_modules
    import evoexport.models  # noqa: F401  (the families register on import)
    return family_modules()


def _modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for p in PACKAGE.rglob("*.py"):
        parts = p.relative_to(PACKAGE.parent).with_suffix("").parts
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (p, is_pkg)
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, anywhere in its body."""
    mods = _modules()
    graph = {m: set() for m in mods}
    for m, (p, is_pkg) in mods.items():
        pkg = m if is_pkg else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = pkg.split(".")[:len(pkg.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                names = [f"{target}.{a.name}" for a in node.names]
                if not all(n in mods for n in names):   # `from .. import names` imports a module, not the package's body
                    names.append(target)
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            graph[m] |= {n for n in names if n in mods and n != m}
    return graph


def test_no_import_cycles():
    graph = import_graph()
    seen, on_path = set(), []

    def visit(m):
        if m in on_path:
            raise AssertionError("import cycle: " + " -> ".join(on_path[on_path.index(m):] + [m]))
        if m in seen:
            return
        on_path.append(m)
        for n in sorted(graph[m]):
            visit(n)
        on_path.pop()
        seen.add(m)

    for m in sorted(graph):
        visit(m)


def test_a_cycle_is_found_when_there_is_one(tmp_path, monkeypatch):
    """The checker itself: two modules importing each other inside functions are a cycle."""
    pkg = tmp_path / "evoexport"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .b import g\n")
    (pkg / "b.py").write_text("def g():\n    from . import a\n")
    import sys
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    with pytest.raises(AssertionError, match="import cycle"):
        test_no_import_cycles()


def test_nothing_below_the_registry_imports_a_family():
    families = _families()
    assert {"evoexport.models.clip", "evoexport.models.qwen2_5_vl", "evoexport.models.vit_digits"} <= families
    allowed = {"evoexport.models"} | families
    offenders = {m: sorted(deps & families) for m, deps in import_graph().items() if deps & families and m not in allowed}
    assert not offenders, offenders


def test_the_tree_shows_the_flow_and_modules_stay_small():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 6, top
    for step in ("models", "prune", "pipeline", "export", "tensorrt", "runtime", "inputs", "validate", "measure",
                 "show", "integrations", "serve", "cli"):
        assert (PACKAGE / step / "__init__.py").is_file(), step
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_one_list_of_precisions():
    """The manifest's PRECISIONS is what the schema allows and what the CLI offers."""
    import json

    from click import Choice

    from evoexport.cli import cli
    from evoexport.manifest import PRECISIONS, SCHEMA_PATH

    assert json.loads(SCHEMA_PATH.read_text())["properties"]["precision"]["enum"] == list(PRECISIONS)
    for command in ("build", "bench"):
        option = next(p for p in cli.commands[command].params if p.name in ("precision", "precisions"))
        assert isinstance(option.type, Choice) and tuple(option.type.choices) == PRECISIONS


def test_run_chain_wires_graphs_by_name_in_order():
    """The one chain runner: inputs read from the table by name, outputs written back, in
    order, whether a graph returns a sequence or a dict."""
    from types import SimpleNamespace

    from evoexport.pipeline.chain import entry_names, run_chain

    calls = []
    graphs = [SimpleNamespace(inputs=["x"], outputs=["y", "z"]), SimpleNamespace(inputs=["z", "y"], outputs=["w"])]

    def run(g, args):
        calls.append(list(args))
        return (args[0] + 1, args[0] * 10) if g is graphs[0] else {"w": args[0] - args[1]}

    env = run_chain(graphs, {"x": 2}, run)
    assert env == {"x": 2, "y": 3, "z": 20, "w": 17} and calls == [[2], [20, 3]]
    entry = {"inputs": [{"name": "a"}], "outputs": [{"name": "b"}]}
    assert run_chain([entry], {"a": 1}, lambda e, args: [args[0] * 5], names=entry_names) == {"a": 1, "b": 5}


def test_graph_kinds_and_tensor_names_have_one_home():
    """Graph kinds are compared through names.GraphKind, and tensor names of the chain are
    made by names.py's functions: no module spells them itself."""
    import re
    kind_literal = re.compile(r"""kind\)?\s*[!=]=\s*["'](encoder|select)["']|["'](encoder|select)["']\s*[!=]=""")
    name_fstring = re.compile(r"""f["'](stage|pruned|indices|merge|picks|sizes)(_?\{)""")
    found = []
    for p in PACKAGE.rglob("*.py"):
        if p.name == "names.py":
            continue
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if kind_literal.search(line) or name_fstring.search(line):
                found.append(f"{p.relative_to(PACKAGE)}:{n}: {line.strip()}")
    assert not found, found


def test_the_manifest_is_read_by_name_outside_its_module():
    """manifest.py's Manifest is the one place that knows the manifest's keys."""
    import re
    access = re.compile(r"""\b(manifest|m)(\.data)?(\[["']|\.get\()""")
    found = [f"{p.relative_to(PACKAGE)}:{n}: {line.strip()}"
             for p in PACKAGE.rglob("*.py") if p.name != "manifest.py"
             for n, line in enumerate(p.read_text().splitlines(), 1) if access.search(line)]
    assert not found, found


def _functions():
    for p in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                params = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
                params += [x.arg for x in (a.vararg, a.kwarg) if x]
                yield p.relative_to(PACKAGE), node, params


def test_functions_read_at_once_and_take_few_parameters():
    """No function over 60 lines; outside the CLI (whose commands take one parameter per
    flag) none with more than 8 parameters: options travel as one object."""
    long = [f"{p}:{f.name} {f.end_lineno - f.lineno + 1} lines" for p, f, _ in _functions()
            if f.end_lineno - f.lineno + 1 > 60]
    wide = [f"{p}:{f.name} {len(params)} parameters" for p, f, params in _functions()
            if len(params) > 8 and p.parts[0] != "cli"]
    assert not long and not wide, long + wide


def test_nothing_kept_only_for_history():
    import re
    workshop = re.compile(r"\bissue \d+|in this project", re.I)
    found = [f"{p.relative_to(PACKAGE)}:{n}" for p in PACKAGE.rglob("*.py")
             for n, line in enumerate(p.read_text().splitlines(), 1) if workshop.search(line) or "meta_path" in line]
    assert not found, found


def test_scripts_are_entry_points_and_experiments_name_their_doc():
    root = PACKAGE.parent
    scripts = sorted(p.name for p in (root / "scripts").iterdir())
    assert len(scripts) <= 6, scripts
    for p in sorted((root / "experiments").glob("*.py")):
        head = ast.get_docstring(ast.parse(p.read_text())) or ""
        assert "docs/" in head, f"{p.name} does not name the doc it backs"
        assert "sys.path" not in p.read_text(), p.name
