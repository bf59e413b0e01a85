"""The package's import structure: every import goes down the data flow, runners stay thin.

Parsed with ``ast`` (nothing is imported), so a lazy import inside a function counts as well.
(Two imports by computed name are not seen and need none of this: ``cli`` loads
``runners.<job>``, and ``engine/__init__`` loads its own modules.)

:data:`LAYERS` is the rank table of ``docs/architecture.md``: the foundations any module may
import, then the data flow ``data -> augment -> saliency -> models -> adapters -> engine -> ood
-> report``, then ``jobs``, ``runners`` and ``cli`` on top.  A module may import its own layer
and the layers of a lower rank, never a layer of the same or a higher rank.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "backmix_vlm"

#: rank -> the top-level modules / packages of ``backmix_vlm`` at that rank (lowest first).
#: "" is the package itself (``backmix_vlm/__init__.py``: ``__version__``).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("", "errors"),                                        # foundations: imported by anyone ...
    ("compat",),                                           # the one reach into library internals
    ("registry", "validation", "runtime", "perf", "atomic"),
    ("metric_keys",),                                      # metric names + table settings (validation)
    ("config",),                                           # ... the shared config sections
    ("data",),                                             # the data flow, top to bottom
    ("augment",),
    ("saliency",),
    ("models",),
    ("adapters",),
    ("engine",),
    ("ood",),
    ("report",),
    ("jobs",),                                             # each job's config / preflight / builders
    ("runners",),
    ("cli",),
)
RANK = {layer: rank for rank, group in enumerate(LAYERS) for layer in group}

#: (importing module, imported module) -> why it may go up; deliberately empty.
EXCEPTIONS: dict[tuple[str, str], str] = {}


def _imports(path: Path, root: Path = PACKAGE) -> set[str]:
    """Absolute dotted names of every ``backmix_vlm`` module ``path`` imports (relative ones resolved)."""
    module = ["backmix_vlm", *path.relative_to(root).with_suffix("").parts]
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


def _layer(name: str, root: Path = PACKAGE) -> str:
    """The top-level module / package of a dotted name (``""``: the package or one of its attributes)."""
    parts = name.split(".")
    if len(parts) < 2:
        return ""
    top = parts[1]
    return top if (root / top).is_dir() or (root / f"{top}.py").is_file() else ""


def _own_layer(path: Path, root: Path = PACKAGE) -> str:
    rel = path.relative_to(root)
    if len(rel.parts) > 1:
        return rel.parts[0]
    return "" if rel.stem == "__init__" else rel.stem


def _upward_imports(root: Path = PACKAGE) -> list[str]:
    """``"file -> module (rank a -> rank b)"`` for every import of a layer that is not below the importer's."""
    found = []
    for path in sorted(root.rglob("*.py")):
        me = _own_layer(path, root)
        module = ".".join(["backmix_vlm", *path.relative_to(root).with_suffix("").parts])
        for name in sorted(_imports(path, root)):
            target = _layer(name, root)
            if target == me or RANK[target] < RANK[me]:
                continue
            if any(module == a and (name == b or name.startswith(b + ".")) for a, b in EXCEPTIONS):
                continue
            found.append(f"{path.relative_to(root)} -> {name} ({me or 'backmix_vlm'}: rank {RANK[me]}, "
                         f"{target or 'backmix_vlm'}: rank {RANK[target]})")
    return found


def test_import_parser_resolves_relative_imports(tmp_path):
    """The parser above, on known lines of the package (so the tests below can be trusted)."""
    got = _imports(PACKAGE / "runners" / "train.py")
    assert "backmix_vlm.jobs.train" in got and "backmix_vlm.jobs.runs" in got and "backmix_vlm.engine.trainer" in got
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


def test_rank_table_places_every_top_level_module():
    """A new top-level module or package must be given a rank (and the table names nothing stale)."""
    present = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    present |= {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    placed = set(RANK) - {""}
    assert present == placed, (f"not in LAYERS: {sorted(present - placed)}; "
                               f"in LAYERS but not in the package: {sorted(placed - present)}")
    assert sum(len(g) for g in LAYERS) == len(RANK), "a layer appears twice in LAYERS"


def test_upward_import_check_catches_lazy_and_relative_imports(tmp_path):
    """The check below on a made-up package: a lazy relative import and an absolute one going up,
    a peer import within one rank, and imports going down (allowed)."""
    root = tmp_path / "backmix_vlm"
    for pkg in ("models", "engine", "ood"):
        (root / pkg).mkdir(parents=True)
        (root / pkg / "__init__.py").write_text("")
    for mod in ("errors", "registry", "validation", "config"):
        (root / f"{mod}.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "models" / "m.py").write_text(
        "from ..errors import X\n"
        "def f():\n    from ..engine.checkpoint import LAST\n    return LAST\n")
    (root / "engine" / "e.py").write_text("import backmix_vlm.ood.scores\nfrom ..models import m\nfrom . import t\n")
    (root / "ood" / "o.py").write_text("from backmix_vlm.engine import e\nfrom backmix_vlm import config\n")
    (root / "registry.py").write_text("from .validation import check\nfrom . import errors\n")
    found = _upward_imports(root)
    assert [f.split(" (")[0] for f in found] == [
        "engine/e.py -> backmix_vlm.ood.scores", "models/m.py -> backmix_vlm.engine.checkpoint",
        "models/m.py -> backmix_vlm.engine.checkpoint.LAST", "registry.py -> backmix_vlm.validation",
        "registry.py -> backmix_vlm.validation.check"], found


def test_every_import_goes_down_the_layers():
    """No module imports a module of its own rank (another layer) or of a higher rank: the data flow
    of ``docs/architecture.md`` is the import order (``EXCEPTIONS`` lists the deliberate ones: none)."""
    found = _upward_imports()
    assert not found, "imports against the layer order (see LAYERS in tests/test_layers.py):\n" + "\n".join(found)


def _import_cycles(root: Path = PACKAGE) -> list[list[str]]:
    """Groups of modules that import each other, directly or around a loop (lazy imports included;
    Tarjan's strongly connected components of the module import graph)."""
    modules = {}
    for path in root.rglob("*.py"):
        name = ".".join(["backmix_vlm", *path.relative_to(root).with_suffix("").parts])
        modules[name.removesuffix(".__init__")] = path
    graph = {m: sorted(n for n in _imports(p, root) if n in modules and n != m) for m, p in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_import_cycle_check_finds_a_lazy_cycle(tmp_path):
    root = tmp_path / "backmix_vlm"
    (root / "models").mkdir(parents=True)
    for f in ("__init__.py", "models/__init__.py", "models/c.py"):
        (root / f).write_text("")
    (root / "models" / "a.py").write_text("from .b import x\n")
    (root / "models" / "b.py").write_text("def f():\n    from .a import y\n")
    (root / "models" / "c.py").write_text("from .a import x\n")
    assert _import_cycles(root) == [["backmix_vlm.models.a", "backmix_vlm.models.b"]]


def test_no_module_imports_itself_through_others():
    """No import loop between modules, lazy imports included (e.g. ``models.clip`` <-> ``models.hf_clip``:
    what both need lives in ``models.clip_bundle``)."""
    assert _import_cycles() == []
