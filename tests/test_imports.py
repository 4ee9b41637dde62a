"""The dependency rule app -> engine -> cache inside the one ffnscope namespace, no top-level app,
engine or cache imports anywhere, and a light start for commands that need no model."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, env_for_subprocess

FORBIDDEN = {
    "engine": {"ffnscope.app", "textual"},
    "cache": {"ffnscope.app", "ffnscope.engine", "textual", "torch", "transformers", "accelerate"},
}
BARE = {"app", "engine", "cache"}  # only ever as ffnscope.app, ffnscope.engine, ffnscope.cache


def imported_roots(path: Path) -> set[str]:
    """Top-level packages a file imports; inside the ffnscope namespace, its subpackage (ffnscope.engine)."""
    roots = set()

    def root(name: str) -> str:
        parts = name.split(".")
        return ".".join(parts[:2]) if parts[0] == "ffnscope" and len(parts) > 1 else parts[0]

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots |= {root(alias.name) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(root(node.module))
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_dependency_rule(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    for path in files:
        bad = imported_roots(path) & FORBIDDEN[package]
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


HEAVY = {"torch", "transformers", "accelerate", "textual"}
LIGHT_STAGES = ("analysis", "explore", "table", "jobs")  # read caches and tables; no model, no terminal


def module_level_roots(path: Path) -> set[str]:
    """What a file imports at module level, inside if/try blocks too (a function may import torch
    lazily: the analysis job loads the model only when suppression is asked for)."""
    roots, nodes = set(), list(ast.parse(path.read_text(), str(path)).body)
    while nodes:
        node = nodes.pop()
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
        elif isinstance(node, (ast.If, ast.Try)):
            nodes += node.body + node.orelse + [n for h in getattr(node, "handlers", []) for n in h.body]
    return roots


@pytest.mark.parametrize("stage", LIGHT_STAGES)
def test_light_stages_import_no_model_or_terminal(stage):
    files = sorted((ROOT / "engine" / stage).rglob("*.py"))
    assert files
    for path in files:
        bad = module_level_roots(path) & HEAVY
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)} at module level"


def engine_package_edges() -> dict[str, set[str]]:
    """engine's stage packages (and leaf modules) -> the ones they import, lazy imports included."""
    engine = ROOT / "engine"
    edges: dict[str, set[str]] = {}
    for path in engine.rglob("*.py"):
        parts = path.relative_to(engine).parts
        source = parts[0] if len(parts) > 1 else parts[0][:-3]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("ffnscope.engine"):
                names = node.module.split(".")
                targets = [names[2]] if len(names) > 2 else [a.name for a in node.names]
                edges.setdefault(source, set()).update(t for t in targets if t != source)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_cycles_among_engine_packages():
    edges = engine_package_edges()
    assert {"model", "data", "record", "analysis", "npl", "jobs", "explore", "table"} <= set(edges) | {"data"}
    cycle = find_cycle(edges)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}}) is None


def test_no_bare_namespace_imports():
    """`import engine` would find a user's engine.py first (or a second copy of our modules)."""
    files = [p for d in ("app", "engine", "cache", "ffnscope", "tests", "bench") for p in sorted((ROOT / d).rglob("*.py"))]
    bad = {str(p.relative_to(ROOT)): sorted(imported_roots(p) & BARE) for p in files if imported_roots(p) & BARE}
    assert not bad, bad


def test_the_checker_sees_violations(tmp_path):
    sample = tmp_path / "x.py"
    sample.write_text("def f():\n    from ffnscope.app.cli import main\n    import torch.nn\n    import engine\n")
    assert imported_roots(sample) == {"ffnscope.app", "torch", "engine"}
    assert module_level_roots(sample) == set()
    sample.write_text("try:\n    import numba\nexcept ImportError:\n    import textual.app\nimport numpy\n")
    assert module_level_roots(sample) == {"numba", "textual", "numpy"}


PROBE = ("import sys; from ffnscope.app.cli import main\n"
         "try:\n    main({args!r})\nexcept SystemExit:\n    pass\n"
         "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")


@pytest.mark.parametrize("args", [["--help"], ["record", "--help"], ["info", "CACHE"],
                                  ["export", "CACHE", "--format", "parquet", "--out", "OUT"],
                                  ["export", "CACHE", "--table", "layers", "--out", "OUT"]])
def test_light_commands_do_not_import_torch(args, tmp_path, model_dirs, text_file):
    if "CACHE" in args:
        from ffnscope.engine.analysis.job import analyze
        from tests.helpers import record_tiny

        cache = tmp_path / "c.h5"
        record_tiny(cache, model_dirs["opt"], [text_file])
        analyze(cache, log=lambda _m: None)
        args = [{"CACHE": str(cache), "OUT": str(tmp_path / "out")}.get(a, a) for a in args]
    out = subprocess.run([sys.executable, "-c", PROBE.format(args=args)], capture_output=True, text=True,
                         env=env_for_subprocess(), timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("NO-TORCH"), out.stdout[-500:]
