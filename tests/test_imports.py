"""The dependency rule app -> engine -> cache, and a light start for commands that need no model."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, env_for_subprocess

FORBIDDEN = {
    "engine": {"app", "textual"},
    "cache": {"app", "engine", "textual", "torch", "transformers", "accelerate"},
}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_dependency_rule(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    for path in files:
        bad = imported_roots(path) & FORBIDDEN[package]
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_the_checker_sees_violations(tmp_path):
    sample = tmp_path / "x.py"
    sample.write_text("def f():\n    from app.cli import main\n    import torch.nn\n")
    assert imported_roots(sample) == {"app", "torch"}


PROBE = ("import sys; from app.cli import main\n"
         "try:\n    main({args!r})\nexcept SystemExit:\n    pass\n"
         "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")


@pytest.mark.parametrize("args", [["--help"], ["record", "--help"], ["info", "CACHE"],
                                  ["export", "CACHE", "--format", "parquet", "--out", "OUT"],
                                  ["export", "CACHE", "--table", "layers", "--out", "OUT"]])
def test_light_commands_do_not_import_torch(args, tmp_path, model_dirs, text_file):
    if "CACHE" in args:
        from engine.analysis.run import analyze
        from tests.helpers import record_tiny

        cache = tmp_path / "c.h5"
        record_tiny(cache, model_dirs["opt"], [text_file])
        analyze(cache, log=lambda _m: None)
        args = [{"CACHE": str(cache), "OUT": str(tmp_path / "out")}.get(a, a) for a in args]
    out = subprocess.run([sys.executable, "-c", PROBE.format(args=args)], capture_output=True, text=True,
                         env=env_for_subprocess(), timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("NO-TORCH"), out.stdout[-500:]
