"""The package's import structure: runners stay thin and independent, nothing reaches up to them.

Parsed with ``ast`` (nothing is imported), so a lazy import inside a function counts as well.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "backmix_vlm"


def _imports(path: Path) -> set[str]:
    """Absolute dotted names of every ``backmix_vlm`` module ``path`` imports (relative ones resolved)."""
    module = ["backmix_vlm", *path.relative_to(PACKAGE).with_suffix("").parts]
    package = module[:-1] if path.name != "__init__.py" else module[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("backmix_vlm")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("backmix_vlm"):
                continue
            out.add(target)
            out |= {f"{target}.{a.name}" for a in node.names}  # `from . import train` names a module
    return out


def _layer(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_import_parser_resolves_relative_imports(tmp_path):
    """The parser above, on known lines of the package (so the tests below can be trusted)."""
    got = _imports(PACKAGE / "runners" / "train.py")
    assert "backmix_vlm.jobs.train" in got and "backmix_vlm.runs" in got and "backmix_vlm.engine.trainer" in got
    assert "backmix_vlm.errors" in _imports(PACKAGE / "config.py")


def test_no_runner_imports_another_runner():
    runners = sorted(p for p in (PACKAGE / "runners").glob("*.py") if p.name != "__init__.py")
    names = {f"backmix_vlm.runners.{p.stem}" for p in runners}
    assert {"backmix_vlm.runners.train", "backmix_vlm.runners.eval", "backmix_vlm.runners.ood"} <= names
    offending = {}
    for path in runners:
        me = f"backmix_vlm.runners.{path.stem}"
        others = sorted(n for n in _imports(path) if any(n == o or n.startswith(o + ".") for o in names - {me}))
        if others:
            offending[path.name] = others
    assert not offending, f"runners import other runners (move the shared code to backmix_vlm/jobs): {offending}"


def test_nothing_below_the_runners_imports_them():
    """Only the CLI reaches the runners; only runners reach the job configs (``jobs/``)."""
    offending = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        layer = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        for name in _imports(path):
            target = _layer(name)
            if target == "runners" and layer not in ("runners", "cli"):
                offending.append(f"{rel} -> {name}")
            if target == "jobs" and layer not in ("runners", "jobs", "cli"):
                offending.append(f"{rel} -> {name}")
    assert not offending, offending
